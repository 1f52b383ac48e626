"""Draws figures into PNG files: in worker processes where a command started them, else here.

A figure to draw is a `Plot`: the name of a function of plots.py and its arguments (numpy arrays,
strings), which can cross to another process; so a module that only describes figures does not
import matplotlib. `python -m mnist_jax.main` starts the workers (`workers()`) before JAX starts
its backends: at the lowest priority, they import matplotlib and draw a first figure on the cores
the command leaves idle, then draw a report's figures side by side. Without workers (in a test, a
library call, a multi-host run, or after a worker died) every figure is drawn in this process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from mnist_jax.run import workers as run_workers

RIGHT_COLOR, WRONG_COLOR = "black", "tab:red"  # Captions of right and wrong predictions.

_pool: concurrent.futures.Executor | None = None


class Plot:
  """A figure to draw: `plots.<function>(*args, **kwargs)`."""

  def __init__(self, function: str, *args: Any, **kwargs: Any):
    self.function, self.args, self.kwargs = function, args, kwargs


def _draw(plot: Plot, path: str) -> float:
  """Draws `plot` into `path`; returns the seconds it took."""
  from mnist_jax.report import plots  # pylint: disable=import-outside-toplevel  # matplotlib.

  start = time.perf_counter()
  getattr(plots, plot.function)(*plot.args, **plot.kwargs).savefig(path, dpi=100)
  return time.perf_counter() - start


def start(figures: dict[str, Plot], directory: str) -> Callable[[], dict[str, float]]:
  """Starts drawing each figure into `<directory>/<name>.png`, in order, on the workers where
  they run; returns a function that waits until every one is drawn and returns the seconds each
  took. Without workers, that function draws them."""
  os.makedirs(directory, exist_ok=True)
  paths = {name: os.path.join(directory, f"{name}.png") for name in figures}
  futures = {name: run_workers.submit(_pool, _draw, plot, paths[name])
             for name, plot in figures.items()}

  def finish() -> dict[str, float]:
    return {name: run_workers.result(futures[name], _draw, plot, paths[name])
            for name, plot in figures.items()}

  return finish


def write_pngs(figures: dict[str, Plot], directory: str) -> dict[str, float]:
  """Draws each figure into `<directory>/<name>.png`; returns the seconds each took to draw."""
  return start(figures, directory)()


@contextlib.contextmanager
def workers(count: int = 2) -> Iterator[None]:
  """Within, figures are drawn by `count` worker processes (`workers.forked`: none outside
  `workers.allowed()`, on one core or off Linux). Start it before JAX starts its backends."""
  global _pool  # pylint: disable=global-statement
  if _pool is not None:
    yield
    return
  with run_workers.forked(count, _warm_up) as pool:
    _pool = pool
    try:
      yield
    finally:
      _pool = None


def _warm_up() -> None:
  """In a worker: take only the cores its training leaves idle (the lowest priority); import
  matplotlib and draw a first figure (fonts, Agg), so that the report's figures find them loaded.
  More to draw first would still be drawing when the report starts: training leaves these workers
  little time."""
  os.nice(19)
  from mnist_jax.report import plots  # pylint: disable=import-outside-toplevel

  plots.learning_curves({"epoch": [1], "train_loss": [1.0], "train_accuracy": [0.5]},
                        ["train"]).savefig(os.devnull, format="png", dpi=100)
  gc.freeze()  # matplotlib's modules, as main() does with the parent's.
