"""The metrics of a run, declared once.

An epoch's record (a line of `metrics.jsonl`) holds `<split>_<metric>` for every split the run
evaluates and every metric below; with several seeds also `<split>_<metric>_std` and
`<split>_<metric>_per_seed`. The epoch line, the TensorBoard tags, the learning curves, the
report's tables and the sweep's columns are all derived from `SPLITS` and `NAMES`, so a split
or a metric added here shows up everywhere.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")  # In the order every line, table and plot shows them.
NAMES = {"loss": "loss", "accuracy": "acc"}  # Name -> abbreviation on the epoch line.
RUN_SCALARS = ("learning_rate", "epoch_time_s", "examples_per_s")  # Per epoch, not per split.


def key(split: str, metric: str) -> str:
  """The record field of a split's metric, e.g. `val_accuracy`."""
  return f"{split}_{metric}"


def splits_in(record: Mapping[str, Any]) -> list[str]:
  """The splits a record (or a table of records, keyed alike) has metrics for, in `SPLITS` order."""
  return [split for split in SPLITS if key(split, "loss") in record]


def check_record(record: Any) -> dict[str, Any]:
  """An epoch's record as read back (from a run file or a checkpoint), if it holds what this
  module describes: a whole `epoch` and `step`, and a number for every metric of each split it
  has; else `ValueError` saying what is wrong."""
  if not isinstance(record, dict):
    raise ValueError(f"an epoch is a JSON {type(record).__name__}")
  for field in ("epoch", "step"):
    if not isinstance(record.get(field), int) or isinstance(record.get(field), bool):
      raise ValueError(f"an epoch without a whole number {field!r}")
  for field in [key(split, name) for split in splits_in(record) for name in NAMES]:
    if not isinstance(record.get(field), numbers.Real):
      raise ValueError(f"epoch {record['epoch']}: {field} is no number")
  return record


def selection_metric(config: Mapping[str, Any]) -> str:
  """What ranks checkpoints, early stopping and sweeps: validation accuracy where a validation
  split is held out (`config.validation_fraction`), else test accuracy."""
  return key("val" if config.get("validation_fraction", 0) else "test", "accuracy")


def split_record(split: str, values: Mapping[str, Any]) -> dict[str, Any]:
  """`<split>_<metric>` of every metric in `values` (host or device scalars, or one per seed);
  with one value per seed, their mean and also `_std` and `_per_seed`."""
  record = {}
  for metric in NAMES:
    values_S = np.asarray(values[metric])
    record[key(split, metric)] = float(values_S.mean())
    if values_S.ndim:
      record[key(split, metric) + "_std"] = float(values_S.std())
      record[key(split, metric) + "_per_seed"] = values_S.tolist()
  return record


def epoch_line(record: Mapping[str, Any], num_epochs: int) -> str:
  """`epoch 3/10  train_loss 0.0712  train_acc 0.9781  ...  0.31s`; with seeds, mean+-std."""
  parts = [f"epoch {record['epoch']}/{num_epochs}"]
  for split in splits_in(record):
    for metric, short in NAMES.items():
      field = key(split, metric)
      spread = f"+-{record[field + '_std']:.4f}" if field + "_std" in record else ""
      parts.append(f"{split}_{short} {record[field]:.4f}{spread}")
  parts.append(f"{record['epoch_time_s']:.2f}s")
  return "  ".join(parts)


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """TensorBoard tag -> value of one epoch: `<split>/<metric>` and the run's own scalars."""
  tags = {f"{split}/{metric}": record[key(split, metric)]
          for split in splits_in(record) for metric in NAMES}
  return {**tags, **{name: record[name] for name in RUN_SCALARS if name in record}}


def table_columns(history: Mapping[str, Any]) -> list[tuple[str, str, str]]:
  """(header, field, format) of the per-epoch table: every split's metrics, then the epoch time."""
  columns = [(f"{split} {metric}", key(split, metric), ".4f")
             for split in splits_in(history) for metric in NAMES]
  return [("epoch", "epoch", "d"), *columns, ("epoch time (s)", "epoch_time_s", ".2f")]


def ranking_fields(results: Sequence[Mapping[str, Any]]) -> list[str]:
  """The accuracies a sweep summary shows for its runs: every evaluated split's but train's."""
  return [key(split, "accuracy") for split in splits_in(results[0]) if split != "train"]
