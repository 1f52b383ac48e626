"""Owns the files of a run directory (`--workdir`): their names, how they are written and read.

  config.json          the resolved config (written when training starts)
  metrics.jsonl        one JSON object per epoch (fields: metrics.py, which checks them as read)
  final_metrics.json   the last epoch's record and the run's totals (written when training ends)
  predictions.npz      the trained model's test logits, labels and class names (for the report)

Every file is written whole or not at all: to a temporary name in the same directory, then
renamed, so a crash or a full disk leaves the previous version, never half of a new one. Every
reader checks what it reads and raises `RunFileError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from typing import IO, Any

import ml_collections
import numpy as np

from mnist_jax import errors

CONFIG = "config.json"
METRICS = "metrics.jsonl"
FINAL_METRICS = "final_metrics.json"
PREDICTIONS = "predictions.npz"
REPORT = "report.md"
PLOTS = "plots"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
UNREADABLE_CHECKPOINTS = "checkpoints_unreadable"
TRAIN_LOCK = "train.lock"


_UMASK = os.umask(0o022)  # Read once, at import, before any thread creates files;
os.umask(_UMASK)  # a temporary file is made 0600, the file it becomes gets the usual mode.


class RunFileError(errors.UserError):
  """A run file that is missing or damaged."""


def write_atomic(path: str, write: Callable[[IO[bytes]], Any]) -> None:
  """Calls `write(f)` on a new temporary file beside `path`, then renames it to `path`.

  Raises:
    RunFileError: the file cannot be written (a full disk, a read-only directory); any
      previous version of it is left as it was.
  """
  try:
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(path)), delete=False,
                                     prefix=f".{os.path.basename(path)}.") as f:
      try:
        write(f)
        f.flush()
        os.fchmod(f.fileno(), 0o666 & ~_UMASK)
        os.fsync(f.fileno())
      except BaseException:
        os.remove(f.name)
        raise
    os.replace(f.name, path)
  except OSError as e:
    raise RunFileError(f"cannot write {path} ({e.strerror or e})") from None


def write_text(path: str, text: str) -> None:
  write_atomic(path, lambda f: f.write(text.encode()))


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise RunFileError(f"{path} does not exist") from None
  except (OSError, UnicodeDecodeError) as e:
    raise RunFileError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def _parse_json(text: str, path: str, what: type) -> Any:
  try:
    value = json.loads(text)
  except ValueError as e:
    raise RunFileError(f"{path} is damaged (not JSON: {e})") from None
  if not isinstance(value, what):
    raise RunFileError(f"{path} is damaged (a JSON {type(value).__name__}, not an object)")
  return value


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (tuples become lists), as run files and checkpoints hold it."""
  return json.loads(config.to_json_best_effort())


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  write_text(os.path.join(workdir, CONFIG), json.dumps(config_dict(config), indent=2) + "\n")


def read_config(workdir: str) -> dict[str, Any]:
  """`config.json` as a dict; it must name the dataset."""
  path = os.path.join(workdir, CONFIG)
  config = _parse_json(_read_text(path), path, dict)
  if not isinstance(config.get("dataset"), str):
    raise RunFileError(f"{path} is damaged (no dataset name)")
  return config


def write_history(workdir: str, history: Sequence[dict[str, Any]]) -> None:
  """`metrics.jsonl`, one line per epoch so far (rewritten whole at each epoch)."""
  write_text(os.path.join(workdir, METRICS), "".join(json.dumps(r) + "\n" for r in history))


def _checked(record: Any, check_record: Callable[[Any], Any], path: str) -> dict[str, Any]:
  try:
    return check_record(record)
  except ValueError as e:
    raise RunFileError(f"{path} is damaged ({e})") from None


def read_history(workdir: str, check_record: Callable[[Any], Any]) -> list[dict[str, Any]]:
  """`metrics.jsonl` as a list of epoch records, at least one, each passed by `check_record`
  (`metrics.check_record`: it raises `ValueError` on a damaged record)."""
  path = os.path.join(workdir, METRICS)
  lines = [line for line in _read_text(path).splitlines() if line.strip()]
  if not lines:
    raise RunFileError(f"{path} holds no epoch; the run trained for zero epochs")
  return [_checked(_parse_json(line, path, object), check_record, path) for line in lines]


def write_final(workdir: str, final: dict[str, Any]) -> None:
  write_text(os.path.join(workdir, FINAL_METRICS), json.dumps(final, indent=2) + "\n")


def read_final(workdir: str, check_record: Callable[[Any], Any]) -> dict[str, Any]:
  """`final_metrics.json`, checked as an epoch's record by `check_record` (see read_history)."""
  path = os.path.join(workdir, FINAL_METRICS)
  return _checked(_parse_json(_read_text(path), path, dict), check_record, path)


def write_predictions(workdir: str, logits_NC: np.ndarray, labels_N: np.ndarray,
                      class_names: Sequence[str], **extras: np.ndarray) -> None:
  """The test logits, labels and class names; `extras` are `_EXTRAS` (see read_predictions)."""
  assert set(extras) <= set(_EXTRAS), extras
  write_atomic(os.path.join(workdir, PREDICTIONS), lambda f: np.savez_compressed(
      f, logits_NC=logits_NC.astype(np.float32), labels_N=labels_N,
      class_names=np.array(class_names), **extras))


# Written by newer versions: the temperature fitted on held-out data (and a description of it),
# and the saliency maps `[K, H, W]` of the K test images at `saliency_index_K`.
_EXTRAS = ("temperature", "temperature_fitted_on", "saliency_KHW", "saliency_index_K")


def read_predictions(workdir: str) -> dict[str, np.ndarray]:
  """`predictions.npz`: `logits_NC` float, `labels_N` ints in `[0, C)`, `class_names` `[C]`."""
  path = os.path.join(workdir, PREDICTIONS)
  try:
    with np.load(path, allow_pickle=False) as saved:
      logits_NC, labels_N, names_C = (saved[k] for k in ("logits_NC", "labels_N", "class_names"))
      extras = {k: saved[k] for k in _EXTRAS if k in saved.files}
  except FileNotFoundError:
    raise RunFileError(f"{path} does not exist") from None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise RunFileError(f"{path} is damaged ({type(e).__name__}: {e})") from None
  num_classes = len(names_C)
  shapes_fit = logits_NC.ndim == 2 and logits_NC.shape == (len(labels_N), num_classes)
  types_fit = (np.issubdtype(logits_NC.dtype, np.floating)
               and np.issubdtype(labels_N.dtype, np.integer) and labels_N.ndim == 1)
  if not (shapes_fit and types_fit and ((labels_N >= 0) & (labels_N < num_classes)).all()):
    raise RunFileError(f"{path} is damaged (logits {logits_NC.shape}, labels {labels_N.shape}, "
                       f"{num_classes} class names)")
  saliency_KHW, shown_K = extras.get("saliency_KHW"), extras.get("saliency_index_K")
  saliency_fits = (saliency_KHW is None and shown_K is None) or (
      saliency_KHW is not None and shown_K is not None and saliency_KHW.ndim == 3
      and len(saliency_KHW) == len(shown_K) and np.all((shown_K >= 0) & (shown_K < len(labels_N))))
  temperature = extras.get("temperature", np.float32(1.0))
  if not (saliency_fits and temperature.ndim == 0 and np.isfinite(temperature) and temperature > 0):
    raise RunFileError(f"{path} is damaged (its temperature or saliency maps)")
  return {"logits_NC": logits_NC, "labels_N": labels_N,
          "class_names": [str(name) for name in names_C], **extras}
