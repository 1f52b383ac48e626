"""Faults of the machine around a run: a full disk, a read-only workdir. Each ends in one line and a
non-zero exit, and leaves what was there before as it was. Needs root for a small tmpfs."""

import contextlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import load_config, main_in_process, run_main
from mnist_jax import train
from mnist_jax.run import rundir

SMOKE = "--config=experiments/seed_mlp.py:smoke"
STEPS_PER_EPOCH = 60_000 // 128


@contextlib.contextmanager
def _tmpfs(path, size):
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  path.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                    capture_output=True, check=False).returncode != 0:
    pytest.skip("this machine does not let tests mount a tmpfs")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(disk, leave_bytes):
  """Fills `disk` but for about `leave_bytes`."""
  free = shutil.disk_usage(disk).free - leave_bytes
  with open(disk / "filler", "wb") as f:
    f.write(b"\0" * max(free, 0))


def _epochs(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "examples_per_s")}
          for r in records]


@pytest.mark.slow
def test_a_full_disk_stops_at_the_checkpoint_and_a_resume_ends_as_if_it_never_did(
    tmp_path, two_epoch_run):
  with _tmpfs(tmp_path / "disk", "16m") as disk:
    shutil.copytree(two_epoch_run, disk / "run")
    _fill(disk, 256 * 1024)  # Room for metrics.jsonl, not for a checkpoint.
    result = run_main(SMOKE, "--config.num_epochs=3", f"--workdir={disk / 'run'}")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"mnist_jax: checkpoint {3 * STEPS_PER_EPOCH} could not be written to "
        f"{disk / 'run' / 'checkpoints'} (No space left on device); the last good one is "
        f"{2 * STEPS_PER_EPOCH}, where the same command resumes"]
    assert sorted(os.listdir(disk / "run" / "checkpoints")) == [
        str(STEPS_PER_EPOCH), str(2 * STEPS_PER_EPOCH)]  # Nothing half-written.

    os.remove(disk / "filler")
    result = run_main(SMOKE, "--config.num_epochs=3", f"--workdir={disk / 'run'}")
    assert result.returncode == 0, result.stderr
    config = load_config("seed_mlp", "smoke")
    config.num_epochs = 3
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    assert _epochs(disk / "run") == _epochs(tmp_path / "straight")


@pytest.mark.parametrize("args, message", [
    ((SMOKE, "--config.num_epochs=3"), "Read-only file system: {run}/train.lock"),
    (("--mode=report",), "{run} is not writable, and the report is written there"),
])
def test_a_read_only_workdir_is_one_line_and_eval_still_reads_it(tmp_path, two_epoch_run, args,
                                                                  message):
  with _tmpfs(tmp_path / "disk", "16m") as disk:
    shutil.copytree(two_epoch_run, disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = main_in_process(*args, f"--workdir={disk / 'run'}")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"mnist_jax: {message.format(run=disk / 'run')}"]
    result = main_in_process("--mode=eval", f"--workdir={disk / 'run'}")
    assert result.returncode == 0 and result.stdout.startswith("checkpoint"), result.stderr


def test_a_run_file_that_does_not_fit_leaves_the_previous_version(tmp_path):
  with _tmpfs(tmp_path / "disk", "1m") as disk:
    rundir.write_text(str(disk / rundir.METRICS), "the previous version\n")
    _fill(disk, 8 * 1024)
    with pytest.raises(rundir.RunFileError,
                       match=rf"cannot write {disk}/metrics.jsonl \(No space left on device\)"):
      rundir.write_text(str(disk / rundir.METRICS), "x" * 100_000)
    assert (disk / rundir.METRICS).read_text() == "the previous version\n"
    assert sorted(os.listdir(disk)) == ["filler", rundir.METRICS]  # No temporary file left.
