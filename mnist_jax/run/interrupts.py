"""Ctrl-C as one line: `<command>: interrupted` on stderr and exit status 130 (128 + SIGINT).

Python runs a signal handler between two bytecodes of its main thread, never inside a call into
compiled code; so a long computation must return to Python now and then (in compiled calls of a
bounded size, as the attacks' PGD and the studies' batches do) for Ctrl-C to end it promptly.
Training replaces this handler while it runs: it stops at the end of an epoch (guard.py).
Imports nothing heavy, so that a command installs it before its own imports. `no_teardown` ends
a command's process as soon as its work is done.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

INTERRUPTED = 128 + signal.SIGINT


class Interrupted(SystemExit):
  """Raised by the handler of `exit_on_interrupt`, with the exit status 130."""


def exit_on_interrupt(command: str = "mnist_jax") -> None:
  """From here on, SIGINT ends the process with the line `<command>: interrupted` (raised as
  `Interrupted` on the main thread, so `finally` blocks and context managers still run; a second
  SIGINT meanwhile ends it at once)."""

  def interrupted(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # A second Ctrl-C while exiting ends it at once.
    print(f"{command}: interrupted", file=sys.stderr, flush=True)
    if _importing(frame):
      # An extension module's initialisation can call back into Python (jaxlib builds its enums
      # so); an exception raised there cannot cross the compiled frames and aborts the process.
      # An import writes nothing of the user's, so end here.
      _exit_now(128 + signum)
    raise Interrupted(128 + signum)

  signal.signal(signal.SIGINT, interrupted)
  hook = sys.unraisablehook

  def unraisable(info: Any) -> None:
    # Raised where Python can only print it and go on (a `__del__`, a weakref callback): end the
    # process here instead, its one line already written.
    if isinstance(info.exc_value, Interrupted):
      _exit_now(info.exc_value.code)
    hook(info)

  sys.unraisablehook = unraisable


def _importing(frame: Any) -> bool:
  while frame is not None:
    if frame.f_code.co_filename.startswith("<frozen importlib"):
      return True
    frame = frame.f_back
  return False


def _exit_now(status: int) -> None:
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(OSError):  # A closed pipe: there is no one left to tell.
      stream.flush()
  os._exit(status)  # pylint: disable=protected-access


@contextlib.contextmanager
def no_teardown() -> Iterator[None]:
  """Around a command's work: once it ends, the process exits without Python's teardown, which
  frees JAX's objects one by one (a noticeable part of a short command's time) and, with a
  program still compiling or running on JAX's threads after Ctrl-C, can crash (a segmentation
  fault after the one line). At a normal end, threads that are not daemons are joined and
  `atexit` functions run first, as at any exit; an exception other than `SystemExit` is left to
  Python."""
  try:
    yield
  except Interrupted as e:
    _exit_now(e.code)
  except SystemExit as e:
    status = e.code
  else:
    status = 0
  if sys.getprofile() is not None:  # `python -m cProfile` writes its file after the command.
    sys.exit(status)
  if status is not None and not isinstance(status, int):  # As Python does: `sys.exit("why")`.
    print(status, file=sys.stderr)
    status = 1
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and not thread.daemon:
      thread.join()
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  _exit_now(status or 0)
