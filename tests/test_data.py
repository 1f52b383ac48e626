"""The data module on the real bundled MNIST: counts, order, checksums, both pipelines."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mnist_jax import data
from mnist_jax.run import sources

# From the MNIST README that ships with the files.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_splits_have_the_known_shapes_and_label_counts(mnist_train, mnist_test):
  assert mnist_train.images_NHWC.shape == (60_000, 28, 28, 1)
  assert mnist_test.images_NHWC.shape == (10_000, 28, 28, 1)
  assert mnist_train.images_NHWC.dtype == np.uint8
  assert mnist_train.labels_N.dtype == np.int32
  assert np.bincount(mnist_train.labels_N).tolist() == TRAIN_COUNTS
  assert np.bincount(mnist_test.labels_N).tolist() == TEST_COUNTS


def test_tfds_and_numpy_paths_give_identical_arrays_in_identical_order(mnist_train):
  # The session's train split was decoded by tfds once (by this process or another worker) and
  # kept; the test split is decoded by tfds here.
  loaded = {"train": mnist_train, "test": data.load_tfds("mnist", "test")}
  for split, from_tfds in loaded.items():
    from_numpy = data.load_bundled_mnist(split)
    np.testing.assert_array_equal(from_numpy.images_NHWC, from_tfds.images_NHWC)
    np.testing.assert_array_equal(from_numpy.labels_N, from_tfds.labels_N)


def test_plain_tfds_load_works_once_prepared(mnist_test):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  images, labels = tfds.as_numpy(tfds.load("mnist", split="test", batch_size=-1, as_supervised=True))
  np.testing.assert_array_equal(images, mnist_test.images_NHWC)
  np.testing.assert_array_equal(labels, mnist_test.labels_N)


_LOAD_KEPT_WITHOUT_TENSORFLOW = """
import hashlib, sys
sys.modules["tensorflow"] = None  # Any import of TensorFlow now fails,
from mnist_jax import data
data.load_bundled_mnist = None  # and so does reading the bundled files.
split = data.load_split("mnist", "train[100:]")
print(data.dataset_info("mnist").num_classes, len(split), hashlib.sha256(split.images_NHWC).hexdigest())
"""


def test_a_decoded_split_is_kept_and_loads_again_without_tensorflow(mnist_train):
  del mnist_train  # Decoded, and so kept, in this session's data dir.
  result = subprocess.run([sys.executable, "-c", _LOAD_KEPT_WITHOUT_TENSORFLOW],
                          capture_output=True, text=True, check=True)
  digest = hashlib.sha256(data.load_bundled_mnist("train").images_NHWC[100:]).hexdigest()
  assert result.stdout.split() == ["10", "59900", digest]


def test_a_damaged_kept_split_is_decoded_again(tmp_path, monkeypatch, mnist_test):
  kept = tmp_path / "test.npz"
  kept.write_bytes(b"not an npz file")
  monkeypatch.setattr(data, "_kept_path", lambda name, filename, data_dir: str(kept))
  again = data.load_split("mnist", "test")
  np.testing.assert_array_equal(again.images_NHWC, mnist_test.images_NHWC)
  with np.load(kept) as arrays:
    np.testing.assert_array_equal(arrays["labels"], mnist_test.labels_N)


def test_num_examples_reads_labels_only_where_kept_or_bundled(monkeypatch, mnist_train, mnist_test):
  del mnist_train, mnist_test  # Decoded, and so kept, in this session's data dir.
  counts = {"train": 60_000, "test": 10_000, "train[:54000]": 54_000, "train[54000:]": 6_000}

  def load_split(*args):
    raise AssertionError(f"decoded a whole split: {args}")

  monkeypatch.setattr(data, "load_split", load_split)
  assert {split: data.num_examples("mnist", split) for split in counts} == counts
  monkeypatch.setattr(data, "_kept_path", lambda name, filename, data_dir: None)
  monkeypatch.setattr(data, "have_tensorflow", lambda: False)
  assert {split: data.num_examples("mnist", split) for split in counts} == counts


def test_num_examples_of_a_damaged_kept_split_decodes_it(tmp_path, monkeypatch):
  kept = tmp_path / "test.npz"
  kept.write_bytes(b"not an npz file")
  monkeypatch.setattr(data, "_kept_path", lambda name, filename, data_dir: str(kept))
  assert data.num_examples("mnist", "test[:10]") == 10
  with np.load(kept) as arrays:  # Decoded and kept again.
    assert len(arrays["labels"]) == 10_000


@pytest.mark.slow
def test_two_runs_preparing_a_fresh_data_dir_at_once_both_load_mnist(tmp_path):
  load = "from mnist_jax import data; print(len(data.load_split('mnist', 'test')))"
  env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path)}
  runs = [subprocess.Popen([sys.executable, "-c", load], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(2)]
  for run in runs:
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0 and out.split() == ["10000"], err


def test_checksum_mismatch_names_the_file(tmp_path, monkeypatch):
  bundled = tmp_path / "mnist"
  bundled.mkdir()
  for item in sources.BUNDLED_MNIST.iterdir():
    (bundled / item.name).write_bytes(item.read_bytes())
  sums = (bundled / "SHA256SUMS").read_text().replace("0fa7898d", "0fa7898e")
  (bundled / "SHA256SUMS").write_text(sums)
  monkeypatch.setattr(sources, "BUNDLED_MNIST", bundled)
  with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz fails its SHA-256"):
    data.load_bundled_mnist("test")


def test_normalize_maps_pixels_to_unit_interval(mnist_test):
  images = data.normalize(mnist_test.images_NHWC.astype(np.float32), 0.0, 1.0)
  assert images.dtype == np.float32
  assert images.min() == 0.0 and images.max() == 1.0
  standardized = data.normalize(mnist_test.images_NHWC.astype(np.float32), 0.1307, 0.3081)
  assert abs(standardized.mean()) < 0.05 and abs(standardized.std() - 1.0) < 0.05


def test_stream_batches_match_the_in_memory_split(mnist_test):
  batches = list(data.stream_batches("mnist", "test", batch_size=3000, mean=0.0, std=1.0))
  assert [b["image"].shape for b in batches] == [(3000, 28, 28, 1)] * 4
  assert [int(b["mask"].sum()) for b in batches] == [3000, 3000, 3000, 1000]
  images = np.concatenate([b["image"] for b in batches])[:10_000]
  labels = np.concatenate([b["label"] for b in batches])[:10_000]
  expected = data.normalize(mnist_test.images_NHWC.astype(np.float32), 0.0, 1.0)
  np.testing.assert_array_equal(images, expected)
  np.testing.assert_array_equal(labels, mnist_test.labels_N)


def test_shuffled_stream_is_a_seeded_permutation():
  def first_labels(seed):
    batches = data.stream_batches("mnist", "test", batch_size=4096, mean=0.0, std=1.0,
                                  shuffle_seed=seed)
    return [b["label"] for b in batches]

  first, again, other = first_labels(1), first_labels(1), first_labels(2)
  assert len(first) == 2  # 10,000 // 4096, the partial batch dropped.
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other))


def test_unknown_dataset_is_a_clear_error():
  with pytest.raises(data.DataError, match="unknown dataset 'no_such_dataset'"):
    data.dataset_info("no_such_dataset")



def _truncate(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


def _flip_middle_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


_TEST_RECORDS = "mnist-test.tfrecord-00000-of-00001"


@pytest.mark.parametrize("damage, reason", [
    (lambda d: os.remove(d / _TEST_RECORDS), "{dir}/" + _TEST_RECORDS + " is missing"),
    (lambda d: _truncate(d / _TEST_RECORDS, 1000), "split 'test' has 1000 bytes of files"),
    (lambda d: os.remove(d / "dataset_info.json"), "no dataset_info.json"),
    (lambda d: _truncate(d / "dataset_info.json", 100), "ParseError"),
])
def test_damaged_prepared_mnist_is_prepared_again(tmp_path, monkeypatch, capsys, mnist_test,
                                                  damage, reason):
  prepared = sources.prepared_builder("mnist", None).data_dir  # The suite's, whole.
  version_dir = tmp_path / "mnist" / os.path.basename(prepared)
  shutil.copytree(prepared, version_dir)
  damage(version_dir)
  # Preparing is tested where the suite first loads MNIST; here a copy of its result stands in.
  monkeypatch.setattr(sources, "_prepare_bundled_mnist",
                      lambda data_dir: shutil.copytree(prepared, version_dir))
  split = data.load_tfds("mnist", "test", str(tmp_path))
  np.testing.assert_array_equal(split.labels_N, mnist_test.labels_N)
  err = capsys.readouterr().err
  assert f"prepared mnist in {version_dir} is damaged ({reason.format(dir=version_dir)}" in err
  assert "preparing it again" in err


def test_a_corrupted_record_is_found_by_its_digest_or_named_when_read(tmp_path, monkeypatch,
                                                                      capfd, mnist_test):
  prepared = sources.prepared_builder("mnist", None).data_dir
  version_dir = tmp_path / "mnist" / os.path.basename(prepared)
  shutil.copytree(prepared, version_dir)
  _flip_middle_byte(version_dir / _TEST_RECORDS)
  monkeypatch.setattr(sources, "_prepare_bundled_mnist",
                      lambda data_dir: shutil.copytree(prepared, version_dir))
  # The digests written when the package prepared MNIST find it before TensorFlow reads it.
  split = data.load_tfds("mnist", "test", str(tmp_path))
  np.testing.assert_array_equal(split.labels_N, mnist_test.labels_N)
  assert f"{_TEST_RECORDS} differs from its SHA-256 at preparation" in capfd.readouterr().err

  # Without them (a dataset tfds prepared itself), reading it names the directory, in one line:
  # TensorFlow's C++ log lines about the record are held back.
  _flip_middle_byte(version_dir / _TEST_RECORDS)
  os.remove(version_dir / sources.PREPARED_DIGESTS)
  with pytest.raises(data.DataError, match=rf"'mnist' in {version_dir} is damaged \(corrupted record "
                                           rf"at \d+\); delete that directory"):
    data.load_tfds("mnist", "test", str(tmp_path))
  assert "corrupted record" not in capfd.readouterr().err
  with pytest.raises(data.DataError, match="corrupted record"):
    list(data.stream_batches("mnist", "test", batch_size=1000, mean=0.0, std=1.0,
                             data_dir=str(tmp_path)))
