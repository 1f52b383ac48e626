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

Retention keeps the newest `config.keep_checkpoints` and the best by `metrics.selection_metric`.
Everything read back is checked before use: meta (its fields and its digest), the config
(`configs.validate` and its digest), the index of the arrays (its checksums) and every array
against its digest. A checkpoint that fails is damaged: restoring falls back to the next one with
a warning; resuming also moves it to `checkpoints_unreadable/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import checkpoint_managers

from mnist_jax import configs, errors, metrics
from mnist_jax.run import parallel, rundir

_ITEMS = ("state", "meta", "config")


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
  best = lambda metrics: metrics["selection"]
  if keep is None:
    # Not orbax's read_only, which logs a warning; this manager never saves, so never deletes.
    options = ocp.CheckpointManagerOptions(create=False, lightweight_initialize=True)
  else:
    options = ocp.CheckpointManagerOptions(
        best_fn=best,
        best_mode="max",
        # best_fn with max_to_keep alone would delete the newest when worse; resume needs them.
        preservation_policy=checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(get_metric_fn=best, n=1),
        ]),
        # Saves finish before the next epoch donates the state's buffers.
        enable_async_checkpointing=False,
        # Leftovers of killed saves are removed by `TrainingCheckpoints` before the run goes on:
        # orbax's own clean-up would run in a thread of its own until the first save.
        cleanup_tmp_directories=False,
    )
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=_ITEMS, options=options)


def _as_pytree(state: Any) -> dict[str, Any]:
  """What a checkpoint holds of a `train.TrainState`: its arrays, in plain dicts and tuples (or
  their shapes, for a state from `steps.state_shapes`)."""
  step = state.step if isinstance(state.step, jax.ShapeDtypeStruct) else jnp.asarray(state.step)
  return {"params": state.params, "opt_state": state.opt_state, "step": step,
          "dropout_rng": state.dropout_rng}


class _Damaged(Exception):
  """What a checkpoint holds is not what was saved."""


def digests(tree: Any) -> dict[str, str]:
  """SHA-256 of each array of a replicated pytree, over its dtype, shape and bytes, by path."""
  result = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(parallel.local_copy(tree)):
    array = np.ascontiguousarray(leaf)
    head = f"{array.dtype.str}{array.shape}".encode()
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    result[name] = hashlib.sha256(head + array.tobytes()).hexdigest()
  return result


def _json_digest(value: Any) -> str:
  """SHA-256 of a JSON value, independent of key order."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _whole(value: Any, low: int = 1) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _checked_meta(meta: Any) -> dict[str, Any]:
  """The meta item, if it has the fields and types `_save` writes; else `_Damaged`."""

  def need(ok: bool, what: str) -> None:
    if not ok:
      raise _Damaged(f"meta item: {what}")

  need(isinstance(meta, dict), "not a JSON object")
  for field in ("epoch", "steps_per_epoch"):
    need(_whole(meta.get(field)), f"{field} is not a positive whole number")
  dataset = meta.get("dataset")
  need(isinstance(dataset, dict) and isinstance(dataset.get("name"), str)
       and isinstance(dataset.get("image_shape"), list) and len(dataset["image_shape"]) == 3
       and all(_whole(side) for side in dataset["image_shape"])
       and _whole(dataset.get("num_classes"), 2) and isinstance(dataset.get("class_names"), list)
       and len(dataset["class_names"]) == dataset["num_classes"]
       and all(isinstance(name, str) for name in dataset["class_names"]), "dataset is damaged")
  history = meta.get("history")
  need(isinstance(history, list) and history, "history is not a non-empty list")
  for record in history:
    rundir.check_record(record, "its meta item's history")
  need(history[-1]["epoch"] == meta["epoch"], "history does not end at its epoch")
  sha256 = meta.get("sha256", {})
  need(isinstance(sha256, dict) and all(isinstance(v, str) for v in sha256.values()),
       "sha256 is not a table of digests")
  return meta


def _read_items(manager: ocp.CheckpointManager, step: int
                ) -> tuple[dict, dict, ml_collections.ConfigDict]:
  """A step's meta item, its config as saved, and as a checked ConfigDict."""
  saved = manager.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
  )
  meta = _checked_meta(saved.meta)
  if "meta_sha256" in meta and meta["meta_sha256"] != _json_digest(_without_digest(meta)):
    raise _Damaged("meta item differs from its saved digest")
  if not isinstance(saved.config, dict):
    raise _Damaged("config item: not a JSON object")
  if "config_sha256" in meta and meta["config_sha256"] != _json_digest(saved.config):
    raise _Damaged("config item differs from its saved digest")
  config = ml_collections.ConfigDict(saved.config)
  configs.validate(config)
  return meta, saved.config, config.lock()


def _without_digest(meta: dict[str, Any]) -> dict[str, Any]:
  return {key: value for key, value in meta.items() if key != "meta_sha256"}


def _verify(arrays: Any, meta: dict[str, Any]) -> None:
  """`_Damaged` unless every restored array matches the digest saved with it."""
  saved = meta.get("sha256")
  if saved is None:  # Saved before checkpoints had digests: nothing to check against.
    return
  actual = digests(arrays)
  wrong = sorted(path for path in saved.keys() | actual.keys()
                 if saved.get(path) != actual.get(path))
  if wrong:
    raise _Damaged(f"{len(wrong)} array(s) differ from their saved digests: {', '.join(wrong[:3])}")


def _check_array_store(manager: ocp.CheckpointManager, step: int) -> None:
  """`_Damaged` where the index of the state item's arrays (an OCDBT b-tree, each node with its
  own checksum) does not read back whole. Read here in one call, from disk; left to orbax, a node
  that fails some of its many concurrent reads and not others (those served from its cache)
  leaves their errors to be printed when the process exits."""
  state_dir = os.path.join(manager.directory, str(step), "state")
  if not os.path.exists(os.path.join(state_dir, "manifest.ocdbt")):
    return  # Not stored as OCDBT, orbax's default: its own checks alone.
  try:
    store = {"driver": "ocdbt", "base": {"driver": "file", "path": state_dir + "/"}}  # As orbax.
    ts.KvStore.open(store).result().list().result()
  except ValueError as e:  # tensorstore's error for unreadable and corrupt data alike.
    file = re.search(r'local file "([^"]+)"', str(e))
    where = f" in {os.path.relpath(file[1], os.path.dirname(state_dir))}" if file else ""
    what = "fails its checksum" if "checksum" in str(e) else f"cannot be read ({_gist(e)})"
    raise _Damaged(f"the index of its arrays {what}{where}") from None


def _restore_first_valid(
    manager: ocp.CheckpointManager,
    steps: list[int],
    template_fn: Callable[[ml_collections.ConfigDict, dict[str, Any]], Any],
    check_config: Callable[[dict[str, Any]], None] = lambda saved: None,
) -> tuple[Restored, list[int]]:
  """The first of `steps` that restores, and those before it that did not (with a warning each)."""
  failed: list[tuple[int, Exception]] = []
  for step in steps:
    try:
      meta, saved_config, config = _read_items(manager, step)
      check_config(saved_config)
      template = template_fn(config, meta)
      _check_array_store(manager, step)
      arrays = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_as_pytree(template)))
      ).state
      _verify(arrays, meta)
    except CheckpointError:  # Usable, but not as asked.
      raise
    except Exception as e:  # pylint: disable=broad-except  # Damage shows as many error types.
      failed.append((step, e))
      continue
    for bad_step, error in failed:
      print(f"mnist_jax: warning: checkpoint {bad_step} in {manager.directory} cannot be restored "
            f"({_gist(error)}); using checkpoint {step}", file=sys.stderr)
    return Restored(step, template.replace(**arrays), meta, config), [bad for bad, _ in failed]
  reasons = "; ".join(f"checkpoint {s}: {_gist(e)}" for s, e in failed)
  raise CheckpointError(
      f"no checkpoint in {manager.directory} can be restored ({reasons}); "
      f"fix or move that directory away to start again"
  )


def _gist(error: Exception) -> str:
  if isinstance(error, _Damaged):
    return str(error)
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _os_reason(error: Exception) -> str:
  """The operating system's words for an orbax error that wraps one ("No space left on
  device"), else the error's gist."""
  code = re.search(r"os_error_code='(\d+)'", str(error))
  if code:
    return os.strerror(int(code.group(1)))
  return error.strerror if isinstance(error, OSError) and error.strerror else _gist(error)


def _selection(manager: ocp.CheckpointManager, step: int) -> float:
  """The metric that ranks `step`, as its checked meta item records it (NaN ranks last)."""
  meta, _, config = _read_items(manager, step)
  value = float(meta["history"][-1][metrics.selection_metric(config)])
  return value if math.isfinite(value) else -math.inf


def restore(
    workdir: str,
    template_fn: Callable[[ml_collections.ConfigDict, dict[str, Any]], Any],
    which: str = "best",
) -> Restored:
  """Restores the `which` checkpoint of `workdir` for use: "best", "latest" or a step number.

  `template_fn(config, meta)` builds a state like the saved one (the shapes to restore into).
  Where it cannot be restored, "best" falls back to the next best, "latest" to the next newest,
  with a warning.
  """
  with _manager(workdir) as manager:
    steps = list(manager.all_steps())
    if not steps:
      raise CheckpointError(f"no checkpoints in {manager.directory}; train with this --workdir first")
    if which == "best":
      ranks = {}
      for step in steps:
        try:
          ranks[step] = (_selection(manager, step), step)
        except Exception as e:  # pylint: disable=broad-except  # Damage shows as many error types.
          print(f"mnist_jax: warning: checkpoint {step} in {manager.directory} cannot be restored "
                f"({_gist(e)}); leaving it out", file=sys.stderr)
          ranks[step] = (-math.inf, -1)  # Tried last, so that the error names it.
      candidates = sorted(steps, key=ranks.get, reverse=True)
    elif which == "latest":
      candidates = sorted(steps, reverse=True)
    elif which.isdigit() and int(which) in steps:
      candidates = [int(which)]
    else:
      raise CheckpointError(f"--checkpoint={which} is not 'best', 'latest' or one of the steps {steps}")
    return _restore_first_valid(manager, candidates, template_fn)[0]


def _steps_with_damaged_metrics(workdir: str) -> list[int]:
  """Steps whose orbax metrics item is not `{"selection": <number>, ...}`."""
  damaged = []
  directory = checkpoint_dir(workdir)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  for step in sorted(int(name) for name in names if name.isdigit()):
    try:
      with open(os.path.join(directory, str(step), "metrics", "metrics"), encoding="utf-8") as f:
        selection = json.load(f)["selection"]
    except (OSError, ValueError, TypeError, KeyError):
      selection = None
    if not isinstance(selection, float | int) or isinstance(selection, bool):
      damaged.append(step)
  return damaged


def _remove_unfinished_saves(workdir: str, step: int | None = None) -> None:
  """Removes what saves that never finished left (of `step`, or of every step): orbax never lists
  them, and only the holder of the workdir's lock writes checkpoints."""
  directory = checkpoint_dir(workdir)
  pattern = rf"{'[0-9]+' if step is None else step}\.orbax-checkpoint-tmp.*"
  for name in os.listdir(directory) if os.path.isdir(directory) else []:
    if re.fullmatch(pattern, name):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _set_aside(workdir: str, step: int) -> None:
  """Moves a damaged checkpoint out of orbax's sight, keeping it for inspection."""
  aside = os.path.join(workdir, rundir.UNREADABLE_CHECKPOINTS, str(step))
  os.makedirs(os.path.dirname(aside), exist_ok=True)
  shutil.move(os.path.join(checkpoint_dir(workdir), str(step)), aside)
  print(f"mnist_jax: warning: moved unreadable checkpoint {step} to {aside}", file=sys.stderr)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """Holds an exclusive flock on `<workdir>/train.lock`; the kernel releases it if we die."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, rundir.TRAIN_LOCK)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise CheckpointError(
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


class TrainingCheckpoints:
  """The checkpoints of one training run: resume, per-epoch saves, and a clean stop on signals.

  Use as a context manager around the whole run: it locks the workdir against a second run,
  and turns the first SIGINT or SIGTERM into a stop at the end of the current epoch (a second
  one interrupts at once; the last good checkpoint stays either way).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               allow_config_change: bool = False):
    self.every = config.get("checkpoint_every_epochs", 1)
    self.keep = config.get("keep_checkpoints", 3)
    if self.every <= 0 or self.keep <= 0:
      raise CheckpointError(
          f"config.checkpoint_every_epochs ({self.every}) and config.keep_checkpoints "
          f"({self.keep}) must be positive"
      )
    self.workdir = workdir
    self.config = config
    self.allow_config_change = allow_config_change
    self.meta: dict[str, Any] = {}
    self._stop_signal: int | None = None
    self._stack = contextlib.ExitStack()
    self._manager: ocp.CheckpointManager | None = None

  def __enter__(self) -> TrainingCheckpoints:
    if jax.process_index() == 0:  # The other processes of a multi-host run share the workdir.
      self._stack.enter_context(_workdir_lock(self.workdir))
      _remove_unfinished_saves(self.workdir)
    for step in _steps_with_damaged_metrics(self.workdir):  # orbax would fail on them.
      _set_aside(self.workdir, step)
    self._manager = self._stack.enter_context(_manager(self.workdir, self.keep))
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.signal(signum, self._on_signal)
        self._stack.callback(signal.signal, signum, previous)
    return self

  def __exit__(self, *exc_info) -> None:
    self._stack.close()

  def _on_signal(self, signum: int, frame) -> None:
    del frame
    self._stop_signal = signum
    for other in (signal.SIGINT, signal.SIGTERM):  # A second signal interrupts at once.
      signal.signal(other, signal.SIG_DFL if other == signal.SIGTERM else signal.default_int_handler)

  def resume(self, state: Any, meta: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """The latest good checkpoint's state and metrics history, or `(state, [])` when none.

    `meta` (steps per epoch, dataset) is stored with each save. Refuses a checkpoint trained with
    a different config unless `allow_config_change`, and one beyond `config.num_epochs`.
    """
    self.meta = dict(meta)
    steps = self._manager.all_steps()
    if not steps:
      return state, []
    restored, bad_steps = _restore_first_valid(
        self._manager, sorted(steps, reverse=True), lambda config, meta: state, self._check_config
    )
    # Newer damaged steps would collide with the steps about to be saved; keep them aside.
    for step in bad_steps:
      _set_aside(self.workdir, step)
    if bad_steps:
      self._manager.reload()
    epoch = restored.meta["epoch"]
    if epoch > self.config.num_epochs:
      raise CheckpointError(
          f"{self.workdir} holds a checkpoint of epoch {epoch}, beyond config.num_epochs="
          f"{self.config.num_epochs}; raise num_epochs or use another --workdir"
      )
    print(f"resuming from checkpoint {restored.step} (epoch {epoch}) in {self.workdir}", flush=True)
    return restored.state, list(restored.meta["history"])

  def _check_config(self, saved: dict[str, Any]) -> None:
    changed = configs.config_changes(saved, self.config)
    if changed and not self.allow_config_change:
      raise CheckpointError(
          f"{self.workdir} was trained with a different config (changed: {', '.join(changed)}); "
          f"use the same config, another --workdir, or --allow_config_change to continue anyway"
      )

  def end_of_epoch(self, state: Any, history: list[dict[str, Any]], *, last: bool = False) -> None:
    """Saves after the epoch of `history[-1]` when due; after a signal, saves and raises `Stopped`.

    The last epoch (`config.num_epochs`, or `last` when training stops early) always saves; a
    signal during it lets the run end normally.
    """
    epoch = history[-1]["epoch"]
    last = last or epoch == self.config.num_epochs
    # Every process of a multi-host run stops after the same epoch, whichever had the signal.
    signum = self._stop_signal or signal.SIGTERM
    stop = parallel.any_process(self._stop_signal is not None)
    if last or epoch % self.every == 0 or stop:
      self._save(state, history)
    if stop and not last:
      raise Stopped(
          f"stopped by {signal.Signals(signum).name} after epoch {epoch}; checkpoint "
          f"{int(state.step)} saved in {checkpoint_dir(self.workdir)}", signum,
      )

  def _save(self, state: Any, history: list[dict[str, Any]]) -> None:
    metric = metrics.selection_metric(self.config)
    config = rundir.config_dict(self.config)
    meta = {**self.meta, "epoch": history[-1]["epoch"], "history": history,
            "sha256": digests(_as_pytree(state)), "config_sha256": _json_digest(config)}
    # A changed number in the history (which ranks "best") still reads as a valid meta item.
    meta["meta_sha256"] = _json_digest(meta)
    step = int(state.step)
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(_as_pytree(state)),
              meta=ocp.args.JsonSave(meta),
              config=ocp.args.JsonSave(config),
          ),
          metrics={"selection": history[-1][metric], metric: history[-1][metric]},
      )
    except Exception as e:  # pylint: disable=broad-except  # orbax raises ValueError for OS errors.
      _remove_unfinished_saves(self.workdir, step)
      directory = checkpoint_dir(self.workdir)
      last = self._manager.latest_step()
      raise CheckpointError(
          f"checkpoint {step} could not be written to {directory} ({_os_reason(e)}); "
          + (f"the last good one is {last}, where the same command resumes" if last is not None
             else "there is no earlier checkpoint")
      ) from None
