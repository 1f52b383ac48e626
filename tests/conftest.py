"""Shared fixtures: one tfds data dir for the whole session, prepared from the bundled MNIST."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import ml_collections
import pytest

from mnist_jax import data, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  """Every test, and every subprocess it starts, reads tfds data from one fresh directory.

  Set before any test imports tfds, so the suite also proves that MNIST prepares from the bundled
  files where nothing was prepared before.
  """
  del config
  os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="mnist_jax_tfds_")
  parallel.set_xla_flags()  # As `main.py` does.
  # On a GPU, the runs that tests start share it with this process: JAX's default of taking 75% of
  # its memory up front would leave them out-of-memory retries on stderr.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def pytest_unconfigure(config):
  del config
  shutil.rmtree(os.environ["TFDS_DATA_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def mnist_train():
  return data.load_split("mnist", "train")


@pytest.fixture(scope="session")
def mnist_test():
  return data.load_split("mnist", "test")


def run_main(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `python -m mnist_jax.main ARGS` from the repository root."""
  return subprocess.run(
      [sys.executable, "-m", "mnist_jax.main", *args],
      cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
  )


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`experiments/<name>.py`'s `get_config(arg)`, as `--config=experiments/<name>.py:arg` gives."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
