"""Worker processes for a command's work that needs no JAX, on the cores JAX leaves idle: drawing a
report's figures (report/drawing.py) while the command computes, framing image files (predict
while its model restores, folder evaluation side by side).

They are forked, and a fork of a process whose JAX runs its threads can deadlock: so only within
`allowed()`, which a command enters in a process of its own before JAX starts (main.py), and
before the command's first computation. Ctrl-C reaches only the command; a worker ends with it,
however it ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import process
from typing import Any

_BrokenPool = process.BrokenProcessPool  # A worker died (a signal, memory).

_allowed = False


@contextlib.contextmanager
def allowed() -> Iterator[None]:
  """Within, `forked` forks (elsewhere, in a test or a library call, JAX may run its threads)."""
  global _allowed  # pylint: disable=global-statement
  before, _allowed = _allowed, True
  try:
    yield
  finally:
    _allowed = before


@contextlib.contextmanager
def forked(count: int, start: Callable[[], Any] | None = None
           ) -> Iterator[concurrent.futures.Executor | None]:
  """Within, `count` forked worker processes (as many as the cores, at most), each running `start`
  first; None outside `allowed()`, where there is one core or no work (`count` 0), or where the
  system's libraries are not safe to fork (macOS): the caller does the work itself. The block's
  end waits for the work started, unless it ends by an exception."""
  cores = os.cpu_count() or 1
  if not _allowed or count < 1 or cores < 2 or sys.platform != "linux":
    yield None
    return
  handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Inherited by the workers, kept there.
  try:
    pool = concurrent.futures.ProcessPoolExecutor(
        min(count, cores), mp_context=multiprocessing.get_context("fork"),
        initializer=_start_worker, initargs=(os.getpid(), start))
    pool.submit(int)  # With "fork", the first task starts every worker.
  finally:
    signal.signal(signal.SIGINT, handler)
  try:
    yield pool
  except BaseException:  # An error or Ctrl-C: the work started is not wanted, end it now.
    for worker in list(pool._processes.values()):  # pylint: disable=protected-access
      worker.kill()
    raise
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def submit(pool: concurrent.futures.Executor | None, function: Callable[..., Any], *args: Any
           ) -> concurrent.futures.Future | None:
  """`pool.submit(function, *args)`; None without a pool, or where a worker died."""
  if pool is None:
    return None
  try:
    return pool.submit(function, *args)
  except _BrokenPool:
    return None


def result(future: concurrent.futures.Future | None, function: Callable[..., Any], *args: Any
           ) -> Any:
  """`future`'s result (an exception of the work is raised here); where there is no future or its
  worker died, `function(*args)` run here instead."""
  if future is not None:
    with contextlib.suppress(_BrokenPool):
      return future.result()
  return function(*args)


def _start_worker(parent: int, start: Callable[[], Any] | None) -> None:
  """In a worker: end with the parent, however it ends; then `start`."""

  def exit_with_parent():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=exit_with_parent, daemon=True).start()
  if start is not None:
    start()
