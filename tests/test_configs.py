"""Experiment files load from any directory, and every config value is checked before any work."""

import glob
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_config
from mnist_jax import configs

EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))

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


@pytest.mark.parametrize("field", sorted(configs.RANGES))
def test_every_numeric_field_refuses_non_finite_and_out_of_range_values(field):
  config = load_config("cnn" if field in ("model_args.features", "model_args.dense_size")
                       else "seed_mlp")
  allowed = configs.RANGES[field]
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
