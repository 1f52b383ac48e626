"""Shared fixtures: one tfds data dir for the whole session, where MNIST's splits are kept."""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import ml_collections
import pytest

from mnist_jax import configs, data
from mnist_jax.run import parallel, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  """Every test, and every subprocess it starts, reads tfds data from one fresh directory: made
  by the pytest process (with `-n`, pytest-xdist's controller, whose environment its workers
  inherit), so that the suite also proves that MNIST loads where nothing was kept before (and,
  with the `tf` extra, that tfds' mnist prepares from the bundled files).
  """
  if not _is_worker(config):
    os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="mnist_jax_tfds_")
  # The compilation cache of `python -m mnist_jax.main`, which the runs that tests start use too:
  # a program compiled before, by this session or an earlier one, loads instead of compiling
  # (the same bits), and only programs that are new compile.
  parallel.use_compilation_cache(parallel.COMPILATION_CACHE)
  parallel.set_xla_flags()  # As `main.py` does.
  # On a GPU, the runs that tests start share it with this process: JAX's default of taking 75% of
  # its memory up front would leave them out-of-memory retries on stderr.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def pytest_unconfigure(config):
  if not _is_worker(config):
    shutil.rmtree(os.environ["TFDS_DATA_DIR"], ignore_errors=True)


def _is_worker(config) -> bool:
  return hasattr(config, "workerinput")  # Set by pytest-xdist on its workers' configs.


def pytest_collection_modifyitems(config, items):
  if not sources.have_tensorflow():
    skip = pytest.mark.skip(reason="needs TensorFlow: pip install -e '.[tf]'")
    for item in items:
      if item.get_closest_marker("tf"):
        item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist_train():
  return data.load_split("mnist", "train")


@pytest.fixture(scope="session")
def mnist_test():
  return data.load_split("mnist", "test")


@pytest.fixture(scope="session")
def two_epoch_run(tmp_path_factory):
  """A workdir of two smoke epochs and its report, for tests that only read it."""
  workdir = tmp_path_factory.mktemp("two_epoch_run")
  config = load_config("seed_mlp", "smoke")
  config.num_epochs = 2
  train_and_report(config, workdir)
  return workdir


def process_alive(pid: int) -> bool:
  """Whether process `pid` runs (a zombie, ended but not yet reaped, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def run_main(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `python -m mnist_jax.main ARGS` from the repository root."""
  return subprocess.run(
      [sys.executable, "-m", "mnist_jax.main", *args],
      cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
  )


def main_in_process(*args: str) -> subprocess.CompletedProcess:
  """`python -m mnist_jax.main ARGS` run in this process, for what ends before any training: exit
  status, stdout and stderr as the command would give them. Flags are restored afterwards."""
  from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel

  from mnist_jax import main  # pylint: disable=import-outside-toplevel

  argv = ["mnist_jax.main", *args]
  # config_flags loads every config file as the module `config_config`, executed into the one
  # in `sys.modules` if there is one: a file without `get_config` would find the last one's.
  sys.modules.pop("config_config", None)
  stdout, stderr = io.StringIO(), io.StringIO()
  returncode = 0
  with (flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv),  # config_flags reads sys.argv.
        contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr)):
    try:
      main.main(main._parse_flags(argv))  # pylint: disable=protected-access
    except SystemExit as e:
      if isinstance(e.code, str):  # As Python prints it.
        print(e.code, file=stderr)
      returncode = e.code if isinstance(e.code, int) else 1
  return subprocess.CompletedProcess(args, returncode, stdout.getvalue(), stderr.getvalue())


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`experiments/<name>.py`'s `get_config(arg)`, as `--config=experiments/<name>.py:arg` gives."""
  return configs.load_module(os.path.join(REPO, "experiments", f"{name}.py")).get_config(arg)


def train_and_report(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains as `--mode=train` does, the loop and then the report; returns the final metrics."""
  from mnist_jax import train  # pylint: disable=import-outside-toplevel
  from mnist_jax.report import training  # pylint: disable=import-outside-toplevel

  state, final = train.train_and_evaluate(config, str(workdir))
  training.after_training(config, str(workdir), state)
  return final
