"""Experiment files load from any directory, and every config value is checked before any work."""

import glob
import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO, load_config
from mnist_jax import configs
from mnist_jax.run import rundir

EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))
# Every experiment's config as `--config=experiments/<file>.py[:smoke]` resolves it: each field's
# value and type, in the order of config.json. Regenerate with `python tests/test_configs.py`
# after changing an experiment on purpose.
RESOLVED = os.path.join(REPO, "tests", "data", "experiment_configs.json")


def _types(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, str]:
  types = {}
  for key in config.keys():
    if isinstance(config[key], ml_collections.ConfigDict):
      types.update(_types(config[key], f"{prefix}{key}."))
    else:
      types[prefix + key] = config.get_type(key).__name__
  return types


def resolved_configs() -> dict[str, dict]:
  """`--config=<file>:<arg>` of every experiment file and variant, through absl as main.py
  parses it (locked)."""
  resolved = {}
  for path in EXPERIMENTS:
    for arg in ("", ":smoke"):
      flag_values = flags.FlagValues()
      config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True)
      flag_values(["resolve", f"--config={path}{arg}"])
      config = flag_values.config
      resolved[os.path.basename(path) + arg] = {
          "config": json.loads(config.to_json_best_effort()), "types": _types(config),
          "locked": config.is_locked and all(
              config[key].is_locked for key in config.keys()
              if isinstance(config[key], ml_collections.ConfigDict))}
  return resolved

_LOAD_ALL = """
import sys
from absl import flags
from ml_collections import config_flags
from mnist_jax import configs
files = sys.argv[1:]
for i, path in enumerate(files):
  flag = config_flags.DEFINE_config_file(f"config{i}", lock_config=True)
for i, path in enumerate(files):
  flags.FLAGS([sys.argv[0], f"--config{i}={path}:smoke"])
  configs.validate(flag_config := flags.FLAGS[f"config{i}"].value)
  print(path, flag_config.num_epochs)
"""


def test_every_experiment_file_loads_from_another_directory(tmp_path):
  assert len(EXPERIMENTS) >= 8  # One per file, the sweep too.
  result = subprocess.run([sys.executable, "-c", _LOAD_ALL, *EXPERIMENTS], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [f"{path} 1" for path in EXPERIMENTS]


def test_every_experiment_resolves_as_it_did_before_its_fields_were_declared_in_one_place():
  with open(RESOLVED, encoding="utf-8") as f:
    expected = json.load(f)
  resolved = resolved_configs()
  assert resolved == expected
  assert json.dumps(resolved) == json.dumps(expected)  # In the order config.json keeps, too.


def test_the_defaults_are_every_declared_field():
  config = configs.defaults()
  declared = {name for name, field in configs.FIELDS.items() if field.default is not configs.ABSENT}
  assert set(configs._flat(config.to_dict())) == declared  # pylint: disable=protected-access
  assert config.get_type("data_dir") is str and config.data_dir is None
  configs.check_new(config)
  assert configs.defaults() is not config and configs.defaults().data_dir is None
  config.data_dir = "/data"
  assert configs.defaults().data_dir is None  # Each config its own placeholder.


def test_a_field_is_added_by_one_declaration(monkeypatch):
  monkeypatch.setitem(configs.FIELDS, "label_smoothing", configs.Field(0.0, configs.Range(0, 1)))
  config = configs.defaults()
  saved = rundir.config_dict(config)
  assert saved["label_smoothing"] == 0.0
  config.label_smoothing = 2.0
  with pytest.raises(configs.ConfigError,
                     match=r"^config\.label_smoothing must be a finite number in \[0, 1\], "
                           r"got 2.0$"):
    configs.validate(config)
  config.label_smoothing = 0.1
  configs.validate(config)
  assert configs.config_changes(saved, config) == ["label_smoothing"]
  monkeypatch.setitem(configs.FIELDS, "label_smoothing",
                      configs.Field(0.0, configs.Range(0, 1), resumable=True))
  assert configs.config_changes(saved, config) == []


def test_a_resume_may_change_only_the_fields_declared_resumable():
  resumable = sorted(name for name, field in configs.FIELDS.items() if field.resumable)
  assert resumable == ["checkpoint_every_epochs", "checkpoint_interval_s", "data_dir",
                       "input_pipeline", "keep_checkpoints", "num_epochs"]
  config = configs.defaults()
  saved = rundir.config_dict(config)
  config.num_epochs, config.data_dir, config.input_pipeline = 20, "/data", "stream"
  config.checkpoint_every_epochs, config.keep_checkpoints = 5, 1
  assert configs.config_changes(saved, config) == []
  config.seed = 1
  assert configs.config_changes(saved, config) == ["seed"]
  config.seed, config.lr_schedule = 0, "cosine"  # Stretched over num_epochs, which now counts.
  assert configs.config_changes(saved, config) == ["lr_schedule", "num_epochs"]


@pytest.mark.parametrize("config, message", [
    ({"dataset": "mnist"}, "a config is an ml_collections.ConfigDict, not dict; start get_config "
                           "from mnist_jax.configs.defaults()"),
    (None, "a config is an ml_collections.ConfigDict, not NoneType; start get_config from "
           "mnist_jax.configs.defaults()"),
    (ml_collections.ConfigDict({"dataset": "mnist"}),
     "the config lacks 24 of its 25 fields (data_dir, input_pipeline, pixel_mean, pixel_std, "
     "model, ...); start get_config from mnist_jax.configs.defaults() and set what differs"),
    (ml_collections.ConfigDict({**configs.defaults().to_dict(), "model_args": 3}),
     "config.model_args must be a ConfigDict of fields, got 3"),
])
def test_a_config_of_the_wrong_shape_is_refused_in_one_line(config, message):
  with pytest.raises(configs.ConfigError) as raised:
    configs.validate(config)
  assert str(raised.value) == message


def test_a_missing_field_is_named_whichever_it_is():
  for name in configs.FIELDS:
    top = name.split(".")[0]
    config = configs.defaults().to_dict()
    del config[top]
    with pytest.raises(configs.ConfigError,
                       match=rf"^the config lacks 1 of its 25 fields \({top}\)"):
      configs.validate(ml_collections.ConfigDict(config))


def test_a_saved_config_may_lack_only_the_fields_a_resume_may_change():
  """A checkpoint saved before a field was added: what it trained is still fully described."""
  for name, field in configs.FIELDS.items():
    config = configs.defaults().to_dict()
    del config[name.split(".")[0]]
    if field.resumable is True:
      configs.validate(ml_collections.ConfigDict(config), saved=True)
    else:
      with pytest.raises(configs.ConfigError, match="^the config lacks 1 of its 25 fields"):
        configs.validate(ml_collections.ConfigDict(config), saved=True)


def test_a_field_beyond_those_declared_is_refused_in_a_new_config_only():
  config = configs.defaults()
  config.lerning_rate = 0.1  # Misspelt in an experiment file.
  configs.validate(config)  # As a checkpoint saved by another version may hold it.
  with pytest.raises(configs.ConfigError, match=r"^unknown config field 'lerning_rate'; the fields "
                     r"are declared in mnist_jax/configs.py \(FIELDS\)$"):
    configs.check_new(config)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "emnist/balanced", "mnist:3.0.1",
                                  "cifar10_corrupted/brightness_1", "Kmnist"])
def test_tfds_dataset_names_pass(name):
  config = configs.defaults()
  config.dataset = name
  configs.validate(config)


@pytest.mark.parametrize("name", ["", " ", "/", "/tmp", "/root/tensorflow_datasets/mnist", "..",
                                  "../..", "../mnist", "./mnist", "mnist/..", "mnist/../..",
                                  "mnist/", "~/data", "~", "data/mnist/3.0.1", "C:\\data",
                                  "mnist\n", "mnist ", "1mnist", "mnist:latest", "file:///tmp"])
def test_a_dataset_name_that_is_a_path_or_no_name_is_refused_as_such(name):
  config = configs.defaults()
  config.dataset = name
  with pytest.raises(configs.ConfigError) as raised:
    configs.validate(config)
  assert str(raised.value).startswith(f"config.dataset {name!r} is not a dataset name: use a tfds "
                                      "dataset name such as 'mnist'")
  assert "\n" not in str(raised.value)


@pytest.mark.parametrize("fraction, held_out",
                         [(1e-6, 0), (1e-4, 6), (1 / 60_000, 1), (0.0166, 996)])
def test_a_validation_split_too_small_to_rank_checkpoints_is_refused(fraction, held_out):
  config = configs.defaults()
  config.validation_fraction = fraction
  with pytest.raises(configs.ConfigError) as raised:
    configs.check_validation_split(config, 60_000)
  assert str(raised.value) == (
      f"config.validation_fraction={fraction:g} holds out {held_out} of the 60,000 training "
      "examples; validation needs at least 1,000 to rank checkpoints or fit a temperature (an "
      "accuracy on fewer has a standard error above 0.44 points at 98%): use 0.0167 or more, or "
      "0 for none")


def test_a_validation_split_of_the_minimum_or_none_passes():
  config = configs.defaults()
  for fraction in (0.0, 0.0167, 0.1, 0.5):
    config.validation_fraction = fraction
    configs.check_validation_split(config, 60_000)
  config.validation_fraction = 0.0167  # 1,002 of 60,000; of a smaller split, too few.
  with pytest.raises(configs.ConfigError, match="holds out 167 of the 10,000 .* use 0.1 or more"):
    configs.check_validation_split(config, 10_000)
  config.validation_fraction = 0.5
  with pytest.raises(configs.ConfigError, match="use 0 for none: this training split is too small"):
    configs.check_validation_split(config, 1_500)
  assert configs.MIN_VALIDATION_EXAMPLES == 1000


@pytest.mark.parametrize("field, value, message", [
    ("data_dir", 3,
     "config.data_dir must be a directory or None (tfds' default, or TFDS_DATA_DIR), got 3"),
    ("model_args.activation", None, "config.model_args.activation must be the name of a function "
                                    "of flax.linen, got None"),
    ("seed", None, r"config.seed must be a whole number in [0, 2,147,483,647], got None"),
    ("model", None, "config.model must be one of ['cnn', 'mlp'], got None"),
])
def test_a_value_of_the_wrong_type_is_refused(field, value, message):
  config = configs.defaults().to_dict()
  *groups, name = field.split(".")
  parent = config
  for group in groups:
    parent = parent[group]
  parent[name] = value
  with pytest.raises(configs.ConfigError) as raised:
    configs.validate(ml_collections.ConfigDict(config))
  assert str(raised.value) == message


def test_no_epochs_is_refused():
  config = configs.defaults()
  config.num_epochs = 0
  with pytest.raises(configs.ConfigError,
                     match=r"^config\.num_epochs must be a whole number in \[1, 100,000\], got 0$"):
    configs.validate(config)


def test_sibling_builds_on_the_file_beside_it():
  cnn = configs.sibling(os.path.join(REPO, "experiments", "cnn_best.py"), "cnn")
  assert cnn.model == "cnn" and cnn.model_args.dense_size == 128
  assert load_config("cnn_best").model_args.dense_size == 256


def _set(config, field, value):
  """Sets a dotted field; a list field (`hidden_sizes`) gets the value as its one entry."""
  *parents, name = field.split(".")
  for parent in parents:
    config = config[parent]
  config[name] = (value,) if isinstance(config[name], (list, tuple)) else value


@pytest.mark.parametrize("field", sorted(name for name, field in configs.FIELDS.items()
                                          if isinstance(field.allowed, configs.Range)))
def test_every_numeric_field_refuses_non_finite_and_out_of_range_values(field):
  config = load_config("cnn" if field in ("model_args.features", "model_args.dense_size")
                       else "seed_mlp")
  allowed = configs.FIELDS[field].allowed
  bad = [allowed.low if allowed.low_open else allowed.low - 1,
         allowed.high if allowed.high_open else allowed.high + 1]
  if not allowed.integer:
    bad += [math.nan, math.inf, -math.inf]
  for value in bad:
    _set(config, field, value)
    with pytest.raises(configs.ConfigError, match=rf"^config\.{field} must be .*, got "):
      configs.validate(config)
  _set(config, field, allowed.high if allowed.low_open else allowed.low)
  configs.validate(config)  # The closed end of the range is allowed.


@pytest.mark.parametrize("field, value, message", [
    ("model", "resnet", "config.model must be one of ['cnn', 'mlp'], got 'resnet'"),
    ("optimizer", "lion", "config.optimizer must be one of ['adam', 'adamw', 'sgd'], got 'lion'"),
    ("lr_schedule", "step", "config.lr_schedule must be one of ['constant', 'cosine'], got 'step'"),
    ("input_pipeline", "disk", "config.input_pipeline must be one of ['device', 'stream']"),
])
def test_choices_are_named_in_the_refusal(field, value, message):
  config = load_config("seed_mlp")
  config[field] = value
  with pytest.raises(configs.ConfigError, match=f"^{message}".replace("[", r"\[")):
    configs.validate(config)


def test_the_notebook_values_of_pixel_scaling_pass_and_infinite_ones_do_not():
  config = load_config("seed_mlp")
  configs.validate(config)  # Divide by 255 and nothing else: mean 0, std 1.
  config.pixel_std = math.inf  # Once trained silently to 11% accuracy.
  with pytest.raises(configs.ConfigError, match=r"pixel_std must be a finite number in \[0.01, 10\]"):
    configs.validate(config)


if __name__ == "__main__":
  entries = [f"{json.dumps(name)}: {json.dumps(value)}"
             for name, value in resolved_configs().items()]
  with open(RESOLVED, "w", encoding="utf-8") as f:
    f.write("{\n" + ",\n".join(entries) + "\n}\n")
