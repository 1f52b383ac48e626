"""A run killed with SIGKILL, then stopped with SIGTERM, ends with the bits of one never stopped.

5 epochs straight, against: killed once epoch 2's checkpoint exists (in epoch 3 or so), resumed
by the same command and stopped by SIGTERM at the end of its first epoch, resumed to the end.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, load_config
from mnist_jax import train

ARGS = ("--config=experiments/seed_mlp.py:smoke", "--config.num_epochs=5")
STEPS_PER_EPOCH = 60_000 // 128  # The smoke config's batch size.


def _start(workdir):
  return subprocess.Popen(
      [sys.executable, "-m", "mnist_jax.main", *ARGS, f"--workdir={workdir}"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )


def _latest_state(workdir):
  """The newest checkpoint's arrays, read with plain orbax as WORKSPACE.md shows."""
  steps = [int(name) for name in os.listdir(workdir / "checkpoints")]
  return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(max(steps)) / "state")


def _metrics(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for record in records:  # All but the timings.
    del record["epoch_time_s"], record["examples_per_s"]
  return records


def _kill_after_epoch_2(workdir):
  """Starts the run and SIGKILLs it once epoch 2's checkpoint exists.

  Retries where the kill landed so late that no epoch but the last would be left to resume.
  """
  for _ in range(3):
    process = _start(workdir)
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / str(2 * STEPS_PER_EPOCH)).exists():
      assert process.poll() is None, process.communicate()
      assert time.monotonic() < deadline
      time.sleep(0.005)
    process.kill()
    process.communicate()
    if (process.returncode == -signal.SIGKILL
        and not (workdir / "checkpoints" / str(4 * STEPS_PER_EPOCH)).exists()):
      return
    shutil.rmtree(workdir)
  pytest.fail("the run always got past epoch 3 before SIGKILL reached it")


@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
  config = load_config("seed_mlp", "smoke")
  config.num_epochs = 5
  straight = tmp_path / "straight"
  train.train_and_evaluate(config, str(straight))

  interrupted = tmp_path / "interrupted"
  _kill_after_epoch_2(interrupted)

  # The same command resumes; SIGTERM then stops it at the end of an epoch, with a checkpoint.
  process = _start(interrupted)
  first_line = process.stdout.readline()
  assert first_line.startswith("resuming from checkpoint"), process.communicate()
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 128 + signal.SIGTERM, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mnist_jax: stopped by SIGTERM after epoch"), stderr
  assert lines[0].endswith(f"resume with: python -m mnist_jax.main {' '.join(ARGS)} "
                           f"--workdir={interrupted}")

  _, final = train.train_and_evaluate(config, str(interrupted))
  assert final["epoch"] == 5

  expected, actual = _latest_state(straight), _latest_state(interrupted)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for leaf, expected_leaf in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(leaf, expected_leaf)  # Bitwise, for floats too.
  # Each epoch exactly once, with the same numbers.
  assert [r["epoch"] for r in _metrics(interrupted)] == [1, 2, 3, 4, 5]
  assert _metrics(interrupted) == _metrics(straight)


def _flip_a_bit_in_the_largest_array(checkpoint):
  files = [os.path.join(root, name) for root, _, names in os.walk(checkpoint / "state")
           if os.path.basename(root) == "d" for name in names]
  largest = max(files, key=os.path.getsize)  # The first layer's kernel, and its Adam moments.
  data = bytearray(open(largest, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(largest, "wb").write(bytes(data))


@pytest.mark.slow
def test_raising_num_epochs_past_a_damaged_checkpoint_continues_exactly(tmp_path, capsys):
  config = load_config("seed_mlp", "smoke")
  config.num_epochs = 3
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  config.num_epochs = 2
  train.train_and_evaluate(config, str(tmp_path / "continued"))
  _flip_a_bit_in_the_largest_array(tmp_path / "continued" / "checkpoints" / str(2 * STEPS_PER_EPOCH))
  capsys.readouterr()
  config.num_epochs = 3  # A change that resumes without --allow_config_change.
  train.train_and_evaluate(config, str(tmp_path / "continued"))
  # The damaged epoch 2 is set aside and trained again from epoch 1's checkpoint.
  assert f"checkpoint {2 * STEPS_PER_EPOCH} " in capsys.readouterr().err

  expected, actual = _latest_state(tmp_path / "straight"), _latest_state(tmp_path / "continued")
  for leaf, expected_leaf in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(leaf, expected_leaf)
  assert _metrics(tmp_path / "continued") == _metrics(tmp_path / "straight")


@pytest.mark.slow
def test_a_resume_after_two_step_directories_were_swapped_ends_as_the_run_never_touched(
    tmp_path, capsys):
  """The newest two checkpoints swapped by hand: each is damaged (its contents are of the other
  step), so the resume sets both aside, trains epochs 2 and 3 again from epoch 1's checkpoint,
  and writes their checkpoints anew instead of skipping saves to steps that exist."""
  config = load_config("seed_mlp", "smoke")
  config.num_epochs = 3
  train.train_and_evaluate(config, str(tmp_path))
  expected_state, expected_metrics = _latest_state(tmp_path), _metrics(tmp_path)
  second, third = (tmp_path / "checkpoints" / str(n * STEPS_PER_EPOCH) for n in (2, 3))
  os.rename(second, tmp_path / "swap")
  os.rename(third, second)
  os.rename(tmp_path / "swap", third)
  capsys.readouterr()

  train.train_and_evaluate(config, str(tmp_path))
  out, err = capsys.readouterr()
  assert f"resuming from checkpoint {STEPS_PER_EPOCH} (epoch 1)" in out
  assert f"it holds step {2 * STEPS_PER_EPOCH} (epoch 2), not step {3 * STEPS_PER_EPOCH}" in err
  assert sorted(int(name) for name in os.listdir(tmp_path / "checkpoints_unreadable")) == [
      2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
  actual = _latest_state(tmp_path)
  assert int(actual["step"]) == 3 * STEPS_PER_EPOCH
  for leaf, expected_leaf in zip(jax.tree.leaves(actual), jax.tree.leaves(expected_state)):
    np.testing.assert_array_equal(leaf, expected_leaf)
  assert _metrics(tmp_path) == expected_metrics
