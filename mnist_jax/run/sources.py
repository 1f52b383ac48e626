"""Where a dataset's records come from: the MNIST files bundled with this package, and tfds'
prepared data.

tfds is the source of truth. MNIST ships with the package (the original IDX files), so that
`tfds.load("mnist")` works on machines that reach no dataset host: the first `builder("mnist")`
prepares it from the bundled files through tfds' own `MNIST` builder, and prepares it again where
it was damaged. Any prepared dataset's files are checked before tfds reads them, and an error
while reading them is one line (`DataError`). `data.py` turns what these give into arrays.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import gzip
import hashlib
import importlib.resources
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np
from PIL import Image

from mnist_jax import errors
from mnist_jax.run import rundir

BUNDLED_MNIST = importlib.resources.files("mnist_jax") / "bundled" / "mnist"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {"images": 2051, "labels": 2049}


class DataError(errors.UserError):
  """A dataset that cannot be loaded, with a message that says what to do."""


def have_tensorflow() -> bool:
  """Whether TensorFlow and tfds can be imported here."""
  try:
    import_tfds()
  except ImportError:
    return False
  return True


@functools.cache
def import_tfds():
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


# ---------------------------------------------------------------------------------------------
# Preparing the bundled MNIST for tfds.


def _prepare_bundled_mnist(data_dir: str | None) -> None:
  """Writes tfds' `mnist` into `data_dir` from the bundled files, with tfds' own builder."""
  tfds = import_tfds()
  extracted: dict[str, str] = {}

  class BundledMNIST(tfds.image_classification.MNIST, skip_registration=True):
    name = "mnist"

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download: the files ship with this package.
      out_dir = os.path.join(self.data_dir_root, "downloads", "mnist_jax_bundled")
      os.makedirs(out_dir, exist_ok=True)
      for images_file, labels_file in MNIST_FILES.values():
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
          for split, (images_file, labels_file) in MNIST_FILES.items()
      ]

    def _generate_examples(self, num_examples, data_path, label_path):
      # tfds stores PNG bytes as given, and Pillow encodes them faster than tfds' own encoder, a
      # TensorFlow op an image (docs/2026-12-01-speed-and-suite.md); decoded, the same pixels.
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
# tfds' prepared data, checked before it is read.


def prepared_builder(name: str, data_dir: str | None):
  """A prepared tfds builder for `name`, preparing the bundled MNIST where needed.

  A prepared `name` whose files are missing, cut short or unreadable is damaged: MNIST is
  prepared again (with a warning); another dataset is a `DataError` that says what to do.
  """
  tfds = import_tfds()
  if name == "mnist":
    return _prepared_mnist(data_dir)
  try:
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


def data_root(data_dir: str | None) -> str:
  """The tfds data dir: `data_dir`, else `TFDS_DATA_DIR`, else tfds' default."""
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
  tfds = import_tfds()
  version = str(tfds.image_classification.MNIST.VERSION)
  version_dir = os.path.join(data_root(data_dir), "mnist", version)

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
