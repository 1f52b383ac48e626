"""Ctrl-C as one line: `<command>: interrupted` on stderr and exit status 130 (128 + SIGINT).

Python runs a signal handler between two bytecodes of its main thread, never inside a call into
compiled code; so a long computation must return to Python now and then (in compiled calls of a
bounded size, as the attacks' PGD and the studies' batches do) for Ctrl-C to end it promptly.
Training replaces this handler while it runs: it stops at the end of an epoch (guard.py).
Imports nothing heavy, so that a command installs it before its own imports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
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
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


@contextlib.contextmanager
def no_teardown_after_interrupt() -> Iterator[None]:
  """Around a command's work: once `Interrupted` has unwound it (its `finally` blocks run), the
  process ends without Python's teardown. With a program of JAX's still compiling or running on
  its threads, that teardown can crash (a segmentation fault after the one line)."""
  try:
    yield
  except Interrupted as e:
    _exit_now(e.code)
