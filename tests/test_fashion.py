"""The Fashion-MNIST configs train on `tfds.testing.mock_data`; offline, or without TensorFlow,
they stop in one line."""

import json
import os
import tempfile

import numpy as np
import pytest

from conftest import load_config, main_in_process, train_and_report
from mnist_jax.run import sources


NUM_EXAMPLES = 512


@pytest.fixture
def mock_fashion_mnist(tmp_path, monkeypatch):
  """tfds' random examples for fashion_mnist, with split sizes written as real metadata.

  Without metadata, mock_data knows no split sizes, and `batch_size=-1` loads then fail. Its
  examples come from no files, which `sources` would otherwise take for a damaged dataset.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(sources, "_damaged_files", lambda builder: None)
  # tfds leaves a temporary directory behind for the builder of a dataset not prepared yet.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  metadata_dir = tmp_path / "tfds_metadata"
  builder = tfds.builder("fashion_mnist", data_dir=str(metadata_dir))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[NUM_EXAMPLES], num_bytes=0)
      for split in ("train", "test")
  ]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, data_dir=str(metadata_dir)):
    yield


@pytest.mark.tf
@pytest.mark.slow
@pytest.mark.parametrize("name", ["fashion_mlp", "fashion_cnn"])
def test_fashion_configs_train_on_mocked_fashion_mnist(tmp_path, mock_fashion_mnist, name):
  del mock_fashion_mnist
  config = load_config(name, "smoke")
  assert config.dataset == "fashion_mnist" and config.num_epochs == 1
  config.num_epochs = 3  # Three epochs of 4 steps: enough for the loss to fall on 512 examples.
  config.lock()
  final = train_and_report(config, tmp_path / "run")

  history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  losses = [record["train_loss"] for record in history]
  assert len(history) == 3 and np.isfinite(losses).all()
  assert losses[-1] < losses[0]
  assert history[0]["step"] == NUM_EXAMPLES // config.batch_size
  assert final["test_examples"] == NUM_EXAMPLES
  predictions = np.load(tmp_path / "run" / "predictions.npz")
  assert predictions["logits_NC"].shape == (NUM_EXAMPLES, 10)
  assert list(predictions["class_names"])[:2] == ["T-shirt/top", "Trouser"]


@pytest.mark.tf
def test_fashion_config_offline_is_one_clear_line_and_leaves_nothing(tmp_path):
  data_dir = tmp_path / "data"
  result = main_in_process("--config=experiments/fashion_mlp.py:smoke", f"--workdir={tmp_path}/run",
                           f"--config.data_dir={data_dir}")
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("mnist_jax: dataset 'fashion_mnist' is not prepared in ")
  assert "cannot be downloaded here" in lines[0]
  assert result.stdout == ""  # tfds' "Downloading and preparing" is held back,
  assert not data_dir.exists()  # and its temporary directories removed.


def test_fashion_config_without_tensorflow_says_what_to_install(tmp_path, monkeypatch):
  def no_tensorflow():
    raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

  monkeypatch.setattr(sources, "_import_tfds", no_tensorflow)
  result = main_in_process("--config=experiments/fashion_mlp.py:smoke", f"--workdir={tmp_path}")
  assert result.returncode != 0 and result.stdout == ""
  assert result.stderr.strip() == (
      "mnist_jax: dataset 'fashion_mnist' needs TensorFlow (tensorflow is not installed): "
      "pip install -e '.[tf]'; only 'mnist' loads without it")
