"""Command line: `python -m mnist_jax.main --config=experiments/<name>.py --workdir=runs/<name>`.

`--mode=explore` looks at the config's dataset instead of training; `--mode=report` redraws the
training report of a finished `--workdir` (no `--config` needed).

This module owns the flags and nothing else; each mode is a function of a config and a workdir.
"""

import ast
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mnist_jax import data, explore, reports, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/seed_mlp.py (or ...py:smoke).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
_JAX_CACHE_DIR = flags.DEFINE_string(
    "jax_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "mnist_jax", "jax"),
    "Persistent compilation cache, so a second run skips compiling; empty to turn it off.",
)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "explore", "report"],
    "train: train and evaluate, then write the report; explore: the dataset's shapes, class "
    "counts and plots; report: redraw the report of the finished run in --workdir.",
)

_EXPECTED_ERRORS = (data.DataError, train.ConfigError, train.TrainingError, reports.ReportError)


def _one_line(error: Exception) -> str:
  """The gist of an exception from absl or ml_collections, on one line."""
  text = str(error).strip()
  while text[:1] in ("'", '"'):  # ml_collections nests the repr of a KeyError in its message.
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      break
  lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
  if "attribute 'get_config'" in text:
    return "the config file defines no get_config(arg=None)"
  if isinstance(error, (AttributeError, KeyError)):
    return f"unknown config field {' '.join(lines)}"
  return lines[-1]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, and loading the config file, with any mistake told in one line."""
  try:
    remaining = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # A file that failed to load raises only when it is first read.
  except Exception as e:  # A config file can fail in any way; each is the user's to fix.
    sys.exit(f"mnist_jax: bad flags: {_one_line(e)}")
  if len(remaining) > 1:
    sys.exit(f"mnist_jax: unexpected arguments: {' '.join(remaining[1:])}")
  return remaining


def main(argv: list[str]) -> None:
  del argv  # _parse_flags refused any.
  logging.set_verbosity(logging.ERROR)
  if _JAX_CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE_DIR.value)
    # Our programs compile in under a second, below JAX's default threshold for caching.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if _CONFIG.value is None and _MODE.value != "report":
    sys.exit("mnist_jax: --config is required, e.g. --config=experiments/seed_mlp.py")
  if not _WORKDIR.value:
    sys.exit("mnist_jax: --workdir is required, e.g. --workdir=runs/seed_mlp")
  try:
    if _MODE.value == "explore":
      explore.explore(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "report":
      reports.report_workdir(_WORKDIR.value)
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except _EXPECTED_ERRORS as e:
    sys.exit(f"mnist_jax: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
