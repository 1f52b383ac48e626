"""Every config field, declared once, and the checks every config passes before any work starts.

`FIELDS` holds each field's default, the values it may hold and whether a resume may change it;
`defaults()` (the seed recipe), `validate` and `config_changes` derive from it. An experiment file
defines `get_config(arg=None)`, starting from `defaults()` or from another experiment
(`configs.sibling(__file__, "seed_mlp")`, which loads from any current directory) and setting
only what differs. Adding a field is one entry of `FIELDS`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import types
from collections.abc import Callable
from typing import Any

import ml_collections

from mnist_jax import augment, errors, models, optimizers
from mnist_jax.run import rundir


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


# ---------------------------------------------------------------------------------------------
# What a field may hold: `value in allowed`, and `str(allowed)` says which values those are.


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


@dataclasses.dataclass(frozen=True)
class OneOf:
  """A field that names one of a few choices."""

  choices: tuple[str, ...]

  def __contains__(self, value: Any) -> bool:
    return isinstance(value, str) and value in self.choices

  def __str__(self) -> str:
    return f"one of {list(self.choices)}"


@dataclasses.dataclass(frozen=True)
class OfType:
  """A field that holds any value of some types, described by `what`."""

  types: tuple[type, ...]
  what: str

  def __contains__(self, value: Any) -> bool:
    return isinstance(value, self.types)

  def __str__(self) -> str:
    return self.what


class DatasetName:
  """A tfds dataset name, `name[/config][:version]` as tfds spells them, and nothing that could
  be read as a path: no empty name, no `/` first, no `.` or `..` part (where the files of a
  dataset are is `config.data_dir`'s to say)."""

  _PATTERN = re.compile(r"[A-Za-z]\w*(/[\w+-][\w+.-]*)?(:\d+\.\d+\.\d+)?")

  def __contains__(self, value: Any) -> bool:
    return isinstance(value, str) and self._PATTERN.fullmatch(value) is not None

  def __str__(self) -> str:
    return "a tfds dataset name such as 'mnist', 'fashion_mnist' or 'emnist/balanced'"


# ---------------------------------------------------------------------------------------------
# The fields.


ABSENT = object()  # The default of a field only some configs hold (a model's own argument).


def _under_constant_rate(saved: dict[str, Any], new: dict[str, Any]) -> bool:
  """Whether both runs train at a constant rate: a schedule stretched over `num_epochs`
  (`lr_schedule != "constant"`) changes every step's rate when `num_epochs` does."""
  return saved.get("lr_schedule") == new.get("lr_schedule") == "constant"


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field.

  `default`: its value in `defaults()` (the seed recipe); `ABSENT` for a field only some configs
  hold. `allowed`: the values `validate` lets through (a list field holds values of it each).
  `resumable`: whether a resume may change it, because it does not change what is trained; a
  function of the saved and the new config (flat, dotted) where that depends on other fields.
  `type`: the type of a field whose default is None.
  """

  default: Any
  allowed: Range | OneOf | OfType | DatasetName
  resumable: bool | Callable[[dict[str, Any], dict[str, Any]], bool] = False
  type: type | None = None


_INT32 = 2**31 - 1
_EPOCHS = 100_000
_BATCH = 2**20

# Every field, in the order of `config.json`. A dotted name is a field of a group
# (`model_args.hidden_sizes`), whose fields are those of the model `config.model` names.
FIELDS: dict[str, Field] = {
    "dataset": Field("mnist", DatasetName()),
    "data_dir": Field(None, OfType((str, type(None)), "a directory or None (tfds' default, or "
                                   "TFDS_DATA_DIR)"), resumable=True, type=str),
    # Or "stream": chunks from host memory (for data too big for it). Both train the same bits.
    "input_pipeline": Field("device", OneOf(("device", "stream")), resumable=True),
    # After dividing by 255 (pixels in [0, 1]); MNIST's own statistics are 0.1307 and 0.3081.
    "pixel_mean": Field(0.0, Range(-1, 1)),
    "pixel_std": Field(1.0, Range(0.01, 10)),

    "model": Field("mlp", OneOf(tuple(sorted(models.MODELS)))),
    "model_args.hidden_sizes": Field((128,), Range(1, 2**16, integer=True)),  # mlp.
    "model_args.activation": Field("relu", OfType((str,), "the name of a function of flax.linen")),
    "model_args.dropout_rate": Field(0.0, Range(0, 1, high_open=True)),
    "model_args.features": Field(ABSENT, Range(1, 2**12, integer=True)),  # cnn.
    "model_args.dense_size": Field(ABSENT, Range(1, 2**16, integer=True)),  # cnn.

    "optimizer": Field("adam", OneOf(tuple(sorted(optimizers.OPTIMIZERS)))),
    "learning_rate": Field(1e-3, Range(0, 10, low_open=True)),
    "lr_schedule": Field("constant", OneOf(optimizers.SCHEDULES)),
    "weight_decay": Field(0.0, Range(0, 1)),  # adamw only.
    "momentum": Field(0.9, Range(0, 1, high_open=True)),  # sgd only.

    "batch_size": Field(32, Range(1, _BATCH, integer=True)),
    # A power of two divides among any power-of-two device count.
    "eval_batch_size": Field(1024, Range(1, _BATCH, integer=True)),
    # At least one: a run of none trains nothing and leaves no checkpoint to evaluate.
    "num_epochs": Field(10, Range(1, _EPOCHS, integer=True), resumable=_under_constant_rate),
    "seed": Field(0, Range(0, _INT32, integer=True)),
    # Models trained at once (vmap), seeds seed .. seed + num_seeds - 1.
    "num_seeds": Field(1, Range(1, 1024, integer=True)),

    # Held out from the end of the training split: 0 keeps the notebook's use of all 60,000. Where
    # set, the validation accuracy picks the best checkpoint and drives early stopping, and it
    # must hold at least MIN_VALIDATION_EXAMPLES (see `check_validation_split`).
    "validation_fraction": Field(0.0, Range(0, 1, high_open=True)),
    # Epochs without a better selection metric; 0: never stop.
    "early_stopping_patience": Field(0, Range(0, _EPOCHS, integer=True)),

    # Random per-image augmentation of training batches on the device (see mnist_jax/augment.py):
    # shifts of up to `augment_shift` pixels, rotations within +-`augment_rotate_degrees`,
    # scalings within 1 +- `augment_scale`. 0 turns each off; input_pipeline='device' only.
    "augment_shift": Field(0, Range(0, 16, integer=True)),
    "augment_rotate_degrees": Field(0.0, Range(0, 180)),
    "augment_scale": Field(0.0, Range(0, 1, high_open=True)),

    # And after the last epoch, whatever this is.
    "checkpoint_every_epochs": Field(1, Range(1, _EPOCHS, integer=True), resumable=True),
    # Seconds from one save to the next at least: a save due by the epoch waits until they have
    # passed (a run of short epochs saves rarely); 0 saves whenever due. The best epoch is kept
    # anyway (run/checkpoints.py), and the last always saves.
    "checkpoint_interval_s": Field(60.0, Range(0, 7 * 24 * 3600), resumable=True),
    # The newest ones; the best (see validation_fraction) is kept too.
    "keep_checkpoints": Field(3, Range(1, 10_000, integer=True), resumable=True),
}


def defaults() -> ml_collections.ConfigDict:
  """The declared defaults: the seed recipe, which experiment files override. Unlocked, as a
  `get_config` may replace a group (`model_args`); `--config` locks what it returns, and
  `check_new` refuses any field it set beyond those declared."""
  tree: dict[str, Any] = {}
  for name, field in FIELDS.items():
    if field.default is ABSENT:
      continue
    *groups, leaf = name.split(".")
    parent = tree
    for group in groups:
      parent = parent.setdefault(group, {})
    parent[leaf] = (ml_collections.config_dict.placeholder(field.type)
                    if field.default is None else field.default)
  return ml_collections.ConfigDict(tree)


# ---------------------------------------------------------------------------------------------
# Checks.


def _field(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
  value = config
  for part in dotted.split("."):
    if not isinstance(value, (ml_collections.ConfigDict, dict)) or part not in value:
      return False, None
    value = value[part]
  return True, value


def _check_shape(config: Any, saved: bool) -> None:
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"a config is an ml_collections.ConfigDict, not {type(config).__name__}; "
                      "start get_config from mnist_jax.configs.defaults()")
  required = dict.fromkeys(name.split(".")[0] for name in FIELDS)  # A group is required whole.
  may_lack = {name for name, field in FIELDS.items() if saved and field.resumable is True}
  missing = [name for name in required if name not in config and name not in may_lack]
  if missing:
    raise ConfigError(f"the config lacks {len(missing)} of its {len(required)} fields "
                      f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); start "
                      "get_config from mnist_jax.configs.defaults() and set what differs")
  for group in dict.fromkeys(name.split(".")[0] for name in FIELDS if "." in name):
    if not isinstance(config[group], (ml_collections.ConfigDict, dict)):
      raise ConfigError(f"config.{group} must be a ConfigDict of fields, got {config[group]!r}")


def validate(config: ml_collections.ConfigDict, *, saved: bool = False) -> None:
  """Refuses a config that cannot train well, with one line that names the field and what it may
  hold: one that is not a ConfigDict, lacks a field, or holds a value its field does not allow.

  Fields it holds beyond `FIELDS` are let through (a checkpoint saved by another version may);
  `check_new` refuses them in a config about to start work. A `saved` config (a checkpoint's) may
  lack a field that a resume may change, one added since it was saved.
  """
  _check_shape(config, saved)
  for name, field in FIELDS.items():
    present, value = _field(config, name)
    if not present:
      continue
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(v in field.allowed for v in values):
      if isinstance(field.allowed, DatasetName):
        raise ConfigError(f"config.{name} {value!r} is not a dataset name: use {field.allowed}, "
                          "and config.data_dir for the directory tfds keeps its files in")
      raise ConfigError(f"config.{name} must be {field.allowed}"
                        f"{' each' if values != [value] else ''}, got {value!r}")
  if config.num_seeds > 1 and config.input_pipeline != "device":
    raise ConfigError("config.num_seeds > 1 needs input_pipeline='device' (one data order a seed)")
  if augment.Augmentation.from_config(config).enabled and config.input_pipeline != "device":
    raise ConfigError("config.augment_* needs input_pipeline='device' (augmentation runs there)")
  if config.seed + config.num_seeds - 1 > _INT32:
    raise ConfigError(f"config.seed + config.num_seeds - 1 must be at most {_INT32}")


def check_new(config: ml_collections.ConfigDict) -> None:
  """`validate`, and no field beyond those declared: for a config about to start work."""
  validate(config)
  declared = set(FIELDS) | {name.split(".")[0] for name in FIELDS}
  unknown = sorted(name for name in _flat(config.to_dict()) if name not in declared)
  if unknown:
    raise ConfigError(f"unknown config field {unknown[0]!r}"
                      f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; "
                      "the fields are declared in mnist_jax/configs.py (FIELDS)")


# The fewest validation examples a run may hold out. Validation ranks checkpoints, stops runs
# early and fits `--calibrated`'s temperature; see `check_validation_split` for why this many.
MIN_VALIDATION_EXAMPLES = 1000


def check_validation_split(config: ml_collections.ConfigDict, num_train: int) -> None:
  """Refuses a validation split too small to rank checkpoints or fit a temperature.

  Under MIN_VALIDATION_EXAMPLES the standard error of an accuracy near 98%,
  sqrt(0.98 * 0.02 / n), passes 0.44 points: wider than what separates a run's later epochs, so
  the "best" checkpoint is a draw. And a temperature is pinned by the few examples the model gets
  wrong or is unsure of, about 20 at 98% of 1,000 and none at all in a split of 6, where the fit
  sharpens every probability. Measured on subsets of the seed recipe's 6,000 validation
  examples: docs/2026-12-05-photos-configs-checkpoints.md.
  """
  held_out = round(num_train * config.validation_fraction)  # As `data.holdout_splits` holds out.
  if config.validation_fraction and held_out < MIN_VALIDATION_EXAMPLES:
    least = math.ceil((MIN_VALIDATION_EXAMPLES - 0.5) / num_train * 1e4) / 1e4
    use = (f"use {least:g} or more, or 0 for none" if least < 0.5 else
           "use 0 for none: this training split is too small to hold one out")
    raise ConfigError(
        f"config.validation_fraction={config.validation_fraction:g} holds out {held_out} of the "
        f"{num_train:,} training examples; validation needs at least {MIN_VALIDATION_EXAMPLES:,} "
        "to rank checkpoints or fit a temperature (an accuracy on fewer has a standard error "
        f"above 0.44 points at 98%): {use}")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """Config fields (dotted) whose values differ from `saved` in a way that changes training:
  all but those `FIELDS` declares `resumable` (for `num_epochs`, under a constant rate only)."""
  old, new = _flat(saved), _flat(rundir.config_dict(config))
  free = {name for name, field in FIELDS.items()
          if field.resumable is True or (callable(field.resumable) and field.resumable(old, new))}
  changed = sorted(key for key in old.keys() | new.keys()
                   if key not in free and old.get(key, "<absent>") != new.get(key, "<absent>"))
  # A field that only one version of the code has is named so: no user edit made it differ.
  return [key if key in old and key in new else
          f"{key} (not in the saved config)" if key in new else f"{key} (only in the saved config)"
          for key in changed]
