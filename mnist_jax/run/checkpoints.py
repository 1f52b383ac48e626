"""Owns orbax: checkpoints in `<workdir>/checkpoints/`, their retention, resuming, and restoring.

Each checkpoint is one orbax step directory, `checkpoints/<step>/` (`step`: training steps done),
written by `ocp.CheckpointManager` (atomically: a half-written step is never listed), with items

  state    `{"params", "opt_state", "step", "dropout_rng"}`, orbax's StandardSave
  meta     JSON: `epoch`, `steps_per_epoch`, `dataset` (what predict needs), `history`, the
           metrics record of every epoch so far (metrics.jsonl is rewritten from it on resume),
           `sha256`, a digest of every array of `state`, `config_sha256`, of the config item, and
           `meta_sha256`, of the meta item's other fields
  config   JSON: the config the state was trained with
  metrics  orbax's own: `{"selection": value, <metric name>: value}`, for its retention

Retention keeps the newest `config.keep_checkpoints` and the best by the selection metric.
Everything read back is checked before use (integrity.py). A checkpoint that fails is damaged:
restoring falls back to the next one with a warning; resuming also moves it to
`checkpoints_unreadable/` (guard.py, which also holds the workdir's lock and the signals).
The callers (train.py, studies/predict.py) pass what this layer is not to know: how an epoch
record is checked, which of its fields ranks checkpoints, and which config fields changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections

from mnist_jax import errors
from mnist_jax.run import guard, integrity, parallel, rundir

if TYPE_CHECKING:
  import orbax.checkpoint as ocp

_ITEMS = ("state", "meta", "config")

CheckRecord = Callable[[Any], Any]  # An epoch record -> itself, or ValueError saying what is wrong.
TemplateFn = Callable[[ml_collections.ConfigDict, dict[str, Any]], Any]


def _orbax():
  """orbax.checkpoint, imported where first used: a run that starts without checkpoints imports it
  while it trains (`TrainingCheckpoints.resume`), on the cores training leaves idle."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp


def _import_quietly() -> None:
  with contextlib.suppress(Exception):  # A failure is raised again where orbax is first used.
    _orbax()


# A copy of a state in new buffers, as one program: leaf by leaf, each shape compiles its own.
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


class CheckpointError(errors.UserError):
  """Checkpoints that cannot be used as asked, with a message that says what to do."""


class Stopped(Exception):
  """Training stopped at an epoch boundary on SIGINT or SIGTERM, its checkpoint saved."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


@dataclasses.dataclass(frozen=True)
class Restored:
  """One restored checkpoint: its orbax step, the state, its meta item and its config."""

  step: int
  state: Any
  meta: dict[str, Any]
  config: ml_collections.ConfigDict


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), rundir.CHECKPOINTS)


def _manager(workdir: str, keep: int | None = None) -> ocp.CheckpointManager:
  """orbax's manager for `workdir`; for reading only unless `keep` (the newest to keep).

  The reading manager never reads orbax's metrics item: "best" is ranked from the checked meta
  item instead (see `restore`).
  """
  ocp = _orbax()
  best = lambda metrics: metrics["selection"]
  if keep is None:
    # Not orbax's read_only, which logs a warning; this manager never saves, so never deletes.
    options = ocp.CheckpointManagerOptions(create=False, lightweight_initialize=True)
  else:
    options = ocp.CheckpointManagerOptions(
        best_fn=best,
        best_mode="max",
        # best_fn with max_to_keep alone would delete the newest when worse; resume needs them.
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=best, n=1),
        ]),
        # Saves finish before the next epoch donates the state's buffers.
        enable_async_checkpointing=False,
        # Leftovers of killed saves are removed by `TrainingCheckpoints` before the run goes on:
        # orbax's own clean-up would run in a thread of its own until the first save.
        cleanup_tmp_directories=False,
    )
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=_ITEMS, options=options)


def _as_pytree(state: Any) -> dict[str, Any]:
  """What a checkpoint holds of a `steps.TrainState`: its arrays, in plain dicts and tuples (or
  their shapes, for a state from `steps.state_shapes`)."""
  step = state.step if isinstance(state.step, jax.ShapeDtypeStruct) else jnp.asarray(state.step)
  return {"params": state.params, "opt_state": state.opt_state, "step": step,
          "dropout_rng": state.dropout_rng}


def _read_items(manager: ocp.CheckpointManager, step: int, check_record: CheckRecord
                ) -> tuple[dict, dict, ml_collections.ConfigDict]:
  """A step's checked meta item, its config as saved, and as a ConfigDict."""
  ocp = _orbax()
  saved = manager.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
  )
  integrity.check_items(step, saved.meta, saved.config, check_record)
  return saved.meta, saved.config, ml_collections.ConfigDict(saved.config).lock()


def _restore_step(manager: ocp.CheckpointManager, step: int, template_fn: TemplateFn,
                  check_record: CheckRecord, check_config: Callable[[dict[str, Any]], None]
                  ) -> Restored:
  """Checkpoint `step`, every part checked (`integrity.Damaged` or a library's error if not)."""
  meta, saved_config, config = _read_items(manager, step, check_record)
  check_config(saved_config)
  template = template_fn(config, meta)
  state_dir = os.path.join(manager.directory, str(step), "state")
  integrity.check_array_store(state_dir)
  integrity.check_fits(state_dir, _as_pytree(template))
  ocp = _orbax()
  arrays = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_as_pytree(template)))
  ).state
  integrity.verify(step, arrays, meta)
  return Restored(step, template.replace(**arrays), meta, config)


def _warn(directory: str, step: int, error: BaseException, outcome: str) -> None:
  print(f"mnist_jax: warning: checkpoint {step} in {directory} cannot be restored "
        f"({integrity.describe(error)}); {outcome}", file=sys.stderr)


def _restore_first_valid(manager: ocp.CheckpointManager, steps: list[int],
                         restore_step: Callable[[int], Restored]) -> tuple[Restored, list[int]]:
  """The first of `steps` that restores, and those before it that did not (with a warning each)."""
  failed: list[tuple[int, Exception]] = []
  for step in steps:
    try:
      restored = restore_step(step)
    except CheckpointError:  # Usable, but not as asked.
      raise
    except Exception as e:  # pylint: disable=broad-except  # Damage shows as many error types.
      failed.append((step, e))
      continue
    for bad_step, error in failed:
      _warn(manager.directory, bad_step, error, f"using checkpoint {step}")
    return restored, [bad for bad, _ in failed]
  reasons = "; ".join(f"checkpoint {s}: {integrity.describe(e)}" for s, e in failed)
  raise CheckpointError(
      f"no checkpoint in {manager.directory} can be restored ({reasons}); "
      f"fix or move that directory away to start again"
  )


def restore(
    workdir: str,
    template_fn: TemplateFn,
    which: str = "best",
    *,
    check_record: CheckRecord,
    selection_metric: Callable[[Mapping[str, Any]], str],
) -> Restored:
  """Restores the `which` checkpoint of `workdir` for use: "best", "latest" or a step number.

  `template_fn(config, meta)` builds a state like the saved one (the shapes to restore into),
  raising where the saved config cannot build one. "best" ranks by the field
  `selection_metric(config)` of each checkpoint's last epoch record. Where a checkpoint cannot
  be restored, "best" falls back to the next best, "latest" to the next newest, with a warning.
  """
  with _manager(workdir) as manager:
    steps = list(manager.all_steps())
    if not steps:
      raise CheckpointError(f"no checkpoints in {manager.directory}; train with this --workdir first")
    if which == "best":
      ranks = {}
      for step in steps:
        try:
          meta, _, config = _read_items(manager, step, check_record)
          value = float(meta["history"][-1][selection_metric(config)])
          ranks[step] = (value if math.isfinite(value) else -math.inf, step)  # NaN ranks last.
        except Exception as e:  # pylint: disable=broad-except  # Damage shows as many error types.
          _warn(manager.directory, step, e, "leaving it out")
          ranks[step] = (-math.inf, -1)  # Tried last, so that the error names it.
      candidates = sorted(steps, key=ranks.get, reverse=True)
    elif which == "latest":
      candidates = sorted(steps, reverse=True)
    elif which.isdigit() and int(which) in steps:
      candidates = [int(which)]
    else:
      raise CheckpointError(f"--checkpoint={which} is not 'best', 'latest' or one of the steps {steps}")
    restore_step = lambda step: _restore_step(manager, step, template_fn, check_record,
                                              lambda saved: None)
    return _restore_first_valid(manager, candidates, restore_step)[0]


class TrainingCheckpoints:
  """The checkpoints of one training run: resume, per-epoch saves, and a clean stop on signals.

  Use as a context manager around the whole run: it locks the workdir against a second run,
  and turns the first SIGINT or SIGTERM into a stop at the end of the current epoch (a second
  one interrupts at once; the last good checkpoint stays either way).

  Args:
    workdir: the run's directory; checkpoints go to its `checkpoints/`.
    config: the run's config (`num_epochs`, `checkpoint_every_epochs`, `checkpoint_interval_s`,
      `keep_checkpoints`).
    selection_metric: the record field that ranks checkpoints for retention.
    check_record: raises `ValueError` on a damaged epoch record (`metrics.check_record`).
    config_changes: the fields a saved config (a dict) differs from `config` in, as far as they
      change what is trained; a resume refuses any unless `allow_config_change`.
    clock: seconds, for `config.checkpoint_interval_s`.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, selection_metric: str,
               check_record: CheckRecord, config_changes: Callable[[dict[str, Any]], list[str]],
               allow_config_change: bool = False, clock: Callable[[], float] = time.monotonic):
    self.every = config.get("checkpoint_every_epochs", 1)
    self.interval_s = config.get("checkpoint_interval_s", 0.0)
    self.keep = config.get("keep_checkpoints", 3)
    if self.every <= 0 or self.keep <= 0:
      raise CheckpointError(
          f"config.checkpoint_every_epochs ({self.every}) and config.keep_checkpoints "
          f"({self.keep}) must be positive"
      )
    self.workdir, self.num_epochs = workdir, config.num_epochs
    self.config = rundir.config_dict(config)
    self.selection_metric, self.check_record = selection_metric, check_record
    self.config_changes, self.allow_config_change = config_changes, allow_config_change
    self.meta: dict[str, Any] = {}
    self._stack = contextlib.ExitStack()
    self._signals = guard.StopSignals()
    self._manager: ocp.CheckpointManager | None = None
    self._clock = clock
    self._saved_at = clock()  # The start counts as a save: the first waits as long.
    self._best = -math.inf  # The best selection metric of the epochs saved or copied.
    self._unsaved_best: tuple[Any, list[dict[str, Any]]] | None = None

  def __enter__(self) -> TrainingCheckpoints:
    if parallel.is_main_process():  # The other processes of a multi-host run share the workdir.
      self._stack.enter_context(guard.lock_workdir(self.workdir))
      guard.remove_unfinished_saves(self.workdir)
    directory = checkpoint_dir(self.workdir)
    for step in integrity.steps_with_damaged_metrics(directory):
      guard.set_aside(self.workdir, step)  # orbax's retention would fail on them.
    # Without checkpoints, one process opens orbax's manager at its first save. The processes of
    # a multi-host run open theirs together, as orbax synchronizes them.
    if jax.process_count() > 1 or (os.path.isdir(directory) and os.listdir(directory)):
      self._open_manager()
    self._stack.enter_context(self._signals)
    return self

  def _open_manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = self._stack.enter_context(_manager(self.workdir, self.keep))
    return self._manager

  def __exit__(self, *exc_info) -> None:
    self._stack.close()

  def resume(self, state: Any, meta: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """The latest good checkpoint's state and metrics history, or `(state, [])` when none.

    `meta` (steps per epoch, dataset) is stored with each save. Refuses a checkpoint trained with
    a different config unless `allow_config_change`, and one beyond `config.num_epochs`. Sets
    every damaged checkpoint aside: the newer ones, which would collide with the steps about to be
    saved, and the older ones whose items fail their checks (the arrays of those are not read).
    """
    self.meta = dict(meta)
    if self._manager is None:  # No checkpoints: orbax is imported while the epochs train.
      threading.Thread(target=_import_quietly, daemon=True).start()
      return state, []
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return state, []
    restored, bad_steps = _restore_first_valid(
        self._manager, steps, lambda step: _restore_step(
            self._manager, step, lambda config, meta: state, self.check_record, self._check_config))
    for step in steps[len(bad_steps) + 1:]:
      try:
        _read_items(self._manager, step, self.check_record)
      except Exception as e:  # pylint: disable=broad-except  # Damage shows as many error types.
        _warn(self._manager.directory, step, e, "setting it aside")
        bad_steps.append(step)
    for step in bad_steps:
      guard.set_aside(self.workdir, step)
    if bad_steps:
      self._manager.reload()
    epoch = restored.meta["epoch"]
    if epoch > self.num_epochs:
      raise CheckpointError(
          f"{self.workdir} holds a checkpoint of epoch {epoch}, beyond config.num_epochs="
          f"{self.num_epochs}; raise num_epochs or use another --workdir"
      )
    history = list(restored.meta["history"])
    saved = set(self._manager.all_steps())
    self._best = max((record[self.selection_metric] for record in history
                      if record["step"] in saved), default=-math.inf)
    if parallel.is_main_process():  # One line for all the processes of a multi-host run.
      print(f"resuming from checkpoint {restored.step} (epoch {epoch}) in {self.workdir}",
            flush=True)
    return restored.state, history

  def _check_config(self, saved: dict[str, Any]) -> None:
    changed = self.config_changes(saved)
    if changed and not self.allow_config_change:
      raise CheckpointError(
          f"{self.workdir} was trained with a different config (changed: {', '.join(changed)}); "
          f"use the same config, another --workdir, or --allow_config_change to continue anyway"
      )

  def end_of_epoch(self, state: Any, history: list[dict[str, Any]], *, last: bool = False) -> None:
    """Saves after the epoch of `history[-1]` when due; after a signal, saves and raises `Stopped`.

    Due: every `config.checkpoint_every_epochs` epochs, once `config.checkpoint_interval_s` have
    passed since the last save. The last epoch (`config.num_epochs`, or `last` when training
    stops early) always saves; a signal during it lets the run end normally. An epoch that the
    interval alone holds back, better by the selection metric than every one saved, is copied
    and saved before the next save: retention keeps the same best as without an interval.
    """
    epoch, value = history[-1]["epoch"], history[-1][self.selection_metric]
    last = last or epoch == self.num_epochs
    stop = self._signals.received
    scheduled = epoch % self.every == 0  # Due without an interval.
    due = scheduled and self._clock() - self._saved_at >= self.interval_s
    # Every process of a multi-host run stops and saves after the same epochs, whichever had the
    # signal or saw the time pass.
    stop_anywhere, due = parallel.any_process([stop is not None, due])
    if stop_anywhere and stop is None:
      stop = signal.SIGTERM
    improved = scheduled and value > self._best
    if improved or last or stop is not None:
      self._best = max(self._best, value)
    if last or due or stop is not None:
      if self._unsaved_best is not None and not improved:
        self._save(*self._unsaved_best)
      self._unsaved_best = None
      self._save(state, history)
    elif improved:  # Copied: the next epoch's step reuses the state's buffers.
      self._unsaved_best = _copy(state), list(history)
    if stop is not None and not last:
      raise Stopped(
          f"stopped by {signal.Signals(stop).name} after epoch {epoch}; checkpoint "
          f"{int(state.step)} saved in {checkpoint_dir(self.workdir)}", stop,
      )

  def _save(self, state: Any, history: list[dict[str, Any]]) -> None:
    """Saves checkpoint `state.step`, or raises `CheckpointError`: never skips it silently."""
    step, directory = int(state.step), checkpoint_dir(self.workdir)
    manager = self._open_manager()
    latest = manager.latest_step()
    if latest is not None and latest >= step:  # orbax would skip the save and return False.
      raise CheckpointError(
          f"checkpoint {step} cannot be written to {directory}, which already holds checkpoint "
          f"{latest}; move that directory away or use another --workdir"
      )
    metric = self.selection_metric
    meta = integrity.sealed({
        **self.meta, "epoch": history[-1]["epoch"], "history": history,
        "sha256": integrity.digests(_as_pytree(state)),
        "config_sha256": integrity.json_digest(self.config)})
    ocp = _orbax()
    try:
      saved = manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(_as_pytree(state)),
              meta=ocp.args.JsonSave(meta),
              config=ocp.args.JsonSave(self.config),
          ),
          metrics={"selection": history[-1][metric], metric: history[-1][metric]},
      )
      reason = None if saved else "orbax skipped it"
    except Exception as e:  # pylint: disable=broad-except  # orbax raises ValueError for OS errors.
      guard.remove_unfinished_saves(self.workdir, step)
      reason = integrity.os_reason(e)
    if reason is not None:
      last = manager.latest_step()
      raise CheckpointError(
          f"checkpoint {step} could not be written to {directory} ({reason}); "
          + (f"the last good one is {last}, where the same command resumes" if last is not None
             else "there is no earlier checkpoint")
      ) from None
    self._saved_at = self._clock()
