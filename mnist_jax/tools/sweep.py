"""Hyper-parameter sweeps: the points of an experiment file, each trained into its own workdir.

An experiment file that defines `get_sweep(arg=None)` can be swept:

  python -m mnist_jax.main --mode=sweep --config=experiments/lr_batch_sweep.py --workdir=runs/lr

`get_sweep` returns a list of overrides, each a dict of dotted config field -> value applied to
`get_config(arg)` (after any `--config.*` flags). Overrides that differ only in `seed` are the
seeds of one point. Each seed of a point trains with `train.train_and_evaluate` into
`<workdir>/<point>/seed_<seed>/`, where `<point>` is made from the overrides, e.g.
`learning_rate=0.001,batch_size=32`, and then draws its report. A seed whose
`final_metrics.json` is newer than its `config.json`, itself the same config, is not trained again;
any other resumes from its checkpoints. After each point, `<workdir>/sweep_summary.md` and
`sweep_summary.csv` rank the finished points by `metrics.selection_metric(config)`, mean and
standard deviation over seeds, with a column for every evaluated split's accuracy. With
`config.num_seeds` > 1 each run trains several seeds at once and every one of them counts.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import math
import os
import re
import signal
import statistics
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

from mnist_jax import configs, errors, metrics, train
from mnist_jax.report import training
from mnist_jax.run import checkpoints, parallel, rundir

Overrides = dict[str, Any]

SUMMARY_MD, SUMMARY_CSV = "sweep_summary.md", "sweep_summary.csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_MAX_NAME = 120


class SweepError(errors.UserError):
  """A sweep that cannot run as written, with a message that says which point and why."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One row of the summary: its overrides (without `seed`), directory name and seeds."""

  name: str
  overrides: Overrides
  seeds: tuple[int, ...]


def load_sweep(config_filename: str) -> list[Overrides]:
  """The overrides of `get_sweep(arg)` in `path[:arg]`, as given to `--config`."""
  path, *args = config_filename.split(":", 1)
  module = configs.load_module(path)
  if not callable(getattr(module, "get_sweep", None)):
    raise SweepError(f"{path} defines no get_sweep(arg=None), which --mode=sweep needs")
  try:
    sweep = module.get_sweep(*args)
  except ValueError as e:
    raise SweepError(f"{path}: {e}") from e
  if not isinstance(sweep, Sequence) or not sweep:
    raise SweepError(f"{path}: get_sweep must return a non-empty list of dicts")
  for i, overrides in enumerate(sweep):
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
      raise SweepError(f"{path}: point {i} of get_sweep is not a dict of field names to values")
  return list(sweep)


def point_name(overrides: Overrides) -> str:
  """A directory name for a point, e.g. `learning_rate=0.001,model_args.hidden_sizes=_256_`."""
  name = ",".join(f"{key}={_UNSAFE.sub('_', str(value))}" for key, value in overrides.items())
  if len(name) > _MAX_NAME:
    name = f"{name[:_MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
  return name or "base"


def group_points(sweep: Sequence[Overrides], default_seed: int) -> list[Point]:
  """The points of a sweep in order; overrides equal but for `seed` become one point's seeds."""
  points: dict[str, Point] = {}
  for overrides in sweep:
    rest = {key: value for key, value in overrides.items() if key != "seed"}
    seed = overrides.get("seed", default_seed)
    name = point_name(rest)
    point = points.setdefault(name, Point(name, rest, ()))
    if point.overrides != rest:
      raise SweepError(f"points {point.overrides} and {rest} share the directory name {name!r}")
    if seed in point.seeds:
      raise SweepError(f"point {name} lists seed {seed} twice")
    points[name] = dataclasses.replace(point, seeds=(*point.seeds, seed))
  return list(points.values())


def point_config(
    config: ml_collections.ConfigDict, overrides: Overrides
) -> ml_collections.ConfigDict:
  """A locked copy of `config` with `overrides` set, refused with the field's name if it fails."""
  result = config.copy_and_resolve_references()
  result.lock()
  for key, value in overrides.items():
    parent = result
    for part in key.split(".")[:-1]:
      parent = parent.get(part) if isinstance(parent, ml_collections.ConfigDict) else None
    if not isinstance(parent, ml_collections.ConfigDict) or key.split(".")[-1] not in parent:
      raise SweepError(f"the sweep sets unknown config field {key!r}")
    try:
      result.update_from_flattened_dict({key: value})
    except TypeError as e:
      raise SweepError(f"the sweep sets config.{key} to {value!r}: {e}") from e
  try:
    configs.validate(result)
    train.run_splits(result)  # Refuses a validation split too small to rank the points.
  except configs.ConfigError as e:
    raise SweepError(f"sweep point {point_name(overrides)}: {e}") from e
  return result


def _is_finished(run_dir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether `run_dir` holds a run of `config` whose final metrics came after its config.

  Training writes `config.json` when it starts and `final_metrics.json` when it ends, so older
  final metrics beside a newer config are those of an earlier, shorter run.
  """
  try:
    same_config = rundir.read_config(run_dir) == rundir.config_dict(config)
    return same_config and (os.path.getmtime(os.path.join(run_dir, rundir.FINAL_METRICS))
                            >= os.path.getmtime(os.path.join(run_dir, rundir.CONFIG)))
  except (OSError, rundir.RunFileError):
    return False


def seed_results(point_dir: str, seeds: Sequence[int]) -> list[dict[str, Any]] | None:
  """The final metrics of every model of a point, or None while any of its runs is unfinished.

  A run with `config.num_seeds` > 1 trained several models in one program: its
  `final_metrics.json` holds `<name>_per_seed` lists, one value per model; the run's own numbers
  (`train_time_s`) go with each of its models.
  """
  results = []
  for seed in seeds:
    run_dir = os.path.join(point_dir, f"seed_{seed}")
    if not os.path.exists(os.path.join(run_dir, rundir.FINAL_METRICS)):
      return None
    final = rundir.read_final(run_dir, metrics.check_record)
    per_seed = {key[:-len("_per_seed")]: values for key, values in final.items()
                if key.endswith("_per_seed")}
    num_models = len(next(iter(per_seed.values()), [None]))
    results += [{**final, **{name: values[i] for name, values in per_seed.items()}}
                for i in range(num_models)]
  return results


def aggregate(results: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
  """`<name>_mean` and `<name>_std` (sample standard deviation; NaN for one seed) per metric."""
  row = {}
  for name in names:
    values = [float(result[name]) for result in results]
    row[f"{name}_mean"] = statistics.fmean(values)
    row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
  return row


def summary_rows(workdir: str, points: Sequence[Point], metric: str
                 ) -> tuple[list[dict[str, Any]], list[str]]:
  """One row per finished point, best `metric` first, and the accuracies the rows hold."""
  rows, accuracies = [], [metric]
  for point in points:
    results = seed_results(os.path.join(workdir, point.name), point.seeds)
    if results is not None:
      accuracies = metrics.ranking_fields(results)
      rows.append({"point": point.name, **point.overrides, "seeds": len(results),
                   **aggregate(results, [*accuracies, "train_time_s"])})
  return sorted(rows, key=lambda row: (-row[f"{metric}_mean"], row["point"])), accuracies


def write_summary(
    workdir: str, points: Sequence[Point], rows: Sequence[dict[str, Any]], metric: str,
    accuracies: Sequence[str], title: str,
) -> None:
  """`sweep_summary.csv` (every number) and `sweep_summary.md` (a ranked table) in `workdir`."""
  fields = list(dict.fromkeys(key for point in points for key in point.overrides))
  columns = ["point", *fields, "seeds"] + [
      f"{name}_{stat}" for name in [*accuracies, "train_time_s"] for stat in ("mean", "std")
  ]
  table = io.StringIO()
  writer = csv.DictWriter(table, columns, restval="")
  writer.writeheader()
  writer.writerows(rows)
  rundir.write_text(os.path.join(workdir, SUMMARY_CSV), table.getvalue())

  def cell(row, name, scale=100, digits=2):
    mean, std = row[f"{name}_mean"] * scale, row[f"{name}_std"] * scale
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"

  lines = [
      f"# Sweep: {title}",
      "",
      f"{len(rows)} of {len(points)} points finished. Ranked by `{metric}` (%) of the last "
      "epoch, mean ± sample standard deviation over the seeds; train time in seconds per run.",
  ]
  if metric == "test_accuracy":
    lines.append("No validation split (`config.validation_fraction` is 0): the ranking reads the "
                 "test set, so the best row's test accuracy is an optimistic estimate.")
  lines += [
      "",
      "| rank | " + " | ".join([*fields, *accuracies, "train time (s)", "seeds"]) + " |",
      "|" + "---|" * (len(fields) + len(accuracies) + 3),
  ]
  for rank, row in enumerate(rows, 1):
    values = [str(row[field]) if field in row else "" for field in fields]
    values += [cell(row, name) for name in accuracies]
    values += [cell(row, "train_time_s", scale=1, digits=1), str(row["seeds"])]
    lines.append(f"| {rank} | " + " | ".join(values) + " |")
  rundir.write_text(os.path.join(workdir, SUMMARY_MD), "\n".join(lines) + "\n")


@contextlib.contextmanager
def _signals_seen() -> Iterator[Any]:
  """Yields a function that raises `checkpoints.Stopped` if SIGINT or SIGTERM arrived since it
  was last called, however it was handled: training turns one in a run's last epoch into a normal
  end of that run, which must still end the sweep. Python's C-level handler writes every signal
  it catches to the wakeup file descriptor, whichever Python handler is installed."""
  read_fd, write_fd = os.pipe()
  for fd in (read_fd, write_fd):
    os.set_blocking(fd, False)
  try:
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  except ValueError:  # Not the main thread, where Python handles no signal.
    previous = None

  def stop_if_signalled(after: str) -> None:
    try:
      caught = os.read(read_fd, 1024)
    except BlockingIOError:
      return
    stops = [signum for signum in caught if signum in (signal.SIGINT, signal.SIGTERM)]
    if stops:
      name = signal.Signals(stops[0]).name
      raise checkpoints.Stopped(f"sweep stopped by {name} {after}", stops[0])

  try:
    yield stop_if_signalled
  finally:
    if previous is not None:
      signal.set_wakeup_fd(previous)
    os.close(read_fd)
    os.close(write_fd)


def run_sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    sweep: Sequence[Overrides],
    *,
    title: str = "",
    allow_config_change: bool = False,
) -> list[dict[str, Any]]:
  """Trains every seed of every point not yet finished; returns the summary's rows.

  Every point's config is checked before anything trains, so a bad point fails at once.
  """
  points = group_points(sweep, config.seed)
  point_configs = {
      (point.name, seed): point_config(config, {**point.overrides, "seed": seed})
      for point in points for seed in point.seeds
  }
  metric = metrics.selection_metric(config)
  os.makedirs(workdir, exist_ok=True)
  with _signals_seen() as stop_if_signalled:
    for number, point in enumerate(points, 1):
      for seed in point.seeds:
        run_dir = os.path.join(workdir, point.name, f"seed_{seed}")
        if _is_finished(run_dir, point_configs[point.name, seed]):
          print(f"sweep: point {number}/{len(points)} {point.name} seed {seed}: finished, skipped",
                flush=True)
          continue
        print(f"sweep: point {number}/{len(points)} {point.name} seed {seed} -> {run_dir}",
              flush=True)
        state, _ = train.train_and_evaluate(
            point_configs[point.name, seed], run_dir, allow_config_change=allow_config_change
        )
        stop_if_signalled(f"in the last epoch of point {point.name} seed {seed}, which is saved")
        training.after_training(point_configs[point.name, seed], run_dir, state)
      rows, accuracies = summary_rows(workdir, points, metric)
      if parallel.is_main_process():  # Which alone writes the runs' final metrics.
        write_summary(workdir, points, rows, metric, accuracies, title or workdir)
  print(f"sweep: {len(points)} points; summary in {os.path.join(workdir, SUMMARY_MD)}",
        flush=True)
  return rows
