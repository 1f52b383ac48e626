"""Command line: `python -m mnist_jax.main --config=experiments/<name>.py --workdir=runs/<name>`.

This module owns the flags and nothing else; each mode is a function of a config and a workdir.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mnist_jax import data, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/seed_mlp.py (or ...py:smoke).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")

_EXPECTED_ERRORS = (data.DataError, train.ConfigError, train.TrainingError)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.ERROR)
  if _CONFIG.value is None:
    sys.exit("mnist_jax: --config is required, e.g. --config=experiments/seed_mlp.py")
  if not _WORKDIR.value:
    sys.exit("mnist_jax: --workdir is required, e.g. --workdir=runs/seed_mlp")
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except _EXPECTED_ERRORS as e:
    sys.exit(f"mnist_jax: {e}")


if __name__ == "__main__":
  app.run(main)
