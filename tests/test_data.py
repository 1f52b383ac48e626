"""The data module and its sources: the bundled MNIST (counts, order, checksums, kept splits) and,
with the `tf` extra, tfds (the same arrays, damaged files in one line)."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

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


@pytest.mark.tf
def test_tfds_load_of_the_prepared_bundled_mnist_gives_the_same_arrays(mnist_train, mnist_test):
  # As a user with the `tf` extra would: prepare tfds' mnist from the bundled files, then load it
  # with tfds alone, whole and in the slices that training and validation use.
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  sources.prepare_tfds_mnist()
  ours = {"train": mnist_train, "test": mnist_test,
          "train[54000:]": data.load_split("mnist", "train[54000:]")}
  for split, split_ours in ours.items():
    images, labels = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1,
                                             as_supervised=True))
    np.testing.assert_array_equal(images, split_ours.images_NHWC)
    np.testing.assert_array_equal(labels, split_ours.labels_N)


@pytest.mark.tf
def test_builders_of_a_dataset_not_prepared_yet_leave_no_temporary_directory(tmp_path,
                                                                             monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", lambda *a, **k: None)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  os.mkdir(tmp_path / "tmp")
  sources.prepare_tfds_mnist(str(tmp_path / "data"))
  sources.prepared_builder("mnist", str(tmp_path / "data"))
  assert os.listdir(tmp_path / "tmp") == []


_LOAD_WITHOUT_TENSORFLOW = """
import hashlib, sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None  # Their imports now fail.
from mnist_jax import data
from mnist_jax.run import sources
if sys.argv[1] == "kept":
  sources.read_split = None  # Reading the bundled files now fails too.
split = data.load_split("mnist", "train[100:]")
print(data.dataset_info("mnist").num_classes, len(split), hashlib.sha256(split.images_NHWC).hexdigest())
"""


@pytest.mark.parametrize("where", ["kept", "bundled"])
def test_mnist_loads_without_tensorflow_from_the_kept_split_or_the_bundled_files(
    tmp_path, mnist_train, where):
  # Kept in this session's data dir (once the fixture loaded it); read from the files in a new one.
  env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path)} if where == "bundled" else None
  result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_TENSORFLOW, where], env=env,
                          capture_output=True, text=True, check=True)
  digest = hashlib.sha256(mnist_train.images_NHWC[100:]).hexdigest()
  assert result.stdout.split() == ["10", "59900", digest]
  if where == "bundled":  # And now kept there, for the next run.
    assert len(list(tmp_path.glob("mnist_jax_decoded/mnist/*/train.npz"))) == 1


def test_the_order_is_tfds_hash_order_of_the_files_positions(mnist_test):
  # tfds' order is fixed by its hashing of keys (the tf test above checks it against tfds).
  images, labels = (sources.read_bundled_mnist("test", kind) for kind in ("images", "labels"))
  order = sources.tfds_order(10_000, "test")
  assert sorted(order.tolist()) == list(range(10_000)) and order[:3].tolist() != [0, 1, 2]
  np.testing.assert_array_equal(mnist_test.images_NHWC[..., 0], images[order])
  np.testing.assert_array_equal(mnist_test.labels_N, labels[order])


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
  assert {split: data.num_examples("mnist", split) for split in counts} == counts


def test_num_examples_of_a_damaged_kept_split_counts_the_bundled_labels(tmp_path, monkeypatch):
  kept = tmp_path / "test.npz"
  kept.write_bytes(b"not an npz file")
  monkeypatch.setattr(data, "_kept_path", lambda name, filename, data_dir: str(kept))
  monkeypatch.setattr(sources, "read_split", None)  # Reading the images would fail.
  assert data.num_examples("mnist", "test[:10]") == 10
  assert data.num_examples("mnist", "test") == 10_000


def test_checksum_mismatch_names_the_file(tmp_path, monkeypatch):
  bundled = tmp_path / "mnist"
  bundled.mkdir()
  for item in sources.BUNDLED_MNIST.iterdir():
    (bundled / item.name).write_bytes(item.read_bytes())
  sums = (bundled / "SHA256SUMS").read_text().replace("0fa7898d", "0fa7898e")
  (bundled / "SHA256SUMS").write_text(sums)
  monkeypatch.setattr(sources, "BUNDLED_MNIST", bundled)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "data"))  # Where nothing is kept.
  with pytest.raises(sources.DataError, match="t10k-images-idx3-ubyte.gz fails its SHA-256"):
    data.load_split("mnist", "test")


def test_normalize_maps_pixels_to_unit_interval(mnist_test):
  images = data.normalize(mnist_test.images_NHWC.astype(np.float32), 0.0, 1.0)
  assert images.dtype == np.float32
  assert images.min() == 0.0 and images.max() == 1.0
  standardized = data.normalize(mnist_test.images_NHWC.astype(np.float32), 0.1307, 0.3081)
  assert abs(standardized.mean()) < 0.05 and abs(standardized.std() - 1.0) < 0.05


@pytest.mark.tf
def test_unknown_dataset_is_a_clear_error():
  with pytest.raises(sources.DataError, match="unknown dataset 'no_such_dataset'"):
    data.dataset_info("no_such_dataset")


@pytest.mark.parametrize("name", ["", "/tmp", "../..", "mnist/../../x", "Fashion MNIST"])
def test_a_dataset_name_that_is_not_a_name_is_refused(name):
  with pytest.raises(sources.DataError, match=r"is not a dataset name: use 'mnist' or a tfds name"):
    data.dataset_info(name)


def test_without_tensorflow_another_dataset_says_what_to_install(monkeypatch):
  def no_tensorflow():
    raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

  monkeypatch.setattr(sources, "_import_tfds", no_tensorflow)
  for load in (data.dataset_info, lambda name: data.load_split(name, "train[:10]")):
    with pytest.raises(sources.DataError) as error:
      load("fashion_mnist")
    assert str(error.value) == (
        "dataset 'fashion_mnist' needs TensorFlow (tensorflow is not installed): pip install -e "
        "'.[tf]'; only 'mnist' loads without it")


def test_mnist_split_strings_beyond_index_slices_say_which_load():
  with pytest.raises(sources.DataError, match=r"split 'train\[:50%\]' of MNIST: use 'train' or"):
    data.load_split("mnist", "train[:50%]")


def _truncate(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


def _flip_middle_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


_TEST_RECORDS = "mnist-test.tfrecord-00000-of-00001"


@pytest.fixture
def tfds_mnist_copy(tmp_path, monkeypatch):
  """tfds' mnist prepared from the bundled files, copied into a fresh data dir and read from there
  as any tfds dataset is (not from the bundled files); its version directory."""
  prepared = sources.prepare_tfds_mnist()
  version_dir = tmp_path / "mnist" / os.path.basename(prepared)
  shutil.copytree(prepared, version_dir)
  monkeypatch.setattr(sources, "is_bundled", lambda name: False)
  return version_dir


@pytest.mark.tf
def test_a_tfds_dataset_loads_through_tfds_and_is_kept(tfds_mnist_copy, mnist_test):
  data_dir = str(tfds_mnist_copy.parent.parent)
  split = data.load_split("mnist", "test[:10]", data_dir)
  np.testing.assert_array_equal(split.images_NHWC, mnist_test.images_NHWC[:10])
  assert data.dataset_info("mnist", data_dir).class_names == tuple("0123456789")
  kept = list(tfds_mnist_copy.parent.parent.glob("mnist_jax_decoded/mnist/*/*"))
  assert sorted(path.name for path in kept) == ["info.json", "test.npz"]


@pytest.mark.tf
@pytest.mark.parametrize("damage, reason", [
    (lambda d: os.remove(d / _TEST_RECORDS), "{dir}/" + _TEST_RECORDS + " is missing"),
    (lambda d: _truncate(d / _TEST_RECORDS, 1000), "split 'test' has 1000 bytes of files"),
    (lambda d: _truncate(d / "dataset_info.json", 100), "ParseError"),
])
def test_a_damaged_tfds_dataset_is_one_line_that_names_its_directory(tfds_mnist_copy, damage,
                                                                      reason):
  damage(tfds_mnist_copy)
  with pytest.raises(sources.DataError) as error:
    data.load_split("mnist", "test", str(tfds_mnist_copy.parent.parent))
  message = str(error.value)
  assert message.startswith(f"tfds' prepared 'mnist' in {tfds_mnist_copy.parent}"), message
  assert f"is damaged ({reason.format(dir=tfds_mnist_copy)}" in message
  assert message.endswith("delete that directory, then prepare it again with `tfds build mnist`")


@pytest.mark.tf
def test_a_corrupted_record_is_named_when_read_in_one_line(tfds_mnist_copy, capfd):
  # TensorFlow's C++ log lines about the record are held back.
  _flip_middle_byte(tfds_mnist_copy / _TEST_RECORDS)
  with pytest.raises(sources.DataError, match=rf"'mnist' in {tfds_mnist_copy} is damaged "
                                              rf"\(corrupted record at \d+\); delete that"):
    data.load_split("mnist", "test", str(tfds_mnist_copy.parent.parent))
  assert "corrupted record" not in capfd.readouterr().err
