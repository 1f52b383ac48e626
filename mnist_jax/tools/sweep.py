"""Hyper-parameter sweeps: the points of an experiment file, each trained into its own workdir.

An experiment file that defines `get_sweep(arg=None)` can be swept:

  python -m mnist_jax.main --mode=sweep --config=experiments/lr_batch_sweep.py --workdir=runs/lr

`get_sweep` returns a list of overrides, each a dict of dotted config field -> value applied to
`get_config(arg)` (after any `--config.*` flags). Overrides that differ only in `seed` are the
seeds of one point. Each seed of a point trains with `train.train_and_evaluate` into
`<workdir>/<point>/seed_<seed>/`, where `<point>` is made from the overrides, e.g.
`learning_rate=0.001,batch_size=32`, and then draws its report. A seed that is finished,
everything its run writes there (`unfinished`), is not trained again; any other resumes from its
checkpoints, so a killed, preempted or requeued sweep goes on where it stopped. After each run,
`<workdir>/sweep_summary.md` and `sweep_summary.csv` rank the finished points by
`metrics.selection_metric(config)`, mean and standard deviation over seeds, with a column for
every evaluated split's accuracy. With `config.num_seeds` > 1 each run trains several seeds at
once and every one of them counts.

A scheduler fans a sweep out: each of its tasks runs the same command with a `Share` of the runs
(`--sweep_shard=i/n`, or a SLURM array task's own), and every task's summary covers all runs
finished so far, whichever task writes it last. The scheduler decides what runs where and when;
this module only picks a task's runs and writes whole files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import re
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

from mnist_jax import configs, errors, metrics, train
from mnist_jax.report import training
from mnist_jax.run import checkpoints, parallel, rundir
from mnist_jax.tools import shares, sweep_tables

Overrides = dict[str, Any]

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


@dataclasses.dataclass(frozen=True)
class Run:
  """One seed of one point: its directory (relative to the sweep's workdir) and config."""

  point: Point
  number: int  # The point's, from 1.
  seed: int
  config: ml_collections.ConfigDict

  @property
  def name(self) -> str:
    return os.path.join(self.point.name, f"seed_{self.seed}")


def sweep_runs(config: ml_collections.ConfigDict, points: Sequence[Point]) -> list[Run]:
  """Every seed of every point, in order, its config checked (a bad point fails at once)."""
  return [Run(point, number, seed, point_config(config, {**point.overrides, "seed": seed}))
          for number, point in enumerate(points, 1) for seed in point.seeds]


def unfinished(run_dir: str, config: ml_collections.ConfigDict) -> str | None:
  """None when `run_dir` holds a finished run of `config`, else what is missing, in a few words.

  A run is finished when everything it writes is there: `config.json` (this config),
  `final_metrics.json` (readable, and not older than the config: training writes the config when
  it starts and the final metrics when it ends, so older final metrics are those of an earlier,
  shorter run), then `predictions.npz` and `report.md`, each not older than the final metrics.
  """
  try:
    if rundir.read_config(run_dir) != rundir.config_dict(config):
      return f"{rundir.CONFIG} is of another config"
  except rundir.RunFileError:
    return "not trained"
  path = lambda name: os.path.join(run_dir, name)
  try:
    final_time = os.path.getmtime(path(rundir.FINAL_METRICS))
  except OSError:
    return "not finished"
  if final_time < os.path.getmtime(path(rundir.CONFIG)):
    return f"{rundir.FINAL_METRICS} is older than {rundir.CONFIG}"
  try:
    rundir.read_final(run_dir, metrics.check_record)
  except rundir.RunFileError as e:
    return str(e)
  for name in (rundir.PREDICTIONS, rundir.REPORT):
    try:
      if os.path.getmtime(path(name)) < final_time:
        return f"{name} is older than {rundir.FINAL_METRICS}"
    except OSError:
      return f"no {name}"
  return None


def seed_results(workdir: str, runs: Sequence[Run]) -> list[dict[str, Any]] | None:
  """The final metrics of every model of a point's runs, or None while any is unfinished.

  A run with `config.num_seeds` > 1 trained several models in one program: its
  `final_metrics.json` holds `<name>_per_seed` lists, one value per model; the run's own numbers
  (`train_time_s`) go with each of its models.
  """
  results = []
  for run in runs:
    run_dir = os.path.join(workdir, run.name)
    if unfinished(run_dir, run.config) is not None:
      return None
    final = rundir.read_final(run_dir, metrics.check_record)
    per_seed = {key[:-len("_per_seed")]: values for key, values in final.items()
                if key.endswith("_per_seed")}
    num_models = len(next(iter(per_seed.values()), [None]))
    results += [{**final, **{name: values[i] for name, values in per_seed.items()}}
                for i in range(num_models)]
  return results


def summary_rows(workdir: str, points: Sequence[Point], runs: Sequence[Run], metric: str
                 ) -> tuple[list[dict[str, Any]], list[str]]:
  """One row per finished point, best `metric` first, and the accuracies the rows hold."""
  rows, accuracies = [], [metric]
  for point in points:
    results = seed_results(workdir, [run for run in runs if run.point.name == point.name])
    if results is not None:
      accuracies = metrics.ranking_fields(results)
      rows.append({"point": point.name, **point.overrides, "seeds": len(results),
                   **sweep_tables.aggregate(results, [*accuracies, "train_time_s"])})
  return sorted(rows, key=lambda row: (-row[f"{metric}_mean"], row["point"])), accuracies


def write_summary(workdir: str, points: Sequence[Point], runs: Sequence[Run], metric: str,
                  title: str) -> list[dict[str, Any]]:
  """Writes the summary of every run finished in `workdir`; returns its rows.

  Several processes may sweep one workdir, each its share: each writes the summary after each of
  its runs, whole (rundir.write_text). Whichever writes last must not leave out a run that
  another finished meanwhile, so the summary is read again after it is written until it holds
  every finished run: runs only ever become finished, and each process's last summary comes
  after its own runs finished.
  """
  written = None
  while True:
    rows, accuracies = summary_rows(workdir, points, runs, metric)
    texts = sweep_tables.summary_texts(points, rows, metric, accuracies, title)
    if texts == written:
      return rows
    for name, text in texts.items():
      rundir.write_text(os.path.join(workdir, name), text)
    written = texts


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
    share: shares.Share = shares.Share(),
) -> list[dict[str, Any]]:
  """Trains every unfinished seed of every point in `share`; returns the summary's rows.

  Every point's config is checked before anything trains, so a bad point fails at once. A seed
  that is not finished (see `unfinished`) trains, resuming from its checkpoints where it has
  any, and draws its report.
  """
  points = group_points(sweep, config.seed)
  runs = sweep_runs(config, points)
  mine = runs[share.index::share.count]
  metric = metrics.selection_metric(config)
  writes = parallel.is_main_process()  # Which alone writes the runs' final metrics and lines.
  say = functools.partial(print, flush=True) if writes else lambda line: None
  if share.count > 1:
    say(f"sweep: share {share}: {len(mine)} of the {len(runs)} runs")
  os.makedirs(workdir, exist_ok=True)
  with _signals_seen() as stop_if_signalled:
    for run in mine:
      run_dir = os.path.join(workdir, run.name)
      where = f"sweep: point {run.number}/{len(points)} {run.point.name} seed {run.seed}"
      reason = unfinished(run_dir, run.config)
      if reason is None:
        say(f"{where}: finished, skipped")
        continue
      if _unreadable_final(run_dir, reason):
        say(f"{where}: {reason}; training it again, from its checkpoints")
      say(f"{where} -> {run_dir}")
      state, _ = train.train_and_evaluate(run.config, run_dir,
                                          allow_config_change=allow_config_change)
      stop_if_signalled(f"in the last epoch of point {run.point.name} seed {run.seed}, which is "
                        "saved")
      training.after_training(run.config, run_dir, state)
      if writes:
        write_summary(workdir, points, runs, metric, title or workdir)
  rows = (write_summary(workdir, points, runs, metric, title or workdir) if writes
          else summary_rows(workdir, points, runs, metric)[0])
  if writes:
    _report_damaged(workdir, runs, share)
  say(f"sweep: {len(rows)} of {len(points)} points finished; summary in "
      f"{os.path.join(workdir, sweep_tables.SUMMARY_MD)}")
  return rows


def _report_damaged(workdir: str, runs: Sequence[Run], share: shares.Share) -> None:
  """One line for each run of another share whose final metrics cannot be read."""
  for position, run in enumerate(runs):
    run_dir = os.path.join(workdir, run.name)
    if position % share.count != share.index and _unreadable_final(
        run_dir, reason := unfinished(run_dir, run.config)):
      print(f"sweep: {reason}; run share {position % share.count}/{share.count} of this sweep "
            "again (--sweep_shard, or its array task) to train it again", flush=True)


def _unreadable_final(run_dir: str, reason: str | None) -> bool:
  """Whether `unfinished` found the run's final metrics there but could not read them."""
  return reason is not None and reason.startswith(os.path.join(run_dir, rundir.FINAL_METRICS))
