"""Command line: `python -m mnist_jax.main --config=experiments/<name>.py --workdir=runs/<name>`.

This module owns the flags and nothing else; each mode is a function of a config and a workdir.
"""

import ast
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mnist_jax import data, parallel, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/seed_mlp.py (or ...py:smoke).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join the other processes through jax.distributed.initialize; on Cloud "
    "TPU, SLURM and Open MPI it finds them itself, elsewhere give the three flags below.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same for every process (--multihost)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes (--multihost).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 first (--multihost).")

_EXPECTED_ERRORS = (data.DataError, train.ConfigError, train.TrainingError, parallel.ParallelError)


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
  if _CONFIG.value is None:
    sys.exit("mnist_jax: --config is required, e.g. --config=experiments/seed_mlp.py")
  if not _WORKDIR.value:
    sys.exit("mnist_jax: --workdir is required, e.g. --workdir=runs/seed_mlp")
  cluster = (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID)
  if not _MULTIHOST.value and any(flag.present for flag in cluster):
    sys.exit(f"mnist_jax: --{next(f for f in cluster if f.present).name} needs --multihost")
  try:
    if _MULTIHOST.value:
      parallel.initialize_distributed(*(flag.value for flag in cluster))
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except _EXPECTED_ERRORS as e:
    sys.exit(f"mnist_jax: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
