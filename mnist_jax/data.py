"""Turns a dataset name into arrays or batches: whole splits in memory, index slices of them,
normalization, and a tf.data stream.

A whole split is decoded once from tfds' prepared files (`sources.py`) and kept as arrays beside
them, so a run that finds them starts without importing TensorFlow. Where TensorFlow is not
installed, MNIST is read from the bundled files with numpy, in the order tfds would give.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mnist_jax.run import rundir, sources
from mnist_jax.run.sources import DataError, have_tensorflow


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


# ---------------------------------------------------------------------------------------------
# The bundled MNIST, read with numpy only.


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
  images = sources.read_bundled_mnist(split, "images")[..., None]
  labels = sources.read_bundled_mnist(split, "labels").astype(np.int32)
  order = tfds_order(len(labels), split)
  return Split(images[order], labels[order])


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
  features = sources.prepared_builder(name, data_dir).info.features
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
  if name == "mnist" and split in sources.MNIST_FILES and not have_tensorflow():
    return sources.read_bundled_mnist(split, "labels")
  return None


def load_tfds(name: str, split: str, data_dir: str | None = None) -> Split:
  """Loads a whole tfds split into memory as uint8 images and int32 labels."""
  builder = sources.prepared_builder(name, data_dir)
  with sources.read_errors(name, builder):
    arrays = sources.import_tfds().as_numpy(
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
  elif name == "mnist" and split in sources.MNIST_FILES:
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
  root = sources.data_root(data_dir)
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
  tfds = sources.import_tfds()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  builder = sources.prepared_builder(name, data_dir)
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
  with sources.read_errors(name, builder):
    yield from tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))
