"""A sweep's summary as files: `sweep_summary.csv` (every number) and `sweep_summary.md` (a
ranked table), from the rows of its finished points."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from typing import Any

SUMMARY_MD, SUMMARY_CSV = "sweep_summary.md", "sweep_summary.csv"


def aggregate(results: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
  """`<name>_mean` and `<name>_std` (sample standard deviation; NaN for one seed) per metric."""
  row = {}
  for name in names:
    values = [float(result[name]) for result in results]
    row[f"{name}_mean"] = statistics.fmean(values)
    row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
  return row


def summary_texts(
    points: Sequence[Any], rows: Sequence[dict[str, Any]], metric: str,
    accuracies: Sequence[str], title: str,
) -> dict[str, str]:
  """`sweep_summary.csv` (every number) and `sweep_summary.md` (a ranked table), by name."""
  fields = list(dict.fromkeys(key for point in points for key in point.overrides))
  columns = ["point", *fields, "seeds"] + [
      f"{name}_{stat}" for name in [*accuracies, "train_time_s"] for stat in ("mean", "std")
  ]
  table = io.StringIO()
  writer = csv.DictWriter(table, columns, restval="")
  writer.writeheader()
  writer.writerows(rows)

  def cell(row, name, scale=100, digits=2):
    mean, std = row[f"{name}_mean"] * scale, row[f"{name}_std"] * scale
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"

  lines = [
      f"# Sweep: {title}",
      "",
      f"{len(rows)} of {len(points)} points finished. Ranked by `{metric}` (%) of the last "
      "epoch, mean ± sample standard deviation over the seeds; train time in seconds per run.",
  ]
  if metric == "test_accuracy":
    lines.append("No validation split (`config.validation_fraction` is 0): the ranking reads the "
                 "test set, so the best row's test accuracy is an optimistic estimate.")
  lines += [
      "",
      "| rank | " + " | ".join([*fields, *accuracies, "train time (s)", "seeds"]) + " |",
      "|" + "---|" * (len(fields) + len(accuracies) + 3),
  ]
  for rank, row in enumerate(rows, 1):
    values = [str(row[field]) if field in row else "" for field in fields]
    values += [cell(row, name) for name in accuracies]
    values += [cell(row, "train_time_s", scale=1, digits=1), str(row["seeds"])]
    lines.append(f"| {rank} | " + " | ".join(values) + " |")
  return {SUMMARY_CSV: table.getvalue(), SUMMARY_MD: "\n".join(lines) + "\n"}
