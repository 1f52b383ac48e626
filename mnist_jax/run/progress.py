"""Progress lines for long epochs: steps done, examples per second and the time left."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import jax


class EpochProgress:
  """Called after each step with the steps done and the state; prints a line every `interval_s`."""

  def __init__(self, total_steps: int, batch_size: int, interval_s: float = 10.0,
               out: TextIO | None = None):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.interval_s = interval_s
    self.out = out or sys.stdout
    self.start = self.last = time.perf_counter()

  def __call__(self, steps_done: int, state: Any) -> None:
    if time.perf_counter() - self.last < self.interval_s or steps_done >= self.total_steps:
      return
    # Steps are dispatched ahead of the device; count only those that have run.
    jax.block_until_ready(state)
    self.last = time.perf_counter()
    steps_per_s = steps_done / (self.last - self.start)
    left_s = round((self.total_steps - steps_done) / steps_per_s)
    print(f"  step {steps_done}/{self.total_steps} ({steps_done / self.total_steps:.0%})  "
          f"{steps_per_s * self.batch_size:.0f} examples/s  ETA {left_s // 60}:{left_s % 60:02d}",
          file=self.out, flush=True)
