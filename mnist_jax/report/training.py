"""The training report: where the model is right and where it fails.

`write_report` turns the test logits (10,000 x 10 floats for MNIST) and `metrics.jsonl` into
figures under `<workdir>/plots/`, TensorBoard images, and `<workdir>/report.md`. After training it
computes the logits and writes them to `<workdir>/predictions.npz`, so that `--mode=report` can
redo the report of a finished workdir without the trained parameters.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import ml_collections
import numpy as np

from mnist_jax import data, errors, metrics, steps
from mnist_jax.report import drawing, tables
from mnist_jax.run import parallel, rundir, summaries
from mnist_jax.studies import calibration, predict, saliency


class ReportError(errors.UserError):
  """A workdir that holds no finished run to report on."""


# ---------------------------------------------------------------------------------------------
# Predictions: `predictions.npz`, all the report needs of the trained parameters.


def _test_logits(config: ml_collections.ConfigDict, state: Any, test: data.Split
                 ) -> dict[str, np.ndarray]:
  """The first arrays of `predictions.npz`: the test split's logits, labels and class names."""
  logits_NC = predict.logits(state, test.images_NHWC, batch_size=config.eval_batch_size,
                             mean=config.pixel_mean, std=config.pixel_std)
  class_names = data.dataset_info(config.dataset, config.data_dir).class_names
  return dict(logits_NC=logits_NC, labels_N=test.labels_N, class_names=np.array(class_names))


def _saliency_maps(config: ml_collections.ConfigDict, state: Any, test: data.Split,
                   logits_NC: np.ndarray, mistakes: np.ndarray) -> dict[str, np.ndarray]:
  """`predictions.npz`'s saliency maps of the test images at `mistakes` (the most confident
  mistakes), for the predicted class."""
  if not len(mistakes):
    return {}
  saliency_KHWC = saliency.saliency(state, test.images_NHWC[mistakes],
                                    logits_NC[mistakes].argmax(1), mean=config.pixel_mean,
                                    std=config.pixel_std)
  return dict(saliency_KHW=np.asarray(saliency_KHWC).max(axis=-1), saliency_index_K=mistakes)


def _temperature(config: ml_collections.ConfigDict, state: Any) -> dict[str, np.ndarray]:
  """`predictions.npz`'s temperature, fitted on the run's validation split (calibration.py), and
  a description of that split; nothing for a run without one."""
  fitted = calibration.fit_on_validation(config, lambda images: predict.logits(
      state, images, batch_size=config.eval_batch_size, mean=config.pixel_mean,
      std=config.pixel_std))
  return {} if fitted is None else dict(temperature=np.float32(fitted[0]),
                                        temperature_fitted_on=np.array(fitted[1]))


# ---------------------------------------------------------------------------------------------
# The report.


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

{tables.markdown_table(["seed", "test accuracy", "test loss"], rows)}
"""


def _report_markdown(workdir, config, history, counts_CC, class_names, test_loss, mistakes,
                     calibration_text, saliency_text) -> str:
  num_examples = int(counts_CC.sum())
  correct = int(np.trace(counts_CC))
  columns = metrics.table_columns(history)
  epochs = [[f"{history[field][i]:{spec}}" for _, field, spec in columns]
            for i in range(len(history["epoch"]))]
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

{tables.markdown_table([header for header, _, _ in columns], epochs)}

## The first 25 test images: prediction / truth

![test predictions]({rundir.PLOTS}/test_predictions.png)

## Confusion matrix

Rows: true class; columns: predicted class.

![confusion matrix]({rundir.PLOTS}/confusion_matrix.png)

{tables.confusion_table(counts_CC, class_names)}
{calibration_text}
## The {len(mistakes)} most confident mistakes

![most confident mistakes]({rundir.PLOTS}/confident_mistakes.png)

Test index: position in the test split as tfds orders it.

{tables.markdown_table(["test index", "true", "predicted", "probability"], mistakes)}
{saliency_text}"""


def write_report(workdir: str, writer: summaries.Writer | None = None,
                 trained: tuple[ml_collections.ConfigDict, Any] | None = None
                 ) -> dict[str, float]:
  """Figures under `<workdir>/plots/`, `<workdir>/report.md`, and the figures to TensorBoard.

  Reads `config.json`, `metrics.jsonl` and `predictions.npz`; the test images come from the
  dataset named in `config.json`. With `trained`, the config and state of the run just trained,
  computes the predictions and writes `predictions.npz` instead, and the figures that need only
  the metrics or the logits are drawn meanwhile. Returns the seconds each figure took to draw and
  save.
  """

  def read(read_file):
    try:
      return read_file(workdir)
    except rundir.RunFileError as e:
      raise ReportError(f"{e}; training writes the files of a report at its end, so train to the "
                        "end first") from None

  config = read(rundir.read_config)
  history = tables.history_columns(read(lambda w: rundir.read_history(w, metrics.check_record)))
  plot_dir = os.path.join(workdir, rundir.PLOTS)
  Plot = drawing.Plot
  waits = [drawing.start(
      {"learning_curves": Plot("learning_curves", history, metrics.splits_in(history))}, plot_dir)]
  test = data.load_split(config["dataset"], "test", config.get("data_dir"))
  if trained is None:
    predictions = read(rundir.read_predictions)
    if not np.array_equal(test.labels_N, predictions["labels_N"]):
      raise ReportError(f"the test labels of {config['dataset']} differ from those in "
                        f"{rundir.PREDICTIONS}; the dataset changed since training")
  else:
    predictions = _test_logits(*trained, test)
  logits_NC, labels_N = predictions["logits_NC"], predictions["labels_N"]
  class_names = predictions["class_names"]
  log_probs_NC = calibration.log_softmax(logits_NC)
  probs_NC = np.exp(log_probs_NC)
  predicted_N = logits_NC.argmax(axis=1)
  test_loss = -float(np.mean(log_probs_NC[np.arange(len(labels_N)), labels_N]))
  counts_CC = tables.confusion_counts(labels_N, predicted_N, len(class_names))
  accuracy = np.trace(counts_CC) / len(labels_N)
  mistakes = tables.most_confident_mistakes(probs_NC, labels_N, tables.NUM_MISTAKES)
  mistake_probs = probs_NC[mistakes, predicted_N[mistakes]]

  def captions(indices):
    return [f"{class_names[predicted_N[i]]} / {class_names[labels_N[i]]}" for i in indices]

  # Each figure starts as soon as its arrays are ready; the slowest first, so that the workers
  # finish together.
  waits.append(drawing.start({
      "confusion_matrix": Plot(
          "confusion_matrix", counts_CC, *tables.recall_and_precision(counts_CC), class_names,
          f"Confusion matrix, {len(labels_N)} test examples, accuracy {accuracy:.2%}"),
      "reliability": tables.reliability_figure(logits_NC, labels_N, "test split"),
  }, plot_dir))
  if trained is not None:
    predictions.update(_saliency_maps(*trained, test, logits_NC, mistakes))
  saliency_text = ""
  if "saliency_KHW" in predictions:  # Written by versions since saliency maps.
    shown = predictions["saliency_index_K"]
    waits.append(drawing.start({"mistake_saliency": tables.saliency_figure(
        test.images_NHWC[shown], predictions["saliency_KHW"], captions(shown))}, plot_dir))
    saliency_text = tables.SALIENCY_TEXT.format(figure=f"{rundir.PLOTS}/mistake_saliency.png")
  first = np.arange(min(25, len(labels_N)))
  waits.append(drawing.start({
      "test_predictions": Plot(
          "image_grid", test.images_NHWC[first], captions(first),
          "First test images: prediction / truth",
          [drawing.RIGHT_COLOR if predicted_N[i] == labels_N[i] else drawing.WRONG_COLOR
           for i in first]),
      "confident_mistakes": Plot(
          "image_grid", test.images_NHWC[mistakes],
          [f"{caption}\np = {p:.4f}" for caption, p in zip(captions(mistakes), mistake_probs)],
          f"The {len(mistakes)} most confident mistakes: prediction / truth",
          [drawing.WRONG_COLOR] * len(mistakes)),
  }, plot_dir))
  if trained is not None:
    predictions.update(_temperature(*trained))
    rundir.write_predictions(workdir, **predictions)
  temperature = float(predictions["temperature"]) if "temperature" in predictions else None
  calibration_text = tables.calibration_section(
      logits_NC, labels_N, temperature, str(predictions.get("temperature_fitted_on", "")),
      f"{rundir.PLOTS}/reliability.png")
  mistake_rows = [[int(i), class_names[labels_N[i]], class_names[predicted_N[i]], f"{p:.4f}"]
                  for i, p in zip(mistakes, mistake_probs)]
  seconds = {name: s for wait in waits for name, s in wait().items()}
  rundir.write_text(os.path.join(workdir, rundir.REPORT), _report_markdown(
      workdir, config, history, counts_CC, class_names, test_loss, mistake_rows,
      calibration_text, saliency_text))
  if writer is not None:
    writer.pngs(int(history["step"][-1]),
                {f"report/{name}": os.path.join(plot_dir, f"{name}.png") for name in seconds})
  return seconds


def report_workdir(workdir: str) -> dict[str, float]:
  """`--mode=report`: redraws the report of a finished run from the files in its workdir."""
  if not os.path.isdir(workdir):
    raise ReportError(f"{workdir} is not a directory; give the --workdir of a finished run")
  if not os.access(workdir, os.W_OK):
    raise ReportError(f"{workdir} is not writable, and the report is written there")
  with summaries.Writer(os.path.join(workdir, rundir.TENSORBOARD)) as writer:
    seconds = write_report(workdir, writer)
  print(_written_line(workdir, seconds))
  return seconds


def after_training(config: ml_collections.ConfigDict, workdir: str, state: Any) -> None:
  """The end of a training run, on the process that writes: predictions, report, TensorBoard
  images. A failure is a warning: the metrics are already saved."""
  if not parallel.is_main_process():
    return
  model = steps.first_seed(state) if config.num_seeds > 1 else state
  try:
    with summaries.Writer(os.path.join(workdir, rundir.TENSORBOARD)) as writer:
      seconds = write_report(workdir, writer, trained=(config, parallel.local_copy(model)))
    print(_written_line(workdir, seconds), flush=True)
  except Exception as e:  # pylint: disable=broad-except  # A report only looks at the run.
    print(f"mnist_jax: warning: no training report ({type(e).__name__}: {e}); metrics are in "
          f"{workdir}", file=sys.stderr)


def _written_line(workdir: str, seconds: dict[str, float]) -> str:
  return (f"report: {os.path.join(workdir, rundir.REPORT)} ({len(seconds)} figures, the slowest "
          f"drawn in {max(seconds.values()):.2f}s)")
