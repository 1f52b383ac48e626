"""Ctrl-C ends any long computation within about a second with one line and status 130, and
flags that scale work have bounds."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, main_in_process, process_alive
from mnist_jax.run import checkpoints
from mnist_jax.tools import sweep

INTERRUPTED = 128 + signal.SIGINT


class _Command:
  """A command started in the background whose output lines are collected as they come."""

  def __init__(self, args, cwd=REPO):
    self.process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
    self.lines = {"stdout": [], "stderr": []}
    self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                     for name in self.lines]
    for reader in self._readers:
      reader.start()

  def _read(self, name):
    for line in getattr(self.process, name):
      self.lines[name].append(line)

  def wait_for(self, name, text, timeout=240):
    """Waits until a line of `name` holds `text`; returns how many lines came before it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      for i, line in enumerate(self.lines[name]):
        if text in line:
          return i
      assert self.process.poll() is None, (f"ended ({self.process.returncode}) before {text!r}",
                                           self.lines)
      time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {timeout} s: {self.lines}")

  def interrupt(self, timeout=60):
    """SIGINT; returns the seconds until the process ended."""
    start = time.monotonic()
    self.process.send_signal(signal.SIGINT)
    self.process.wait(timeout=timeout)
    ended = time.monotonic() - start
    for reader in self._readers:
      reader.join(timeout=10)
    return ended


@pytest.mark.parametrize("steps", ["0", "1001", "200000"])
def test_pgd_steps_out_of_bounds_are_refused_in_one_line(tmp_path, steps):
  result = main_in_process("--mode=attack", f"--workdir={tmp_path}", f"--pgd_steps={steps}")
  assert result.returncode == 1 and result.stdout == ""
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("mnist_jax: bad flags: ") and "--pgd_steps" in line and "1000" in line


def test_a_signal_that_training_turned_into_a_normal_end_still_ends_the_sweep():
  """Training ends a run normally on a signal in its last epoch; the sweep must stop anyway."""
  previous = signal.signal(signal.SIGINT, lambda signum, frame: None)  # As training swallows it.
  try:
    with sweep._signals_seen() as stop_if_signalled:  # pylint: disable=protected-access
      stop_if_signalled("after nothing")  # Nothing arrived: nothing raised.
      signal.raise_signal(signal.SIGINT)
      with pytest.raises(checkpoints.Stopped, match="sweep stopped by SIGINT after point p") as e:
        stop_if_signalled("after point p")
      assert e.value.signum == signal.SIGINT
      stop_if_signalled("after nothing")  # Told once.
  finally:
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_an_import_ends_the_process_without_raising_into_it(tmp_path):
  """An extension module's initialisation may call back into Python; an exception raised there
  cannot cross its compiled frames (the process aborts), so the handler must not raise in one."""
  (tmp_path / "slow_module.py").write_text(
      "import os, signal, time\n"
      "os.kill(os.getpid(), signal.SIGINT)\n"
      "time.sleep(5)\n")
  script = ("from mnist_jax.run import interrupts\n"
            "interrupts.exit_on_interrupt()\n"
            "try:\n"
            "  import slow_module\n"
            "except BaseException as e:\n"
            "  print('raised', type(e).__name__)\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}"})
  assert (result.returncode, result.stdout, result.stderr) == (
      INTERRUPTED, "", "mnist_jax: interrupted\n")


@pytest.mark.slow
def test_ctrl_c_ends_a_long_attack_within_a_second(two_epoch_run):
  command = _Command([sys.executable, "-m", "mnist_jax.main", "--mode=attack",
                      f"--workdir={two_epoch_run}", "--pgd_steps=1000"])
  command.wait_for("stdout", "attack: 10000 images")
  time.sleep(1.0)  # Deep in PGD: 7 eps x 20 batches x 1000 steps take many minutes.
  assert command.interrupt() < 3.0
  assert (command.process.returncode, command.lines["stderr"]) == (
      INTERRUPTED, ["mnist_jax: interrupted\n"])


@pytest.mark.slow
def test_ctrl_c_ends_a_folder_evaluation_within_a_second(two_epoch_run, tmp_path):
  folder = tmp_path / "digits"
  (folder / "0").mkdir(parents=True)
  (folder / "0" / "0_notes.txt").write_text("not an image: a warning line, first")
  page = np.full((1500, 1500), 230, np.uint8)
  page[500:1000, 650:850] = 20  # A dark bar: a "1".
  Image.fromarray(page).save(folder / "0" / "1.png")
  for i in range(400):  # Hard links: each is read and framed as a file of its own.
    os.link(folder / "0" / "1.png", folder / "0" / f"1_{i:03d}.png")
  command = _Command([sys.executable, "-m", "mnist_jax.main", "--mode=eval",
                      f"--workdir={two_epoch_run}", f"--images_dir={folder}"])
  first = command.wait_for("stderr", "0_notes.txt")
  time.sleep(0.5)
  assert command.interrupt() < 3.0
  assert command.process.returncode == INTERRUPTED, command.lines
  assert command.lines["stderr"][first + 1:] == ["mnist_jax: interrupted\n"]
  assert not (two_epoch_run / "eval" / "digits").exists()


@pytest.mark.slow
def test_ctrl_c_ends_a_sweep_at_the_end_of_its_epoch_in_one_line(tmp_path):
  command = _Command([sys.executable, "-m", "mnist_jax.main", "--mode=sweep",
                      f"--config={os.path.join(REPO, 'experiments', 'lr_batch_sweep.py')}:smoke",
                      f"--workdir={tmp_path}"])
  command.wait_for("stdout", "sweep: point 1/4")
  time.sleep(1.0)
  assert command.interrupt() < 30.0  # Training saves at the end of the epoch, then stops.
  assert command.process.returncode == INTERRUPTED, command.lines
  (line,) = command.lines["stderr"]
  assert line.startswith("mnist_jax: ") and "SIGINT" in line and "resume with: " in line
  assert "sweep: point 2/4" not in "".join(command.lines["stdout"])


def _children(pid):
  """The processes whose parent is `pid`."""
  children = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if entry.isdigit() and int(fields[1]) == pid:
      children.append(int(entry))
  return children


@pytest.mark.slow
def test_ctrl_c_ends_the_benchmark_and_its_children_within_a_second(tmp_path):
  command = _Command([sys.executable, "-m", "mnist_jax.tools.bench", "--quick",
                      "--loops=jax_device"], cwd=tmp_path)
  first = command.wait_for("stderr", "run 1/1: matmul_floor")
  time.sleep(1.0)
  children = _children(command.process.pid)
  assert children  # The loop's own process, in a session of its own.
  assert command.interrupt() < 3.0
  assert command.process.returncode == INTERRUPTED, command.lines
  assert command.lines["stderr"][first + 1:] == ["mnist_jax.bench: interrupted\n"]
  assert not any(process_alive(pid) for pid in children)
