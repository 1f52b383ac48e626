"""Experiment files and the checks every config passes before any work starts.

An experiment file defines `get_config(arg=None)`; one that builds on another loads it by path
(`configs.sibling(__file__, "seed_mlp")`), so configs load from any current directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
from typing import Any

import ml_collections

from mnist_jax import augment, errors, models, optimizers
from mnist_jax.run import rundir

INPUT_PIPELINES = ("device", "stream")


class ConfigError(errors.UserError):
  """A config value that cannot work, with a message that says which and why."""


def load_module(path: str) -> types.ModuleType:
  """The Python file at `path`, loaded as a module of its own (no `sys.path` needed)."""
  name = "mnist_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise ConfigError(f"{path} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(this_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the experiment file `<name>.py` in the directory of `this_file`."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
                     ).get_config(arg)


@dataclasses.dataclass(frozen=True)
class Range:
  """The numbers a field may hold: `low <= x <= high` (`<` where open), finite, whole if `integer`."""

  low: float
  high: float
  integer: bool = False
  low_open: bool = False
  high_open: bool = False

  def __contains__(self, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return False
    if self.integer and value != int(value):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def __str__(self) -> str:
    kind = "a whole number" if self.integer else "a finite number"
    bound = lambda x: f"{x:,}" if float(x).is_integer() else f"{x:g}"
    return (f"{kind} in {'(' if self.low_open else '['}{bound(self.low)}, {bound(self.high)}"
            f"{')' if self.high_open else ']'}")


_INT32 = 2**31 - 1
# Every numeric field and what it may hold. A list field (`model_args.hidden_sizes`) holds
# numbers of its range. Fields a config lacks are skipped: an experiment need not have them all.
RANGES = {
    "pixel_mean": Range(-1, 1),  # Pixels are divided by 255 first: they lie in [0, 1].
    "pixel_std": Range(0.01, 10),
    "learning_rate": Range(0, 10, low_open=True),
    "weight_decay": Range(0, 1),
    "momentum": Range(0, 1, high_open=True),
    "batch_size": Range(1, 2**20, integer=True),
    "eval_batch_size": Range(1, 2**20, integer=True),
    "num_epochs": Range(0, 100_000, integer=True),
    "seed": Range(0, _INT32, integer=True),
    "num_seeds": Range(1, 1024, integer=True),
    "validation_fraction": Range(0, 1, high_open=True),
    "early_stopping_patience": Range(0, 100_000, integer=True),
    "augment_shift": Range(0, 16, integer=True),
    "augment_rotate_degrees": Range(0, 180),
    "augment_scale": Range(0, 1, high_open=True),
    "checkpoint_every_epochs": Range(1, 100_000, integer=True),
    "keep_checkpoints": Range(1, 10_000, integer=True),
    "model_args.hidden_sizes": Range(1, 2**16, integer=True),
    "model_args.features": Range(1, 2**12, integer=True),
    "model_args.dense_size": Range(1, 2**16, integer=True),
    "model_args.dropout_rate": Range(0, 1, high_open=True),
}
# Fields that name one of a few choices.
CHOICES = {
    "input_pipeline": INPUT_PIPELINES,
    "model": tuple(sorted(models.MODELS)),
    "optimizer": tuple(sorted(optimizers.OPTIMIZERS)),
    "lr_schedule": optimizers.SCHEDULES,
}


def _field(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
  value = config
  for part in dotted.split("."):
    if not isinstance(value, (ml_collections.ConfigDict, dict)) or part not in value:
      return False, None
    value = value[part]
  return True, value


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses a config that cannot train well, with one line that names the field and its range."""
  for name, allowed in RANGES.items():
    present, value = _field(config, name)
    if not present or value is None:
      continue
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(v in allowed for v in values):
      raise ConfigError(f"config.{name} must be {allowed}{' each' if values != [value] else ''}, "
                        f"got {value!r}")
  for name, choices in CHOICES.items():
    if config[name] not in choices:
      raise ConfigError(f"config.{name} must be one of {list(choices)}, got {config[name]!r}")
  if config.num_seeds > 1 and config.input_pipeline != "device":
    raise ConfigError("config.num_seeds > 1 needs input_pipeline='device' (one data order a seed)")
  if augment.Augmentation.from_config(config).enabled and config.input_pipeline != "device":
    raise ConfigError("config.augment_* needs input_pipeline='device' (augmentation runs there)")
  if config.seed + config.num_seeds - 1 > _INT32:
    raise ConfigError(f"config.seed + config.num_seeds - 1 must be at most {_INT32}")


# Fields that may differ between a run and its resume because they do not change what is
# trained (the two input pipelines train the same bits). `num_epochs` joins them unless a
# schedule is stretched over it (see `config_changes`).
RESUMABLE_CHANGES = ("num_epochs", "data_dir", "checkpoint_every_epochs", "keep_checkpoints",
                     "input_pipeline")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """Config fields (dotted) whose values differ from `saved` in a way that changes training.

  `num_epochs` may rise or fall freely under a constant learning rate; under a schedule that
  spans the whole run (`lr_schedule != "constant"`) it changes every step's rate, so it counts.
  """
  old, new = _flat(saved), _flat(rundir.config_dict(config))
  free = set(RESUMABLE_CHANGES)
  if old.get("lr_schedule") != "constant" or new.get("lr_schedule") != "constant":
    free.discard("num_epochs")
  changed = sorted(key for key in old.keys() | new.keys()
                   if key not in free and old.get(key, "<absent>") != new.get(key, "<absent>"))
  # A field that only one version of the code has is named so: no user edit made it differ.
  return [key if key in old and key in new else
          f"{key} (not in the saved config)" if key in new else f"{key} (only in the saved config)"
          for key in changed]
