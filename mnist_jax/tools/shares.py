"""A task's share of a sweep's runs, as a scheduler fans the sweep out: `--sweep_shard=i/n`, or a
SLURM array task's own place in its array. Share `i` of `n` takes runs i, i+n, i+2n, ...
"""

from __future__ import annotations

import dataclasses

from mnist_jax import errors


class ShareError(errors.UserError):
  """A share that no task of a sweep can hold, with a message that says how to give one."""


@dataclasses.dataclass(frozen=True)
class Share:
  """The runs one of several processes trains: of the sweep's runs in order (each point's seeds
  in turn), those whose position is `index` modulo `count`."""

  index: int = 0
  count: int = 1

  def __str__(self) -> str:
    return f"{self.index}/{self.count}"


def parse_share(text: str) -> Share:
  """`--sweep_shard=i/n`: share `i` (from 0) of `n`."""
  index, _, count = text.partition("/")
  if not (index.strip().isdigit() and count.strip().isdigit()) or not (
      0 <= int(index) < int(count)):
    raise ShareError(f"--sweep_shard={text} is not i/n with 0 <= i < n, e.g. --sweep_shard=0/4")
  return Share(int(index), int(count))


def array_share(task_id: str | None, task_count: str | None, task_min: str | None,
                task_max: str | None, task_step: str | None) -> Share:
  """The share of a SLURM array task, from its `SLURM_ARRAY_TASK_{ID,COUNT,MIN,MAX,STEP}` (all
  None outside an array: the whole sweep). Its tasks must form a range, such as `--array=0-7`,
  `--array=1-8%2` or `--array=0-14:2`, so that each task knows its place from its own id."""
  if task_id is None:
    return Share()
  try:
    task, count, low, high = (int(value) for value in (task_id, task_count, task_min, task_max))
    step = int(task_step or 1)
  except (TypeError, ValueError):
    raise ShareError(
        f"SLURM_ARRAY_TASK_ID is {task_id} but SLURM_ARRAY_TASK_COUNT, _MIN or _MAX is missing or "
        "not a number; submit with sbatch --array=0-<N-1>, or give --sweep_shard=i/n") from None
  if step < 1 or (high - low) % step or (high - low) // step + 1 != count or (task - low) % step:
    raise ShareError(
        f"SLURM array task {task} is one of {count} tasks with ids {low} to {high} that do not "
        "form a range; submit with sbatch --array=0-<N-1> (a %limit is fine), or give each "
        "task --sweep_shard=i/n")
  return Share((task - low) // step, count)
