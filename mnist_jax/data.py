"""Turns a dataset name into arrays: whole splits in memory, index slices of them, and
normalization.

Records come from `run/sources.py` (the bundled MNIST with numpy; other datasets through tfds,
with TensorFlow). A whole split is read from there once and kept as arrays in tfds' data dir, under
a digest of its records, so that later runs load it in a fraction of the time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from mnist_jax.run import rundir, sources


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
      pass  # Damaged: asked of the source again below.
  info = DatasetInfo(name, *sources.info(name, data_dir))
  _keep(_kept_path(name, "info.json", data_dir),  # The source is prepared by now.
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
  return kept["labels"] if kept is not None else sources.read_labels(name, split)


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

  A whole split is read from its source once and kept; later loads read what was kept.
  """
  match = _SLICE.match(split)
  if not match:
    return Split(*sources.read_split(name, split, data_dir))
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
  whole = Split(*sources.read_split(name, split, data_dir))  # Not kept, or damaged: read again.
  _keep(_kept_path(name, f"{split}.npz", data_dir),  # The source is prepared by now.
        lambda f: np.savez(f, images=whole.images_NHWC, labels=whole.labels_N))
  return whole


def _kept_path(name: str, filename: str, data_dir: str | None) -> str | None:
  """Where the arrays and info of `name` are kept: in tfds' data dir, under a digest of the records
  they were read from (`sources.identity`), so that records that change are read anew. None where
  there are no records yet (a tfds dataset not prepared, or under `tfds.testing.mock_data`)."""
  identity = sources.identity(name, data_dir)
  if identity is None:
    return None
  return os.path.join(sources.data_root(data_dir), "mnist_jax_decoded", name, identity, filename)


def _keep(path: str | None, write: Callable[[Any], Any]) -> None:
  """Writes a file whole or not at all, so that processes reading at once do not mix; a
  directory that refuses writes only costs the next run a read from the source."""
  if path is None:
    return
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.write_atomic(path, write)
  except (OSError, rundir.RunFileError):
    pass


def normalize(images: Any, mean: float, std: float) -> Any:
  """uint8 pixels -> float32: divided by 255 (the notebook's step), then `(x - mean) / std`.

  Written with operators only, so the same line serves numpy, JAX and TensorFlow arrays of float32.
  """
  return (images / 255.0 - mean) / std
