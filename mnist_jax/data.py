"""Turns a tfds dataset name into normalized arrays or batches.

tfds is the source of truth. MNIST ships with the package (the original IDX files), so that
`tfds.load("mnist")` works on machines that reach no dataset host: the first load prepares it from
the bundled files through tfds' own `MNIST` builder. Where TensorFlow is not installed, MNIST is
read from the same files with numpy, in the order tfds would give. Whole splits, once decoded, are
kept as arrays beside tfds' files, so a run that finds them starts without importing TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import glob
import gzip
import hashlib
import importlib.metadata
import importlib.resources
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np
from PIL import Image

from mnist_jax import errors, rundir

BUNDLED_MNIST = importlib.resources.files("mnist_jax") / "bundled" / "mnist"
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {"images": 2051, "labels": 2049}


class DataError(errors.UserError):
  """A dataset that cannot be loaded, with a message that says what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split held in memory: uint8 images `[N, H, W, C]` and int32 labels `[N]`."""

  images_NHWC: np.ndarray
  labels_N: np.ndarray

  def __len__(self) -> int:
    return len(self.labels_N)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the reports need to know about a dataset."""

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  class_names: tuple[str, ...]


def have_tensorflow() -> bool:
  """Whether TensorFlow and tfds can be imported here."""
  try:
    _tfds()
  except ImportError:
    return False
  return True


@functools.cache
def _tfds():
  """Imports tfds quietly, with TensorFlow kept off the accelerators JAX uses."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # TensorFlow only decodes and batches here; without oneDNN it starts faster and says nothing.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  tf.config.set_visible_devices([], "GPU")
  tf.get_logger().setLevel("ERROR")
  tfds.disable_progress_bar()
  return tfds


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


def _parse_idx(raw: bytes, kind: str) -> np.ndarray:
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


def load_bundled_mnist(split: str) -> Split:
  """Reads a split of the bundled MNIST with numpy only, in the order `tfds.load` gives."""
  images_file, labels_file = _MNIST_FILES[split]
  images = _parse_idx(verified_mnist_bytes(images_file), "images")[..., None]
  labels = _parse_idx(verified_mnist_bytes(labels_file), "labels").astype(np.int32)
  order = tfds_order(len(labels), split)
  return Split(images[order], labels[order])


def _prepare_bundled_mnist(data_dir: str | None) -> None:
  """Writes tfds' `mnist` into `data_dir` from the bundled files, with tfds' own builder."""
  tfds = _tfds()
  extracted: dict[str, str] = {}

  class BundledMNIST(tfds.image_classification.MNIST, skip_registration=True):
    name = "mnist"

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download: the files ship with this package.
      out_dir = os.path.join(self.data_dir_root, "downloads", "mnist_jax_bundled")
      os.makedirs(out_dir, exist_ok=True)
      for images_file, labels_file in _MNIST_FILES.values():
        for filename in (images_file, labels_file):
          path = os.path.join(out_dir, filename)
          with open(path, "wb") as f:
            f.write(verified_mnist_bytes(filename))
          extracted[filename] = path
      return [
          tfds.core.SplitGenerator(
              name=split,
              gen_kwargs=dict(
                  num_examples=60_000 if split == "train" else 10_000,
                  data_path=extracted[images_file],
                  label_path=extracted[labels_file],
              ),
          )
          for split, (images_file, labels_file) in _MNIST_FILES.items()
      ]

    def _generate_examples(self, num_examples, data_path, label_path):
      # tfds stores PNG bytes as given, and Pillow encodes them faster than tfds' own encoder, a
      # TensorFlow op an image (WORKSPACE.md, Results); decoded, the pixels are the same.
      for key, record in super()._generate_examples(num_examples, data_path, label_path):
        yield key, {**record, "image": _png(record["image"])}

  builder = BundledMNIST(data_dir=data_dir)
  print(f"mnist_jax: preparing tfds' mnist in {builder.data_dir} from the bundled files (once)",
        file=sys.stderr, flush=True)
  with contextlib.redirect_stdout(io.StringIO()):  # tfds' own lines speak of a download.
    builder.download_and_prepare()
  records = sorted(glob.glob(os.path.join(glob.escape(builder.data_dir), "*.tfrecord*")))
  digests = {os.path.basename(path): _sha256(path) for path in records}
  rundir.write_text(os.path.join(builder.data_dir, PREPARED_DIGESTS), json.dumps(digests, indent=1))


def _png(image_HW1: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image_HW1[..., 0]).save(buffer, format="png")
  return buffer.getvalue()


# Beside the record files of the MNIST this package prepares: their SHA-256 digests, so that a
# damaged record is found before TensorFlow reads it (and prepared again) rather than while.
PREPARED_DIGESTS = "mnist_jax_sha256.json"


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()  # MNIST's records: 23 MB.


# ---------------------------------------------------------------------------------------------
# tfds.


def _builder(name: str, data_dir: str | None):
  """A prepared tfds builder for `name`, preparing the bundled MNIST where needed.

  A prepared `name` whose files are missing, cut short or unreadable is damaged: MNIST is
  prepared again (with a warning); another dataset is a `DataError` that says what to do.
  """
  tfds = _tfds()
  if name == "mnist":
    return _prepared_mnist(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"unknown dataset {name!r}: not a tfds dataset name") from e
  except Exception as e:  # pylint: disable=broad-except  # A damaged dataset_info.json, ...
    raise _damaged(name, os.path.join(_data_root(data_dir), name), e) from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"dataset {name!r} is not an image classification dataset")
  if builder.is_prepared():
    damage = _damaged_files(builder)
    if damage:
      raise _damaged(name, builder.data_dir, damage)
    return builder
  # tfds retries a failed download ten times with backoff, minutes where there is no network.
  from tensorflow_datasets.core.download import downloader  # pylint: disable=import-outside-toplevel

  retries = {"MAX_RETRIES": 1} if hasattr(downloader, "MAX_RETRIES") else {}
  try:
    with mock.patch.multiple(downloader, **retries):
      builder.download_and_prepare()
  except Exception as e:  # tfds raises many kinds of errors for a failed download.
    raise DataError(
        f"dataset {name!r} is not prepared in {builder.data_dir} and cannot be downloaded here "
        f"({type(e).__name__}); run `tfds build {name}` on a machine with network access and "
        f"copy its data dir here (set config.data_dir or TFDS_DATA_DIR)"
    ) from e
  return builder


def _data_root(data_dir: str | None) -> str:
  return os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets"))


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
  try:
    with open(os.path.join(builder.data_dir, PREPARED_DIGESTS), encoding="utf-8") as f:
      digests = json.load(f)
  except FileNotFoundError:  # Prepared by tfds itself: a damaged record shows when it is read.
    return None
  except (OSError, ValueError) as e:
    return f"{PREPARED_DIGESTS} cannot be read ({type(e).__name__})"
  for name, digest in sorted(digests.items()) if isinstance(digests, dict) else [("?", None)]:
    path = os.path.join(builder.data_dir, name)
    if not os.path.exists(path) or _sha256_once(path, os.stat(path).st_mtime_ns) != digest:
      return f"{name} differs from its SHA-256 at preparation"
  return None


@functools.lru_cache(maxsize=16)
def _sha256_once(path: str, mtime_ns: int) -> str:
  """`_sha256` of a file, read once a process while it is not rewritten (the benchmark's tf.data
  loop opens MNIST every epoch)."""
  del mtime_ns  # Part of the cache key only.
  return _sha256(path)


def _damaged(name: str, directory: str, reason: Any) -> DataError:
  again = (", and the next run prepares it again from the bundled files" if name == "mnist"
           else f", then prepare it again with `tfds build {name}`")
  return DataError(f"tfds' prepared {name!r} in {directory} is damaged ({_gist(reason)}); "
                   f"delete that directory{again}")


def _gist(reason: Any) -> str:
  lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
  text = lines[0][:200] if lines else ""
  return text if isinstance(reason, str) else f"{type(reason).__name__}: {text}"


def _prepared_mnist(data_dir: str | None):
  """tfds' mnist, prepared from the bundled files where it is not prepared or is damaged."""
  tfds = _tfds()
  version = str(tfds.image_classification.MNIST.VERSION)
  version_dir = os.path.join(_data_root(data_dir), "mnist", version)

  def prepared(repair: bool):
    """The builder if prepared and whole, else None; with `repair`, a damaged one is removed
    (with a warning)."""
    try:
      builder = tfds.builder("mnist", data_dir=data_dir)
      damage = _damaged_files(builder) if builder.is_prepared() else None
    except Exception as e:  # pylint: disable=broad-except  # A damaged dataset_info.json, ...
      builder, damage = None, _gist(e)
    if builder is not None and builder.is_prepared() and damage is None:
      return builder
    if repair and os.path.exists(version_dir) and (damage or os.listdir(version_dir)):
      print(f"mnist_jax: warning: tfds' prepared mnist in {version_dir} is damaged "
            f"({damage or 'no dataset_info.json'}); preparing it again", file=sys.stderr,
            flush=True)
      shutil.rmtree(version_dir)
    return None

  builder = prepared(repair=False)
  if builder is None:
    # Runs started together on a fresh data dir take turns: the first prepares, the others find it.
    os.makedirs(os.path.dirname(version_dir), exist_ok=True)
    with open(os.path.join(os.path.dirname(version_dir), ".mnist_jax_prepare.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes, or the process dies.
      builder = prepared(repair=True)
      if builder is None:
        _prepare_bundled_mnist(data_dir)
        builder = tfds.builder("mnist", data_dir=data_dir)
  return builder


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Shape, number of classes and class names of a dataset."""
  path = _kept_path(name, "info.json", data_dir)
  if path and os.path.exists(path):
    try:
      with open(path) as f:
        kept = json.load(f)
      return DatasetInfo(kept["name"], tuple(kept["image_shape"]), kept["num_classes"],
                         tuple(kept["class_names"]))
    except (OSError, TypeError, ValueError, KeyError):
      pass  # Damaged: asked of tfds again below.
  if name == "mnist" and not have_tensorflow():
    return DatasetInfo("mnist", (28, 28, 1), 10, tuple(str(d) for d in range(10)))
  if not have_tensorflow():
    raise DataError(f"dataset {name!r} needs tensorflow-datasets; only 'mnist' loads without it")
  features = _builder(name, data_dir).info.features
  info = DatasetInfo(
      name,
      tuple(features["image"].shape),
      features["label"].num_classes,
      tuple(features["label"].names),
  )
  _keep(_kept_path(name, "info.json", data_dir),
        lambda f: f.write(json.dumps(dataclasses.asdict(info)).encode()))
  return info


def num_examples(name: str, split: str, data_dir: str | None = None) -> int:
  """How many examples a split holds, counted from its labels alone where they can be read so."""
  match = _SLICE.match(split)
  labels = _whole_split_labels(name, match[1], data_dir) if match else None
  if labels is None:
    return len(load_split(name, split, data_dir))
  return len(labels[_rows(match)])


def _whole_split_labels(name: str, split: str, data_dir: str | None) -> np.ndarray | None:
  kept = _read_kept(name, split, data_dir, "labels")  # Read alone: the images stay on disk.
  if kept is not None:
    return kept["labels"]
  if name == "mnist" and split in _MNIST_FILES and not have_tensorflow():
    return _parse_idx(verified_mnist_bytes(_MNIST_FILES[split][1]), "labels")
  return None


def load_tfds(name: str, split: str, data_dir: str | None = None) -> Split:
  """Loads a whole tfds split into memory as uint8 images and int32 labels."""
  builder = _builder(name, data_dir)
  with _native_stderr_held(), _read_errors(name, builder):
    arrays = _tfds().as_numpy(
        builder.as_dataset(split=split, batch_size=-1, as_supervised=True, shuffle_files=False)
    )
  images, labels = arrays
  return Split(images, labels.astype(np.int32))


def holdout_splits(num_train: int, validation_fraction: float) -> tuple[str, str | None]:
  """tfds split strings for training and validation: the end of `train` is held out.

  `(train, None)` without a fraction; else, e.g. for 0.1 of 60,000: `train[:54000]`, `train[54000:]`.
  """
  if not validation_fraction:
    return "train", None
  num_kept = num_train - round(num_train * validation_fraction)
  return f"train[:{num_kept}]", f"train[{num_kept}:]"


_SLICE = re.compile(r"^(\w+)(?:\[(\d*):(\d*)\])?$")


def load_split(name: str, split: str, data_dir: str | None = None) -> Split:
  """Loads a split into memory: a whole one such as `test`, or an index slice such as
  `train[:54000]` (other tfds split strings go to tfds as they are).

  A whole split is decoded once by tfds (or, without TensorFlow, read from the bundled MNIST) and
  kept as arrays beside tfds' files; later loads read those and import no TensorFlow.
  """
  match = _SLICE.match(split)
  if not match:
    if not have_tensorflow():
      raise DataError(f"split {split!r} needs tensorflow-datasets; without it use 'train' or "
                      "'test' or an index slice of them such as 'train[:54000]'")
    return load_tfds(name, split, data_dir)
  whole = _load_whole_split(name, match[1], data_dir)
  return Split(whole.images_NHWC[_rows(match)], whole.labels_N[_rows(match)])


def _rows(match: re.Match) -> slice:
  return slice(int(match[2]) if match[2] else None, int(match[3]) if match[3] else None)


def _read_kept(name: str, split: str, data_dir: str | None, *members: str) -> dict | None:
  """The named arrays of a kept whole split; None where none is kept or it is damaged."""
  path = _kept_path(name, f"{split}.npz", data_dir)
  if not (path and os.path.exists(path)):
    return None
  try:
    with np.load(path) as kept:
      return {member: kept[member] for member in members}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None


def _load_whole_split(name: str, split: str, data_dir: str | None) -> Split:
  kept = _read_kept(name, split, data_dir, "images", "labels")
  if kept is not None:
    return Split(kept["images"], kept["labels"])
  if have_tensorflow():  # Not kept, or damaged: decoded (again).
    whole = load_tfds(name, split, data_dir)
  elif name == "mnist" and split in _MNIST_FILES:
    whole = load_bundled_mnist(split)
  else:
    raise DataError(f"split {split!r} of {name!r} needs tensorflow-datasets; without it only "
                    "MNIST's 'train' and 'test' load")
  _keep(_kept_path(name, f"{split}.npz", data_dir),  # Once prepared, if it was not.
        lambda f: np.savez(f, images=whole.images_NHWC, labels=whole.labels_N))
  return whole


def _kept_path(name: str, filename: str, data_dir: str | None) -> str | None:
  """Where decoded arrays and info of `name` are kept: beside tfds' files, under a digest of the
  prepared dataset's `dataset_info.json`, so that a dataset prepared anew is decoded anew. None
  where tfds has prepared no `name` in the data dir (as under `tfds.testing.mock_data`)."""
  root = _data_root(data_dir)
  infos = glob.glob(os.path.join(glob.escape(root), name, "*", "dataset_info.json"))
  if not infos:
    return None
  version = lambda path: [int(part) for part in re.findall(r"\d+", path.split(os.sep)[-2])]
  try:
    with open(max(infos, key=version), "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()[:16]
  except OSError:
    return None
  return os.path.join(root, "mnist_jax_decoded", name, digest, filename)


def _keep(path: str | None, write: Callable[[Any], Any]) -> None:
  """Writes a file whole or not at all, so that processes decoding at once do not mix; a
  directory that refuses writes only costs the next run a decode."""
  if path is None:
    return
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.write_atomic(path, write)
  except (OSError, rundir.RunFileError):
    pass


# ---------------------------------------------------------------------------------------------
# Normalization and the streaming pipeline.


def normalize(images: Any, mean: float, std: float) -> Any:
  """uint8 pixels -> float32: divided by 255 (the notebook's step), then `(x - mean) / std`.

  Written with operators only, so the same line serves numpy, JAX and TensorFlow arrays of float32.
  """
  return (images / 255.0 - mean) / std


def stream_batches(
    name: str,
    split: str,
    *,
    batch_size: int,
    mean: float,
    std: float,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 60_000,
    data_dir: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass of a tf.data pipeline over a split, as numpy batches with a `mask`.

  With a `shuffle_seed` (training) the split is shuffled and the last partial batch dropped;
  without one (evaluation) the order is kept and the last batch is padded, its padding masked.
  """
  tfds = _tfds()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  builder = _builder(name, data_dir)
  ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
  if shuffle_seed is not None:
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  ds = ds.batch(batch_size, drop_remainder=shuffle_seed is not None)

  def to_batch(images, labels):
    count = tf.shape(labels)[0]
    padding = batch_size - count
    images = tf.pad(tf.cast(images, tf.float32), [[0, padding], [0, 0], [0, 0], [0, 0]])
    return {
        "image": normalize(images, mean, std),
        "label": tf.pad(tf.cast(labels, tf.int32), [[0, padding]]),
        "mask": tf.range(batch_size) < count,
    }

  ds = ds.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  with _read_errors(name, builder):
    yield from tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[None]:
  """What is written to the process's stderr meanwhile is held back and written after it, unless
  a `DataError` ends it: TensorFlow's C++ code logs a corrupted record in lines of its own
  (`W0000 ... corrupted record at N`), past `TF_CPP_MIN_LOG_LEVEL`, before the error that
  `_read_errors` turns into one line."""
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


@contextlib.contextmanager
def _read_errors(name: str, builder) -> Iterator[None]:
  """TensorFlow's errors for files that cannot be read (gone, corrupted) as `DataError`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  try:
    yield
  except (tf.errors.NotFoundError, tf.errors.DataLossError) as e:
    # "{{function_node ...}} corrupted record at 9915852 [Op:...]" -> "corrupted record at 9915852"
    reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", e.message).strip()
    raise _damaged(name, builder.data_dir, reason) from None
