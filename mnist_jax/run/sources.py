"""Where a dataset's records come from: the MNIST files bundled with this package, read with numpy
in the order `tfds.load("mnist")` gives (no TensorFlow, no network), and tfds' prepared data for
other datasets, read with TensorFlow (the `tf` extra; without it, one line says what to install).
Prepared files are checked before tfds reads them, and an error while reading them is one line
(`DataError`). `data.py` turns what these give into splits; it is the only caller.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import gzip
import hashlib
import importlib.resources
import importlib.util
import io
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np

from mnist_jax import errors

BUNDLED_MNIST = importlib.resources.files("mnist_jax") / "bundled" / "mnist"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_INFO = ((28, 28, 1), 10, tuple(str(digit) for digit in range(10)))
_IDX_MAGIC = {"images": 2051, "labels": 2049}
_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[a-z0-9_.]+)?(:[0-9.*]+)?$")  # emnist/digits:3.*


class DataError(errors.UserError):
  """A dataset that cannot be loaded, with a message that says what to do."""


def is_bundled(name: str) -> bool:
  """Whether `name` loads from the files bundled with this package (with numpy only)."""
  return name == "mnist"


def info(name: str, data_dir: str | None) -> tuple[tuple[int, int, int], int, tuple[str, ...]]:
  """Image shape, number of classes and class names of a dataset."""
  if is_bundled(name):
    return _MNIST_INFO
  features = prepared_builder(name, data_dir).info.features
  label = features["label"]
  return tuple(features["image"].shape), label.num_classes, tuple(label.names)


def identity(name: str, data_dir: str | None) -> str | None:
  """A digest of the records `name` loads from, which changes when they do: of the bundled files'
  checksums, or of tfds' `dataset_info.json` (None where tfds has prepared no `name`)."""
  if is_bundled(name):
    return "bundled-" + hashlib.sha256((BUNDLED_MNIST / "SHA256SUMS").read_bytes()).hexdigest()[:16]
  check_name(name)
  infos = glob.glob(os.path.join(glob.escape(data_root(data_dir)), name, "*", "dataset_info.json"))
  if not infos:
    return None
  version = lambda path: [int(part) for part in re.findall(r"\d+", path.split(os.sep)[-2])]
  try:
    with open(max(infos, key=version), "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()[:16]
  except OSError:
    return None


def read_split(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """A split's uint8 images `[N, H, W, C]` and int32 labels `[N]`, as `tfds.load(name, split)`
  gives them: MNIST's `train` and `test` from the bundled files, anything else through tfds."""
  if is_bundled(name):
    if split not in MNIST_FILES:
      raise DataError(f"split {split!r} of MNIST: use 'train' or 'test', or an index slice of "
                      "them such as 'train[:54000]'")
    labels = read_bundled_mnist(split, "labels").astype(np.int32)
    order = tfds_order(len(labels), split)
    return read_bundled_mnist(split, "images")[order, ..., None], labels[order]
  builder = prepared_builder(name, data_dir)
  with read_errors(name, builder):
    images, labels = import_tfds(name).as_numpy(
        builder.as_dataset(split=split, batch_size=-1, as_supervised=True, shuffle_files=False))
  return images, labels.astype(np.int32)


def read_labels(name: str, split: str) -> np.ndarray | None:
  """A bundled split's labels alone, in the files' order (for counting); None for other data."""
  return read_bundled_mnist(split, "labels") if is_bundled(name) and split in MNIST_FILES else None


def data_root(data_dir: str | None) -> str:
  """The tfds data dir: `data_dir`, else `TFDS_DATA_DIR`, else tfds' default."""
  return os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets"))


def check_name(name: str) -> None:
  """Refuses a dataset name that is not one (empty, a path, ...), before it names a directory."""
  if not _DATASET_NAME.match(name or ""):
    raise DataError(f"config.dataset={name!r} is not a dataset name: use 'mnist' or a tfds name "
                    "such as 'fashion_mnist'")


# ---------------------------------------------------------------------------------------------
# The bundled MNIST files.


def verified_mnist_bytes(filename: str) -> bytes:
  """Returns the decompressed bytes of a bundled MNIST file after checking its SHA-256."""
  expected = dict(
      reversed(line.split()) for line in (BUNDLED_MNIST / "SHA256SUMS").read_text().splitlines()
  )
  try:
    raw = gzip.decompress((BUNDLED_MNIST / f"{filename}.gz").read_bytes())
  except (OSError, EOFError) as e:
    raise DataError(
        f"bundled MNIST file {filename}.gz cannot be read ({e}); reinstall mnist_jax") from e
  if hashlib.sha256(raw).hexdigest() != expected[filename]:
    raise DataError(
        f"bundled MNIST file {filename}.gz fails its SHA-256 check; reinstall mnist_jax"
    )
  return raw


def read_bundled_mnist(split: str, kind: str) -> np.ndarray:
  """The uint8 array of the bundled MNIST file of `split` ("train" or "test") and `kind`
  ("images" or "labels"), in the files' own order, after its SHA-256 check."""
  images_file, labels_file = MNIST_FILES[split]
  return parse_idx(verified_mnist_bytes(images_file if kind == "images" else labels_file), kind)


def parse_idx(raw: bytes, kind: str) -> np.ndarray:
  """The uint8 array of an IDX file's bytes; `kind` is "images" or "labels"."""
  ndim = 3 if kind == "images" else 1
  header = np.frombuffer(raw, ">i4", count=1 + ndim)
  if header[0] != _IDX_MAGIC[kind]:
    raise DataError(f"not an IDX {kind} file (magic number {header[0]})")
  return np.frombuffer(raw, np.uint8, offset=4 * (1 + ndim)).reshape(header[1:])


def tfds_order(num_examples: int, split: str) -> np.ndarray:
  """The order in which tfds stores examples keyed 0..num_examples-1 in `split`.

  tfds sorts the examples of a split by the MD5 of the split name followed by the key (see
  `tensorflow_datasets/core/hashing.py`); MNIST's keys are the positions in the original files.
  """
  salt = hashlib.md5(split.encode())

  def hashed(key: int) -> bytes:
    md5 = salt.copy()
    md5.update(str(key).encode())
    return md5.digest()

  return np.array(sorted(range(num_examples), key=hashed))


@contextlib.contextmanager
def _tfds_scratch() -> Iterator[None]:
  """Within, temporary files go to a directory removed after: tfds makes one, and never removes
  it, for each builder of a dataset not prepared yet (`DatasetInfo.initialize_from_bucket`)."""
  with tempfile.TemporaryDirectory(prefix="mnist_jax_tfds_") as scratch:
    previous, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      yield
    finally:
      tempfile.tempdir = previous


def prepare_tfds_mnist(data_dir: str | None = None) -> str:
  """Prepares tfds' `mnist` from the bundled files, so that `tfds.load("mnist")` works offline;
  returns its directory. Needs the `tf` extra; this package's own runs never need it."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  tfds = import_tfds("mnist")

  class BundledMNIST(tfds.image_classification.MNIST, skip_registration=True):
    name = "mnist"

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download: the files ship with this package.
      return [tfds.core.SplitGenerator(split, gen_kwargs={"split": split}) for split in MNIST_FILES]

    def _generate_examples(self, split):  # As tfds' MNIST: keyed by position in the files.
      images, labels = read_bundled_mnist(split, "images"), read_bundled_mnist(split, "labels")
      for key, (image_HW, label) in enumerate(zip(images, labels)):
        png = io.BytesIO()  # tfds stores PNG bytes as given; Pillow encodes them fastest.
        Image.fromarray(image_HW).save(png, format="png")
        yield key, {"image": png.getvalue(), "label": int(label)}

  os.makedirs(data_root(data_dir), exist_ok=True)
  # Processes preparing at once take turns: the first prepares, the others find it prepared.
  with open(os.path.join(data_root(data_dir), ".mnist_jax_prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes, or the process dies.
    with _tfds_scratch():
      builder = BundledMNIST(data_dir=data_dir)
    if not builder.is_prepared():
      with contextlib.redirect_stdout(io.StringIO()):  # tfds' own lines speak of a download.
        builder.download_and_prepare()
  return builder.data_dir


# ---------------------------------------------------------------------------------------------
# tfds' prepared data, checked before it is read.


def have_tensorflow() -> bool:
  """Whether TensorFlow and tfds are installed here (the `tf` extra), found without importing."""
  return all(importlib.util.find_spec(module) for module in ("tensorflow", "tensorflow_datasets"))


def import_tfds(name: str):
  """Imports tfds quietly, with TensorFlow kept off the accelerators JAX uses; a `DataError`
  that says what to install where it cannot be (`name`: the dataset that needs it)."""
  try:
    return _import_tfds()
  except ImportError as e:
    raise DataError(f"dataset {name!r} needs TensorFlow ({e.name or e} is not installed): "
                    "pip install -e '.[tf]'; only 'mnist' loads without it") from None


@functools.cache
def _import_tfds():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # TensorFlow only decodes here; without oneDNN it starts faster and says nothing.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  tf.config.set_visible_devices([], "GPU")
  tf.get_logger().setLevel("ERROR")
  tfds.disable_progress_bar()
  return tfds


def prepared_builder(name: str, data_dir: str | None):
  """A prepared tfds builder for `name`, downloading and preparing it where it can; a `DataError`
  where it cannot be, or its files are missing or cut short."""
  check_name(name)
  tfds = import_tfds(name)
  try:
    with _tfds_scratch():
      builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"unknown dataset {name!r}: not a tfds dataset name") from e
  except Exception as e:  # pylint: disable=broad-except  # A damaged dataset_info.json, ...
    raise _damaged(name, os.path.join(data_root(data_dir), name), e) from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"dataset {name!r} is not an image classification dataset")
  if builder.is_prepared():
    damage = _damaged_files(builder)
    if damage:
      raise _damaged(name, builder.data_dir, damage)
    return builder
  _download_and_prepare(name, builder)
  return builder


def _download_and_prepare(name: str, builder) -> None:
  root = builder.data_dir_root
  existing = root
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    raise DataError(f"dataset {name!r} is not prepared, and tfds' data dir {root} cannot be "
                    "written; set config.data_dir or TFDS_DATA_DIR to a writable directory")
  # tfds retries a failed download ten times with backoff, minutes where there is no network.
  from tensorflow_datasets.core.download import downloader  # pylint: disable=import-outside-toplevel

  retries = {"MAX_RETRIES": 1} if hasattr(downloader, "MAX_RETRIES") else {}
  watched = [root, os.path.join(root, "downloads"), os.path.join(root, "downloads", builder.name),
             os.path.join(root, builder.name), os.path.dirname(builder.data_dir)]
  before = {path: set(os.listdir(path)) for path in watched if os.path.isdir(path)}
  try:
    with mock.patch.multiple(downloader, **retries), contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()  # Its "Downloading and preparing ..." is held back.
  except Exception as e:  # tfds raises many kinds of errors for a failed download.
    # What this attempt left (temporary and incomplete directories) goes.
    left = [root] if root not in before else [
        os.path.join(path, entry) for path, entries in before.items() if os.path.isdir(path)
        for entry in set(os.listdir(path)) - entries]
    for path in left:
      with contextlib.suppress(OSError):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    raise DataError(
        f"dataset {name!r} is not prepared in {builder.data_dir} and cannot be downloaded here "
        f"({type(e).__name__}); run `tfds build {name}` on a machine with network access and "
        f"copy its data dir here (set config.data_dir or TFDS_DATA_DIR)"
    ) from e


def _damaged_files(builder) -> str | None:
  """What is wrong with a prepared builder's files that can be seen without reading them."""
  for split in builder.info.splits.values():
    if len(split.filepaths) != split.num_shards:
      return f"split {split.name!r} lists {len(split.filepaths)} of its {split.num_shards} files"
    expected = int(split.num_bytes) + 16 * split.num_examples  # TFRecord frames: 16 bytes.
    sizes = [os.path.getsize(path) if os.path.exists(path) else None for path in split.filepaths]
    if None in sizes:
      return f"{split.filepaths[sizes.index(None)]} is missing"
    if sum(sizes) != expected:
      return f"split {split.name!r} has {sum(sizes)} bytes of files, not {expected}"
  return None


def _damaged(name: str, directory: str, reason: Any) -> DataError:
  gist = next((line.strip()[:200] for line in str(reason).splitlines() if line.strip()), "")
  gist = gist if isinstance(reason, str) else f"{type(reason).__name__}: {gist}"
  return DataError(f"tfds' prepared {name!r} in {directory} is damaged ({gist}); delete that "
                   f"directory, then prepare it again with `tfds build {name}`")


@contextlib.contextmanager
def read_errors(name: str, builder) -> Iterator[None]:
  """TensorFlow's errors for files that cannot be read (gone, corrupted) as one `DataError`.

  TensorFlow's C++ code also logs such a record in lines of its own (`W0000 ... corrupted record
  at N`), past `TF_CPP_MIN_LOG_LEVEL`: what is written to the process's stderr meanwhile is held
  back, dropped with the error and written after the read otherwise.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  with _stderr_held_unless_data_error():
    try:
      yield
    except (tf.errors.NotFoundError, tf.errors.DataLossError) as e:
      # "{{function_node ...}} corrupted record at 9915852 [Op:...]" -> "corrupted record at 9915852"
      reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", e.message).strip()
      raise _damaged(name, builder.data_dir, reason) from None


@contextlib.contextmanager
def _stderr_held_unless_data_error() -> Iterator[None]:
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # No stderr to hold back.
    yield
    return
  failed = False
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except DataError:
      failed = True
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))
        sys.stderr.flush()
