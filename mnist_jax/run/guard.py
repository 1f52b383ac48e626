"""Guards a training run's workdir: one run at a time, a clean stop, and what earlier runs left.

  lock_workdir      an flock on `<workdir>/train.lock`, so that a second run refuses at once
  StopSignals       the first SIGINT or SIGTERM asks for a stop at the end of the epoch
  remove_unfinished_saves, set_aside
                    what killed saves left, and damaged checkpoints moved out of orbax's sight
                    (to `<workdir>/checkpoints_unreadable/<step>/`, kept for inspection)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator

from mnist_jax import errors
from mnist_jax.run import rundir


class WorkdirInUse(errors.UserError):
  """Another training run holds the workdir's lock."""


@contextlib.contextmanager
def lock_workdir(workdir: str) -> Iterator[None]:
  """Holds an exclusive flock on `<workdir>/train.lock`; the kernel releases it if we die.

  Raises:
    WorkdirInUse: another process holds it (the message names that process).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, rundir.TRAIN_LOCK)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise WorkdirInUse(
          f"{workdir} is in use by a training run ({holder} holds {path}); wait for it to end "
          f"or use another --workdir"
      ) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    try:
      yield
    finally:
      f.truncate(0)


class StopSignals:
  """While entered, the first SIGINT or SIGTERM is only recorded (`received`), for the loop to
  stop at its next epoch boundary; a second one interrupts at once. Outside the main thread,
  where Python cannot set handlers, it does nothing."""

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def _on_signal(self, signum: int, frame) -> None:
    del frame
    self.received = signum
    for other in (signal.SIGINT, signal.SIGTERM):  # A second signal interrupts at once.
      signal.signal(other, signal.SIG_DFL if other == signal.SIGTERM else signal.default_int_handler)


def _checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, rundir.CHECKPOINTS)


def remove_unfinished_saves(workdir: str, step: int | None = None) -> None:
  """Removes what orbax saves that never finished left (of `step`, or of every step): orbax
  never lists them, and only the holder of the workdir's lock writes checkpoints."""
  directory = _checkpoint_dir(workdir)
  pattern = rf"{'[0-9]+' if step is None else step}\.orbax-checkpoint-tmp.*"
  # After a failed save, writes orbax had under way may still land for a moment: remove again.
  for _ in range(20):
    names = os.listdir(directory) if os.path.isdir(directory) else []
    leftovers = [name for name in names if re.fullmatch(pattern, name)]
    if not leftovers:
      return
    for name in leftovers:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    time.sleep(0.05)


def set_aside(workdir: str, step: int) -> None:
  """Moves the damaged checkpoint `step` out of orbax's sight, keeping it for inspection."""
  aside = base = os.path.join(workdir, rundir.UNREADABLE_CHECKPOINTS, str(step))
  copies = 1
  while os.path.exists(aside):  # A step set aside before: keep both.
    copies += 1
    aside = f"{base}.{copies}"
  os.makedirs(os.path.dirname(aside), exist_ok=True)
  shutil.move(os.path.join(_checkpoint_dir(workdir), str(step)), aside)
  print(f"mnist_jax: warning: moved unreadable checkpoint {step} to {aside}", file=sys.stderr)
