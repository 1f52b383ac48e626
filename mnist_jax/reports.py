"""The training report: where the model is right and where it fails.

After training, `after_training` writes the test logits to `<workdir>/predictions.npz` (10,000 x 10
floats for MNIST), then `write_report` turns that file and `metrics.jsonl` into figures under
`<workdir>/plots/`, TensorBoard images, and `<workdir>/report.md`, so `--mode=report` can redo it
for a finished workdir without the trained parameters.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import ml_collections
import numpy as np

from mnist_jax import data, errors, metrics, parallel, plots, rundir, steps, summaries

NUM_MISTAKES = 25


class ReportError(errors.UserError):
  """A workdir that holds no finished run to report on."""


# ---------------------------------------------------------------------------------------------
# Predictions.


def save_predictions(config: ml_collections.ConfigDict, workdir: str, state: Any) -> None:
  """Writes the test split's logits, labels and class names to `<workdir>/predictions.npz`."""
  info = data.dataset_info(config.dataset, config.data_dir)
  test = data.load_split(config.dataset, "test", config.data_dir)
  logits_NC = steps.logits(state, test.images_NHWC, batch_size=config.eval_batch_size,
                           mean=config.pixel_mean, std=config.pixel_std)
  rundir.write_predictions(workdir, logits_NC, test.labels_N, info.class_names)


# ---------------------------------------------------------------------------------------------
# Numbers.


def log_softmax(logits_NC: np.ndarray) -> np.ndarray:
  shifted_NC = logits_NC - logits_NC.max(axis=1, keepdims=True)
  return shifted_NC - np.log(np.exp(shifted_NC).sum(axis=1, keepdims=True))


def confusion_counts(labels_N: np.ndarray, predicted_N: np.ndarray, num_classes: int) -> np.ndarray:
  """`counts[i, j]`: how many examples of true class i were predicted as class j."""
  flat = np.bincount(labels_N * num_classes + predicted_N, minlength=num_classes**2)
  return flat.reshape(num_classes, num_classes)


def recall_and_precision(counts_CC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per class: correct / examples of the class, and correct / predictions of the class (0 if none)."""
  correct_C = np.diag(counts_CC).astype(np.float64)
  recall_C = correct_C / np.maximum(counts_CC.sum(axis=1), 1)
  precision_C = correct_C / np.maximum(counts_CC.sum(axis=0), 1)
  return recall_C, precision_C


def most_confident_mistakes(probs_NC: np.ndarray, labels_N: np.ndarray, k: int) -> np.ndarray:
  """Indices of up to `k` wrong predictions, the most probable (to the model) first."""
  predicted_N = probs_NC.argmax(axis=1)
  wrong = np.flatnonzero(predicted_N != labels_N)
  confidence = probs_NC[wrong, predicted_N[wrong]]
  return wrong[np.argsort(-confidence, kind="stable")[:k]]


def history_columns(history: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Epoch records as one array per field of the first (NaN where a later record lacks it)."""
  return {field: np.array([record.get(field, np.nan) for record in history])
          for field in history[0]}


# ---------------------------------------------------------------------------------------------
# The report.


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def _seeds_section(history: dict[str, np.ndarray], config: dict[str, Any]) -> str:
  """With several seeds trained at once: the spread of their final metrics, a row a seed."""
  if "test_accuracy_per_seed" not in history:
    return ""
  accuracies, losses = history["test_accuracy_per_seed"][-1], history["test_loss_per_seed"][-1]
  first_seed = config.get("seed", 0)
  rows = [[first_seed + i, f"{a:.2%}", f"{l:.4f}"] for i, (a, l) in enumerate(zip(accuracies, losses))]
  return f"""
## {len(accuracies)} seeds trained together

Test accuracy {np.mean(accuracies):.2%} +- {np.std(accuracies):.2%} (mean +- std over seeds).
The figures and tables below are those of seed {first_seed}.

{_markdown_table(["seed", "test accuracy", "test loss"], rows)}
"""


def _report_markdown(workdir, config, history, counts_CC, class_names, test_loss, mistakes) -> str:
  recall_C, precision_C = recall_and_precision(counts_CC)
  num_examples = int(counts_CC.sum())
  correct = int(np.trace(counts_CC))
  columns = metrics.table_columns(history)
  epochs = [[f"{history[field][i]:{spec}}" for _, field, spec in columns]
            for i in range(len(history["epoch"]))]
  confusion = [
      [f"**{name}**", *counts_CC[i].tolist(), int(counts_CC[i].sum()), f"{recall_C[i]:.2%}"]
      for i, name in enumerate(class_names)
  ]
  confusion.append(["**precision**", *(f"{p:.2%}" for p in precision_C), "", ""])
  model_args = ", ".join(f"{k}={v}" for k, v in config.get("model_args", {}).items())
  return f"""# Training report: `{os.path.basename(os.path.normpath(workdir))}`

- data: {config.get('dataset')}, pixels (x / 255 - {config.get('pixel_mean')}) / {config.get('pixel_std')}
- model: {config.get('model')} ({model_args})
- training: {config.get('optimizer')}, learning rate {config.get('learning_rate')} \
({config.get('lr_schedule')}), batch {config.get('batch_size')}, {len(history['epoch'])} epochs, \
seed {config.get('seed')}
- redraw: `python -m mnist_jax.main --mode=report --workdir={workdir}`

| test accuracy | test loss | test examples | correct | mistakes |
|---|---|---|---|---|
| {correct / num_examples:.2%} | {test_loss:.4f} | {num_examples} | {correct} | {num_examples - correct} |
{_seeds_section(history, config)}
## Learning curves

![learning curves]({rundir.PLOTS}/learning_curves.png)

{_markdown_table([header for header, _, _ in columns], epochs)}

## The first 25 test images: prediction / truth

![test predictions]({rundir.PLOTS}/test_predictions.png)

## Confusion matrix

Rows: true class; columns: predicted class.

![confusion matrix]({rundir.PLOTS}/confusion_matrix.png)

{_markdown_table(["true (row), predicted (column)", *class_names, "examples", "recall"],
                  confusion)}

## The {len(mistakes)} most confident mistakes

![most confident mistakes]({rundir.PLOTS}/confident_mistakes.png)

Test index: position in the test split as tfds orders it.

{_markdown_table(["test index", "true", "predicted", "probability"], mistakes)}
"""


def write_report(workdir: str, writer: summaries.Writer | None = None) -> dict[str, float]:
  """Figures under `<workdir>/plots/`, `<workdir>/report.md`, and the figures to TensorBoard.

  Reads `config.json`, `metrics.jsonl` and `predictions.npz`; the test images come from the
  dataset named in `config.json`. Returns the seconds each figure took to draw and save.
  """
  try:
    config, predictions = rundir.read_config(workdir), rundir.read_predictions(workdir)
    history = history_columns(rundir.read_history(workdir))
  except rundir.RunFileError as e:
    raise ReportError(f"{e}; training writes the files of a report at its end, so train to the "
                      "end first") from None
  logits_NC, labels_N = predictions["logits_NC"], predictions["labels_N"]
  class_names = predictions["class_names"]
  test = data.load_split(config["dataset"], "test", config.get("data_dir"))
  if not np.array_equal(test.labels_N, labels_N):
    raise ReportError(f"the test labels of {config['dataset']} differ from those in "
                      f"{rundir.PREDICTIONS}; the dataset changed since training")
  log_probs_NC = log_softmax(logits_NC.astype(np.float64))
  probs_NC = np.exp(log_probs_NC)
  predicted_N = logits_NC.argmax(axis=1)
  test_loss = -float(np.mean(log_probs_NC[np.arange(len(labels_N)), labels_N]))
  counts_CC = confusion_counts(labels_N, predicted_N, len(class_names))
  accuracy = np.trace(counts_CC) / len(labels_N)
  mistakes = most_confident_mistakes(probs_NC, labels_N, NUM_MISTAKES)
  mistake_probs = probs_NC[mistakes, predicted_N[mistakes]]

  def captions(indices):
    return [f"{class_names[predicted_N[i]]} / {class_names[labels_N[i]]}" for i in indices]

  first = np.arange(min(25, len(labels_N)))
  figures = {
      "learning_curves": lambda: plots.learning_curves(history, metrics.splits_in(history)),
      "test_predictions": lambda: plots.image_grid(
          test.images_NHWC[first], captions(first), "First test images: prediction / truth",
          [plots.RIGHT_COLOR if predicted_N[i] == labels_N[i] else plots.WRONG_COLOR
           for i in first]),
      "confusion_matrix": lambda: plots.confusion_matrix(
          counts_CC, *recall_and_precision(counts_CC), class_names,
          f"Confusion matrix, {len(labels_N)} test examples, accuracy {accuracy:.2%}"),
      "confident_mistakes": lambda: plots.image_grid(
          test.images_NHWC[mistakes],
          [f"{caption}\np = {p:.4f}" for caption, p in zip(captions(mistakes), mistake_probs)],
          f"The {len(mistakes)} most confident mistakes: prediction / truth",
          [plots.WRONG_COLOR] * len(mistakes)),
  }
  plot_dir = os.path.join(workdir, rundir.PLOTS)
  seconds = plots.write_pngs(figures, plot_dir)
  mistake_rows = [[int(i), class_names[labels_N[i]], class_names[predicted_N[i]], f"{p:.4f}"]
                  for i, p in zip(mistakes, mistake_probs)]
  rundir.write_text(os.path.join(workdir, rundir.REPORT), _report_markdown(
      workdir, config, history, counts_CC, class_names, test_loss, mistake_rows))
  if writer is not None:
    writer.pngs(int(history["step"][-1]),
                {f"report/{name}": os.path.join(plot_dir, f"{name}.png") for name in figures})
  return seconds


def report_workdir(workdir: str) -> dict[str, float]:
  """`--mode=report`: redraws the report of a finished run from the files in its workdir."""
  if not os.path.isdir(workdir):
    raise ReportError(f"{workdir} is not a directory; give the --workdir of a finished run")
  if not os.access(workdir, os.W_OK):
    raise ReportError(f"{workdir} is not writable, and the report is written there")
  seconds = write_report(workdir, summaries.Writer(os.path.join(workdir, rundir.TENSORBOARD)))
  print(_written_line(workdir, seconds))
  return seconds


def after_training(config: ml_collections.ConfigDict, workdir: str, state: Any) -> None:
  """The end of a training run, on the process that writes: predictions, report, TensorBoard
  images. A failure is a warning: the metrics are already saved."""
  if not parallel.is_main_process():
    return
  model = steps.first_seed(state) if config.num_seeds > 1 else state
  try:
    save_predictions(config, workdir, parallel.local_copy(model))
    writer = summaries.Writer(os.path.join(workdir, rundir.TENSORBOARD))
    print(_written_line(workdir, write_report(workdir, writer)), flush=True)
  except Exception as e:  # pylint: disable=broad-except  # A report only looks at the run.
    print(f"mnist_jax: warning: no training report ({type(e).__name__}: {e}); metrics are in "
          f"{workdir}", file=sys.stderr)


def _written_line(workdir: str, seconds: dict[str, float]) -> str:
  return (f"report: {os.path.join(workdir, rundir.REPORT)} ({len(seconds)} figures in "
          f"{sum(seconds.values()):.2f}s, slowest {max(seconds.values()):.2f}s)")
