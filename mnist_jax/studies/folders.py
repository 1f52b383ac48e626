"""A trained model beyond its test accuracy: a labelled folder of one's own images, calibrated
confidence, and adversarial attacks. Each study writes `report.md` and figures into the workdir.

  python -m mnist_jax.main --mode=eval --workdir=W --images_dir=my_digits   # -> W/eval/my_digits/
  python -m mnist_jax.main --mode=attack --workdir=W                        # -> W/attack/

A labelled folder holds one subfolder per class (the layout of Keras'
`image_dataset_from_directory` and torchvision's `ImageFolder`), named by the class as the model's
dataset names it ("0" .. "9" for MNIST), by its index, or by its name with "/" written "_" (e.g.
"T-shirt_top" for Fashion-MNIST).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from mnist_jax import data, errors, steps
from mnist_jax.run import checkpoints, rundir
from mnist_jax.studies import attacks, calibration, digits, predict

EVAL_DIR = "eval"
ATTACK_DIR = "attack"


class StudyError(errors.UserError):
  """A folder or an attack that cannot be studied, with a message that says why."""


def log_probabilities(model: checkpoints.Restored, images_NHWC: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
  """For uint8 images: the model's log-probabilities `[N, C]` (of the seeds' mean for a run of
  several), and each seed's logits `[S, N, C]`, through one compiled program per batch shape."""
  config = model.config
  logits = steps.logits(model.state, images_NHWC, batch_size=config.eval_batch_size,
                        mean=config.pixel_mean, std=config.pixel_std, num_seeds=config.num_seeds)
  logits_SNC = logits if config.num_seeds > 1 else logits[None]
  return np.asarray(steps.ensemble_log_probabilities(logits_SNC)), logits_SNC


def fit_temperature(model: checkpoints.Restored) -> tuple[float, str]:
  """The model's temperature, fitted on its validation split; and which split that is."""
  fitted = calibration.fit_on_validation(model.config,
                                         lambda images: log_probabilities(model, images)[0])
  if fitted is None:
    raise StudyError("--calibrated fits a temperature on the run's validation split, and this run "
                     "has none; train with --config.validation_fraction=0.1 to hold one out")
  return fitted


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
  (`digits.mnist_like`), their labels and paths, and what was skipped.

  Nothing is left out without a word: a file that cannot be used, a subfolder named by no class,
  an empty class folder, a folder that cannot be listed (permission denied), a broken link, a
  link back to a folder that holds it, and a file beside the class folders are each a warning
  line and an entry of the skipped list (`<path>: <why>`). Links to folders and files are
  followed, as torchvision's `ImageFolder` follows them; hidden files and folders are left out.
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
  images, labels, paths, skipped = [], [], [], []

  def skip(path: str, why: str) -> None:
    print(f"mnist_jax: {path}: {why}", file=sys.stderr, flush=True)
    skipped.append(f"{os.path.relpath(path, directory)}: {why}")

  for name in names:
    folder = os.path.join(directory, name)
    if name not in classes:
      what = _not_a_file(folder)
      skip(folder, f"{what}; skipped" if what else
           "not in a class folder; skipped (images go in a subfolder named by their class)")
      continue
    index = classes[name]
    if index is None:
      skip(folder, f"not a class of this model (classes: {', '.join(class_names)}); skipped")
      continue
    entries = _files_below(folder, directory)
    if not entries:
      skip(folder, "empty")
    for path, why in entries:
      if why:
        skip(path, f"{why}; skipped")
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


def evaluate_folder(model: checkpoints.Restored, directory: str, workdir: str,
                    temperature: tuple[float, str] | None = None) -> dict[str, Any]:
  """Scores the model on a labelled folder; writes `<workdir>/eval/<folder name>/`.

  `temperature`: `fit_temperature(model)`, to report calibrated probabilities.
  """
  from mnist_jax.report import training  # pylint: disable=import-outside-toplevel  # Loads matplotlib.

  info = predict.dataset_info(model.meta)
  digits.check_takes_28x28_grayscale(info, "folder evaluation")
  start = time.perf_counter()
  images_NHW, labels_N, paths, skipped = load_folder(directory, info)
  loaded = time.perf_counter()
  log_probs_NC, logits_SNC = log_probabilities(model, images_NHW[..., None])
  predicted = time.perf_counter()
  temperature, fitted_on = temperature or (1.0, "")
  probs_NC = calibration.probabilities(log_probs_NC, temperature)
  num = len(labels_N)
  result = {
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
  # Named by the folder (a later evaluation of a folder of that name replaces it, whole).
  out_dir = os.path.join(workdir, EVAL_DIR, os.path.basename(os.path.realpath(directory)))
  shutil.rmtree(out_dir, ignore_errors=True)
  training.write_study(out_dir, f"Evaluation on `{result['folder']}`", images_NHW[..., None],
                      labels_N, log_probs_NC, info.class_names, model, result,
                      [os.path.relpath(path, directory) for path in paths])
  rundir.write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=2) + "\n")
  result["report"] = os.path.join(out_dir, rundir.REPORT)
  return result


# ---------------------------------------------------------------------------------------------
# Attacks.


def attack(model: checkpoints.Restored, workdir: str, eps: list[float], pgd_steps: int,
           num_examples: int | None = None) -> attacks.Robustness:
  """FGSM and PGD accuracy against eps on the test split; writes `<workdir>/attack/`."""
  from mnist_jax.report import training  # pylint: disable=import-outside-toplevel

  config: ml_collections.ConfigDict = model.config
  test = data.load_split(config.dataset, "test", config.data_dir)
  images, labels = test.images_NHWC[:num_examples], test.labels_N[:num_examples]
  result = attacks.accuracy_under_attack(
      model.state, images, labels, eps, mean=config.pixel_mean, std=config.pixel_std,
      num_seeds=config.num_seeds, pgd_steps=pgd_steps)
  training.write_attack_report(os.path.join(workdir, ATTACK_DIR), result, images, labels,
                              predict.dataset_info(model.meta).class_names, model.step)
  return result
