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

import concurrent.futures
import dataclasses
import os
import stat
import sys
import time
from typing import Any

import numpy as np

from mnist_jax import data, errors
from mnist_jax.run import checkpoints, workers
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


def load_folder(directory: str, info: data.DatasetInfo,
                pool: concurrent.futures.Executor | None = None
                ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
  """The images `[N, 28, 28]` of a labelled folder, framed as `info`'s dataset frames its own
  (`digits.mnist_like`), their labels and paths, and what was skipped.

  Nothing is left out without a word: a file that cannot be used, a subfolder named by no class,
  an empty class folder, a folder that cannot be listed (permission denied), a broken link, a
  link back to a folder that holds it, and a file beside the class folders are each a warning
  line and an entry of the skipped list (`<path>: <why>`). Links to folders and files are
  followed, as torchvision's `ImageFolder` follows them; hidden files and folders are left out.
  With `pool` (`workers.forked`), its workers frame the images side by side.
  """
  if not os.path.isdir(directory):
    raise StudyError(f"{directory} is not a directory; --images_dir takes a folder with one "
                     f"subfolder per class")
  try:
    names = sorted(name for name in os.listdir(directory) if not name.startswith("."))
  except OSError as e:
    raise StudyError(f"{directory} cannot be listed ({_reason(e)})") from None
  class_names = info.class_names
  classes = {name: _class_of(name, class_names) for name in names
             if os.path.isdir(os.path.join(directory, name))}
  if not any(index is not None for index in classes.values()):
    raise StudyError(f"{directory} has no subfolder named by a class of this model; expected "
                     f"subfolders such as {', '.join(repr(n) for n in class_names[:3])}, ...")
  entries = []  # (path, class index, why it is skipped), in the order they are reported.
  for name in names:
    folder = os.path.join(directory, name)
    if name not in classes:
      what = _not_a_file(folder)
      entries.append((folder, None, f"{what}; skipped" if what else
                      "not in a class folder; skipped (images go in a subfolder named by their "
                      "class)"))
      continue
    index = classes[name]
    if index is None:
      entries.append((folder, None, f"not a class of this model (classes: "
                                    f"{', '.join(class_names)}); skipped"))
      continue
    files = _files_below(folder, directory)
    if not files:
      entries.append((folder, None, "empty"))
    entries += [(path, index, why and f"{why}; skipped") for path, why in files]
  futures = [None if why else workers.submit(pool, digits.framed_file, path, info.name)
             for path, _, why in entries]
  images, labels, paths, skipped = [], [], [], []
  for (path, index, why), future in zip(entries, futures):
    if why is None:
      try:
        images.append(workers.result(future, digits.framed_file, path, info.name))
        labels.append(index)
        paths.append(path)
        continue
      except digits.ImageError as e:
        why = f"{e}; skipped"
    print(f"mnist_jax: {path}: {why}", file=sys.stderr, flush=True)
    skipped.append(f"{os.path.relpath(path, directory)}: {why}")
  if not images:
    raise StudyError(f"{directory} holds no image that can be read")
  return np.stack(images), np.array(labels, np.int32), paths, skipped


def _files_below(folder: str, holder: str | None = None) -> list[tuple[str, str | None]]:
  """Every file under `folder`, subfolders and linked folders included (as Keras and torchvision
  read a class), in sorted order, each with None or why it cannot be read (a folder that cannot
  be listed, a broken link, a link back to `folder`, a folder inside it or `holder`, not a
  regular file); hidden files and folders (`.DS_Store`, `.ipynb_checkpoints`) left out."""
  found: list[tuple[str, str | None]] = []
  holders = frozenset()
  if holder is not None:
    status = os.stat(holder)
    holders = frozenset({(status.st_dev, status.st_ino)})
  # Depth first, in order: a stack rather than recursion, which deep trees would exhaust.
  pending: list[tuple[str, frozenset[tuple[int, int]] | None]] = [(folder, holders)]
  while pending:
    path, ancestors = pending.pop()
    if ancestors is None:  # A file.
      found.append((path, _not_a_file(path)))
      continue
    try:
      status = os.stat(path)
      if (status.st_dev, status.st_ino) in ancestors:
        found.append((path, "a link to a folder that holds it (a loop): not followed"))
        continue
      with os.scandir(path) as listing:
        entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
      found.append((path, f"cannot be listed ({_reason(e)}): the files in it are not read"))
      continue
    ancestors |= {(status.st_dev, status.st_ino)}
    for entry in reversed(entries):  # Links to folders are followed.
      pending.append((entry.path, ancestors if os.path.isdir(entry.path) else None))
  return found


def _not_a_file(path: str) -> str | None:
  """None for a regular file (or a link to one); else what it is."""
  if os.path.islink(path) and not os.path.exists(path):
    return f"a broken link (to {os.readlink(path)})"
  try:
    if stat.S_ISREG(os.stat(path).st_mode):
      return None
  except OSError as e:
    return f"cannot be read ({_reason(e)})"
  return "not a regular file"  # A FIFO or a device would block or mislead the reader.


def _reason(error: OSError) -> str:
  if isinstance(error, PermissionError):
    return "permission denied"
  return error.strerror or str(error)


def evaluate_folder(model: checkpoints.Restored, directory: str,
                    temperature: tuple[float, str] | None = None,
                    pool: concurrent.futures.Executor | None = None) -> FolderEvaluation:
  """Scores the model on the labelled folder `directory`.

  `temperature`: `predict.validation_temperature(model)`, to score calibrated probabilities.
  `pool`: workers that frame the images (`load_folder`).
  """
  info = predict.dataset_trained_on(model.meta)
  digits.check_takes_28x28_grayscale(info, "folder evaluation")
  start = time.perf_counter()
  images_NHW, labels_N, paths, skipped = load_folder(directory, info, pool)
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
