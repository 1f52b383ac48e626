"""A trained model on a labelled folder of one's own images: accuracy, NLL, ECE, each file's
prediction, and what was skipped. The report layer (report/studies.py) writes them into the
workdir.

  python -m mnist_jax.main --mode=eval --workdir=W --images_dir=my_digits   # -> W/eval/my_digits/

A labelled folder holds one subfolder per class (the layout of Keras'
`image_dataset_from_directory` and torchvision's `ImageFolder`), named by the class as the model's
dataset names it ("0" .. "9" for MNIST), by its index, or by its name with "/" written "_" (e.g.
"T-shirt_top" for Fashion-MNIST).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np

from mnist_jax import data, errors
from mnist_jax.run import checkpoints
from mnist_jax.studies import calibration, digits, predict


class StudyError(errors.UserError):
  """A folder that cannot be studied, with a message that says why."""


@dataclasses.dataclass(frozen=True)
class FolderEvaluation:
  """A model's predictions on a labelled folder: its images as framed, their labels, file names
  (relative to the folder) and log-probabilities, and `results` (results.json's content)."""

  images_NHWC: np.ndarray
  labels_N: np.ndarray
  names: list[str]
  log_probs_NC: np.ndarray
  class_names: tuple[str, ...]
  results: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# A labelled folder.


def _class_of(folder: str, class_names: tuple[str, ...]) -> int | None:
  for index, name in enumerate(class_names):
    if folder in (name, name.replace("/", "_"), str(index)):
      return index
  return None


def load_folder(directory: str, info: data.DatasetInfo
                ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
  """The images `[N, 28, 28]` of a labelled folder, framed as `info`'s dataset frames its own
  (`digits.mnist_like`), their labels and paths, and what was skipped. A file that cannot be
  used, a subfolder named by no class and an empty one are each a warning line and an entry of
  the skipped list (`<path>: <why>`)."""
  if not os.path.isdir(directory):
    raise StudyError(f"{directory} is not a directory; --images_dir takes a folder with one "
                     f"subfolder per class")
  subfolders = sorted(name for name in os.listdir(directory)
                      if os.path.isdir(os.path.join(directory, name)) and not name.startswith("."))
  class_names = info.class_names
  classes = {name: _class_of(name, class_names) for name in subfolders}
  if not any(index is not None for index in classes.values()):
    raise StudyError(f"{directory} has no subfolder named by a class of this model; expected "
                     f"subfolders such as {', '.join(repr(n) for n in class_names[:3])}, ...")
  images, labels, paths, skipped = [], [], [], []

  def skip(path: str, why: str) -> None:
    print(f"mnist_jax: {path}: {why}", file=sys.stderr, flush=True)
    skipped.append(f"{os.path.relpath(path, directory)}: {why}")

  for name, index in classes.items():
    folder = os.path.join(directory, name)
    if index is None:
      skip(folder, f"not a class of this model (classes: {', '.join(class_names)}); skipped")
      continue
    files = _files_below(folder)
    if not files:
      skip(folder, "empty")
    for path in files:
      if not os.path.isfile(path):  # A FIFO or a device would block or mislead the reader.
        skip(path, "not a regular file; skipped")
        continue
      try:
        images.append(digits.mnist_like(digits.load_image(path), info.name))
      except digits.ImageError as e:
        skip(path, f"{e}; skipped")
        continue
      labels.append(index)
      paths.append(path)
  if not images:
    raise StudyError(f"{directory} holds no image that can be read")
  return np.stack(images), np.array(labels, np.int32), paths, skipped


def _files_below(folder: str) -> list[str]:
  """Every file under `folder`, subfolders included (as Keras and torchvision read a class),
  in sorted order; hidden files and folders (`.DS_Store`, `.ipynb_checkpoints`) left out."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
  return found


def evaluate_folder(model: checkpoints.Restored, directory: str,
                    temperature: tuple[float, str] | None = None) -> FolderEvaluation:
  """Scores the model on the labelled folder `directory`.

  `temperature`: `predict.validation_temperature(model)`, to score calibrated probabilities.
  """
  info = predict.dataset_trained_on(model.meta)
  digits.check_takes_28x28_grayscale(info, "folder evaluation")
  start = time.perf_counter()
  images_NHW, labels_N, paths, skipped = load_folder(directory, info)
  loaded = time.perf_counter()
  log_probs_NC, logits_SNC = predict.log_probabilities_and_logits(model, images_NHW[..., None])
  predicted = time.perf_counter()
  temperature, fitted_on = temperature or (1.0, "")
  probs_NC = calibration.softmax_with_temperature(log_probs_NC, temperature)
  num = len(labels_N)
  results = {
      "folder": os.path.abspath(directory), "checkpoint": model.step, "images": num,
      "accuracy": float(np.mean(probs_NC.argmax(1) == labels_N)),
      "accuracy_per_seed": [float(np.mean(l.argmax(1) == labels_N)) for l in logits_SNC],
      "nll": calibration.negative_log_likelihood(log_probs_NC, labels_N, temperature),
      "ece": calibration.expected_calibration_error(probs_NC, labels_N),
      "mean_confidence": float(probs_NC.max(1).mean()),
      "temperature": temperature, "temperature_fitted_on": fitted_on,
      "images_per_s_predicting": num / max(predicted - loaded, 1e-9),
      "images_per_s_with_loading": num / max(predicted - start, 1e-9),
      "skipped": skipped,
  }
  return FolderEvaluation(images_NHW[..., None], labels_N,
                          [os.path.relpath(path, directory) for path in paths], log_probs_NC,
                          info.class_names, results)
