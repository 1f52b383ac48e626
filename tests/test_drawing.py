"""Figures drawn by worker processes: the same files as drawn here, and no worker outlives its
command, whether the command ends, is killed, or loses a worker."""

import signal
import subprocess
import sys
import time

from conftest import REPO, process_alive

# Run in a process of its own: a fork of pytest's process, where JAX has started, could deadlock.
_SCRIPT = """
import os, sys
import numpy as np
from mnist_jax.report import drawing
from mnist_jax.run import workers
figures = {
    "curves": drawing.Plot("learning_curves", {"epoch": np.array([1, 2]),
                           "train_loss": np.array([0.5, 0.3]),
                           "train_accuracy": np.array([0.8, 0.9])}, ["train"]),
    "grid": drawing.Plot("image_grid", np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28, 1),
                         ["0 / 0", "1 / 1", "2 / 7", "3 / 3"], "four", ncols=2),
}
here, there = sys.argv[1], sys.argv[2]
drawing.write_pngs(figures, here)
with workers.allowed(), drawing.workers():
  print(" ".join(str(pid) for pid in drawing._pool._processes), flush=True)
  if sys.argv[3] == "kill a worker":
    os.kill(next(iter(drawing._pool._processes)), 9)
  seconds = drawing.write_pngs(figures, there)
  print(sorted(seconds), flush=True)
  if sys.argv[3] == "then hang":
    sys.stdin.read()
"""


def _draw(tmp_path, how):
  return subprocess.Popen(
      [sys.executable, "-c", _SCRIPT, str(tmp_path / "here"), str(tmp_path / "there"), how],
      cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _same_files(tmp_path):
  for name in ("curves", "grid"):
    assert (tmp_path / "here" / f"{name}.png").read_bytes() == (
        tmp_path / "there" / f"{name}.png").read_bytes()


def test_workers_draw_the_same_files_and_end_with_the_block(tmp_path):
  process = _draw(tmp_path, "draw")
  stdout, stderr = process.communicate(timeout=120)
  assert (process.returncode, stderr) == (0, "")
  pids, names = stdout.splitlines()
  assert len(pids.split()) == 2 and names == "['curves', 'grid']"
  _same_files(tmp_path)
  assert not any(process_alive(int(pid)) for pid in pids.split())


def test_a_dead_worker_leaves_the_figures_to_this_process(tmp_path):
  process = _draw(tmp_path, "kill a worker")
  stdout, stderr = process.communicate(timeout=120)
  assert (process.returncode, stderr) == (0, ""), stderr
  assert stdout.splitlines()[1] == "['curves', 'grid']"
  _same_files(tmp_path)


def test_workers_end_when_their_command_is_killed(tmp_path):
  process = _draw(tmp_path, "then hang")
  pids = [int(pid) for pid in process.stdout.readline().split()]
  assert process.stdout.readline().strip() == "['curves', 'grid']"
  assert all(process_alive(pid) for pid in pids)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=10)
  deadline = time.monotonic() + 10
  while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(process_alive(pid) for pid in pids)
