"""The training report: where the model is right and where it fails.

After training, `after_training` writes the test logits to `<workdir>/predictions.npz` (10,000 x 10
floats for MNIST), then `write_report` turns that file and `metrics.jsonl` into figures under
`<workdir>/plots/`, TensorBoard images, and `<workdir>/report.md`, so `--mode=report` can redo it
for a finished workdir without the trained parameters.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import ml_collections
import numpy as np

from mnist_jax import data, errors, metrics, steps
from mnist_jax.report import plots
from mnist_jax.run import parallel, rundir, summaries
from mnist_jax.studies import attacks, calibration

NUM_MISTAKES = 25


class ReportError(errors.UserError):
  """A workdir that holds no finished run to report on."""


# ---------------------------------------------------------------------------------------------
# Predictions.


def save_predictions(config: ml_collections.ConfigDict, workdir: str, state: Any) -> None:
  """Writes to `<workdir>/predictions.npz` the test split's logits, labels and class names, the
  temperature fitted on held-out data (calibration.py), and the saliency maps of the most
  confident mistakes: all the report needs of the trained parameters."""
  info = data.dataset_info(config.dataset, config.data_dir)
  model_logits = lambda images: steps.logits(state, images, batch_size=config.eval_batch_size,
                                             mean=config.pixel_mean, std=config.pixel_std)
  test = data.load_split(config.dataset, "test", config.data_dir)
  logits_NC = model_logits(test.images_NHWC)
  fitted = calibration.fit_on_validation(config, model_logits)
  calibrated = {} if fitted is None else dict(temperature=np.float32(fitted[0]),
                                              temperature_fitted_on=np.array(fitted[1]))
  mistakes = most_confident_mistakes(np.exp(log_softmax(logits_NC)), test.labels_N,
                                     NUM_MISTAKES)  # As `write_report` ranks them.
  saliency = {}
  if len(mistakes):
    saliency_KHWC = attacks.saliency(state, test.images_NHWC[mistakes],
                                     logits_NC[mistakes].argmax(1), mean=config.pixel_mean,
                                     std=config.pixel_std)
    saliency = dict(saliency_KHW=np.asarray(saliency_KHWC).max(axis=-1), saliency_index_K=mistakes)
  rundir.write_predictions(workdir, logits_NC, test.labels_N, info.class_names, **calibrated,
                           **saliency)


# ---------------------------------------------------------------------------------------------
# Numbers.


def log_softmax(logits_NC: np.ndarray) -> np.ndarray:
  """In float64, as the report scores predictions and ranks its mistakes."""
  logits_NC = logits_NC.astype(np.float64)
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


def _confusion_table(counts_CC: np.ndarray, class_names: list[str]) -> str:
  """Counts, recall per row and precision per column ("-" where a class has no examples or was
  never predicted)."""
  recall_C, precision_C = recall_and_precision(counts_CC)
  share = lambda value, count: f"{value:.2%}" if count else "-"
  rows = [[f"**{name}**", *counts_CC[i].tolist(), int(counts_CC[i].sum()),
           share(recall_C[i], counts_CC[i].sum())] for i, name in enumerate(class_names)]
  rows.append(["**precision**",
               *(share(p, count) for p, count in zip(precision_C, counts_CC.sum(axis=0))), "", ""])
  return _markdown_table(["true (row), predicted (column)", *class_names, "examples", "recall"],
                         rows)


_NO_VALIDATION_SPLIT = (
    " No temperature was fitted: the run holds out no validation split "
    "(`config.validation_fraction`), and one fitted on training examples sharpens "
    "probabilities that are already too sharp on unseen ones.")
_NOT_CALIBRATED = (" Probabilities as trained; `--calibrated` divides the logits by the "
                   "temperature fitted on the run's validation split.")


def _calibration_section(logits_NC: np.ndarray, labels_N: np.ndarray, temperature: float | None,
                         fitted_on: str, figure: str, without: str = _NO_VALIDATION_SPLIT) -> str:
  """Markdown: NLL, ECE and mean confidence as trained and, where fitted, temperature scaled."""
  scalings = [("as trained", 1.0)]
  if temperature is not None:
    scalings.append((f"temperature scaled, T = {temperature:.3f}", temperature))
  rows = []
  for name, t in scalings:
    probs_NC = calibration.probabilities(logits_NC, t)
    rows.append([name, f"{calibration.negative_log_likelihood(logits_NC, labels_N, t):.4f}",
                 f"{calibration.expected_calibration_error(probs_NC, labels_N):.4f}",
                 f"{probs_NC.max(1).mean():.4f}", f"{np.mean(probs_NC.argmax(1) == labels_N):.2%}"])
  fitted = (without if temperature is None else
            f" The temperature T divides the logits and changes no prediction; it was fitted to "
            f"minimize the NLL on {fitted_on}.")
  return f"""
## Calibration

How far the model's confidence (its top class probability) is from its accuracy: per bin of
confidence (15 of equal width), the accuracy of the examples in it against the diagonal; the
expected calibration error (ECE) is the gap averaged over examples.{fitted}

![reliability diagram]({figure})

{_markdown_table(["probabilities", "NLL", "ECE", "mean confidence", "accuracy"], rows)}
"""


def _reliability_figure(logits_NC: np.ndarray, labels_N: np.ndarray, what: str):
  probs_NC = calibration.probabilities(logits_NC)
  bins = calibration.reliability(probs_NC, labels_N)
  ece = calibration.expected_calibration_error(probs_NC, labels_N)
  return lambda: plots.reliability_diagram(bins.edges, bins.accuracy, bins.confidence, bins.counts,
                                           f"Reliability, {what}: ECE {ece:.4f}")


def _saliency_figure(images_KHWC: np.ndarray, saliency_KHW: np.ndarray, captions: list[str]):
  """Each mistake beside its saliency map (dark: where a change moves the prediction most)."""
  pairs = np.empty((2 * len(images_KHWC), *images_KHWC.shape[1:]), np.uint8)
  pairs[0::2] = images_KHWC
  pairs[1::2] = np.round(saliency_KHW[..., None] * 255).astype(np.uint8)
  labels = [text for caption in captions for text in (caption, "saliency")]
  return lambda: plots.image_grid(pairs, labels, "Most confident mistakes and where the model "
                                  "looked: |d log p(predicted) / d pixel|", ncols=10)


_SALIENCY_TEXT = """
## Where the model looked in its most confident mistakes

Beside each mistake, the magnitude of the gradient of the predicted class's log-probability with
respect to each pixel, scaled to its image's largest (dark: the pixels whose change would move the
prediction most).

![saliency of the mistakes]({figure})
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

{_markdown_table([header for header, _, _ in columns], epochs)}

## The first 25 test images: prediction / truth

![test predictions]({rundir.PLOTS}/test_predictions.png)

## Confusion matrix

Rows: true class; columns: predicted class.

![confusion matrix]({rundir.PLOTS}/confusion_matrix.png)

{_confusion_table(counts_CC, class_names)}
{calibration_text}
## The {len(mistakes)} most confident mistakes

![most confident mistakes]({rundir.PLOTS}/confident_mistakes.png)

Test index: position in the test split as tfds orders it.

{_markdown_table(["test index", "true", "predicted", "probability"], mistakes)}
{saliency_text}"""


def write_report(workdir: str, writer: summaries.Writer | None = None) -> dict[str, float]:
  """Figures under `<workdir>/plots/`, `<workdir>/report.md`, and the figures to TensorBoard.

  Reads `config.json`, `metrics.jsonl` and `predictions.npz`; the test images come from the
  dataset named in `config.json`. Returns the seconds each figure took to draw and save.
  """
  try:
    config, predictions = rundir.read_config(workdir), rundir.read_predictions(workdir)
    history = history_columns(rundir.read_history(workdir, metrics.check_record))
  except rundir.RunFileError as e:
    raise ReportError(f"{e}; training writes the files of a report at its end, so train to the "
                      "end first") from None
  logits_NC, labels_N = predictions["logits_NC"], predictions["labels_N"]
  class_names = predictions["class_names"]
  test = data.load_split(config["dataset"], "test", config.get("data_dir"))
  if not np.array_equal(test.labels_N, labels_N):
    raise ReportError(f"the test labels of {config['dataset']} differ from those in "
                      f"{rundir.PREDICTIONS}; the dataset changed since training")
  log_probs_NC = log_softmax(logits_NC)
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
      "reliability": _reliability_figure(logits_NC, labels_N, "test split"),
  }
  saliency_text = ""
  if "saliency_KHW" in predictions:  # Written by versions since saliency maps.
    shown = predictions["saliency_index_K"]
    figures["mistake_saliency"] = _saliency_figure(
        test.images_NHWC[shown], predictions["saliency_KHW"], captions(shown))
    saliency_text = _SALIENCY_TEXT.format(figure=f"{rundir.PLOTS}/mistake_saliency.png")
  temperature = float(predictions["temperature"]) if "temperature" in predictions else None
  calibration_text = _calibration_section(
      logits_NC, labels_N, temperature, str(predictions.get("temperature_fitted_on", "")),
      f"{rundir.PLOTS}/reliability.png")
  plot_dir = os.path.join(workdir, rundir.PLOTS)
  seconds = plots.write_pngs(figures, plot_dir)
  mistake_rows = [[int(i), class_names[labels_N[i]], class_names[predicted_N[i]], f"{p:.4f}"]
                  for i, p in zip(mistakes, mistake_probs)]
  rundir.write_text(os.path.join(workdir, rundir.REPORT), _report_markdown(
      workdir, config, history, counts_CC, class_names, test_loss, mistake_rows,
      calibration_text, saliency_text))
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


# ---------------------------------------------------------------------------------------------
# Studies of a trained model (folder.py): a labelled folder, adversarial attacks.


def write_study(out_dir: str, title: str, images_NHWC: np.ndarray, labels_N: np.ndarray,
                log_probs_NC: np.ndarray, class_names: tuple[str, ...], model: Any,
                result: dict[str, Any], names: list[str]) -> dict[str, float]:
  """`report.md` and figures of a model's predictions on a set of labelled images, with the
  temperature of `result` applied where it was fitted."""
  class_names = list(class_names)
  temperature = result["temperature"] if result["temperature_fitted_on"] else None
  probs_NC = calibration.probabilities(log_probs_NC, temperature or 1.0)
  predicted_N = probs_NC.argmax(axis=1)
  counts_CC = confusion_counts(labels_N, predicted_N, len(class_names))
  mistakes = most_confident_mistakes(probs_NC, labels_N, NUM_MISTAKES)
  captions = [f"{class_names[predicted_N[i]]} / {class_names[labels_N[i]]}\np = "
              f"{probs_NC[i, predicted_N[i]]:.3f}" for i in mistakes]
  config = model.config
  figures = {
      "confusion_matrix": lambda: plots.confusion_matrix(
          counts_CC, *recall_and_precision(counts_CC), class_names,
          f"Confusion matrix, {len(labels_N)} images, accuracy {result['accuracy']:.2%}"),
      "confident_mistakes": lambda: plots.image_grid(
          images_NHWC[mistakes], captions,
          f"The {len(mistakes)} most confident mistakes: prediction / truth",
          [plots.WRONG_COLOR] * len(mistakes)),
      "reliability": _reliability_figure(log_probs_NC, labels_N, f"{len(labels_N)} images"),
  }
  saliency_text = ""
  if len(mistakes):
    saliency_KHWC = np.asarray(attacks.saliency(
        model.state, images_NHWC[mistakes], predicted_N[mistakes], mean=config.pixel_mean,
        std=config.pixel_std, num_seeds=config.num_seeds))
    figures["mistake_saliency"] = _saliency_figure(images_NHWC[mistakes],
                                                   saliency_KHWC.max(axis=-1), captions)
    saliency_text = _SALIENCY_TEXT.format(figure="mistake_saliency.png")
  seconds = plots.write_pngs(figures, out_dir)
  seeds = result["accuracy_per_seed"]
  summary = [[result["images"], f"{result['accuracy']:.2%}",
              ", ".join(f"{a:.2%}" for a in seeds) if len(seeds) > 1 else "",
              f"{result['nll']:.4f}", f"{result['ece']:.4f}", f"{result['mean_confidence']:.4f}"]]
  rows = [[names[i], class_names[labels_N[i]], class_names[predicted_N[i]],
           f"{probs_NC[i, predicted_N[i]]:.4f}"] for i in mistakes]
  calibrated = f", temperature {temperature:.3f} applied" if temperature else ""
  rundir.write_text(os.path.join(out_dir, rundir.REPORT), f"""# {title}

Checkpoint {result['checkpoint']}; every image preprocessed as `--mode=predict` does{calibrated}.
{result['images_per_s_predicting']:.0f} images/s predicting, {result['images_per_s_with_loading']:.0f}
images/s with reading and preprocessing.

{_markdown_table(["images", "accuracy", "per seed", "NLL", "ECE", "mean confidence"], summary)}

## Confusion matrix

![confusion matrix](confusion_matrix.png)

{_confusion_table(counts_CC, class_names)}
{_calibration_section(log_probs_NC, labels_N, temperature,
                      result["temperature_fitted_on"], "reliability.png", _NOT_CALIBRATED)}
## The {len(mistakes)} most confident mistakes

![most confident mistakes](confident_mistakes.png)

{_markdown_table(["file", "true", "predicted", "probability"], rows)}
{saliency_text}{_skipped_section(result["skipped"])}""")
  return seconds


def _skipped_section(skipped: list[str]) -> str:
  if not skipped:
    return ""
  return f"\n## Skipped ({len(skipped)})\n\n" + "".join(f"- `{entry}`\n" for entry in skipped)


def write_attack_report(out_dir: str, result: attacks.Robustness, images_NHWC: np.ndarray,
                        labels_N: np.ndarray, class_names: tuple[str, ...], step: int) -> None:
  """`report.md`, the accuracy-against-eps curves and a gallery of adversarial examples."""
  shown_eps = min((e for e in result.eps if e > 0), key=lambda e: abs(e - 0.1), default=0.0)
  k = len(result.examples_pgd_KHWC[shown_eps])
  gallery = np.concatenate([images_NHWC[:k], result.examples_fgsm_KHWC[shown_eps],
                            result.examples_pgd_KHWC[shown_eps]])
  truth = labels_N[:k]
  predicted = np.concatenate([truth, result.predictions_fgsm_K[shown_eps],
                              result.predictions_pgd_K[shown_eps]])
  captions = [f"{attack}: {class_names[p]}" for attack, row in
              zip(("truth", "FGSM", "PGD"), predicted.reshape(3, k)) for p in row]
  caption_colors = [plots.RIGHT_COLOR if p == y else plots.WRONG_COLOR
                    for p, y in zip(predicted, np.tile(truth, 3))]
  plots.write_pngs({
      "robustness": lambda: plots.robustness_curves(
          result.eps, {"FGSM": result.fgsm_accuracy, f"PGD ({result.pgd_steps} steps)":
                       result.pgd_accuracy}, f"Accuracy under attack, {len(labels_N)} test images"),
      "adversarial_examples": lambda: plots.image_grid(
          gallery, captions, f"Test images, then FGSM and PGD at eps {shown_eps:g}", caption_colors,
          ncols=k),
  }, out_dir)
  # One PGD step is FGSM's step of eps: no step size of its own.
  rows = [[f"{e:g}", f"{size:.4f}" if result.pgd_steps > 1 else "-", f"{fgsm:.2%}", f"{pgd:.2%}"]
          for e, size, fgsm, pgd in zip(result.eps, result.step_sizes, result.fgsm_accuracy,
                                        result.pgd_accuracy)]
  rundir.write_text(os.path.join(out_dir, rundir.REPORT), f"""# Adversarial robustness

Checkpoint {step}, the first {len(labels_N)} test images; clean accuracy {result.clean_accuracy:.2%}.
L-infinity attacks in pixel units after dividing by 255, pixels kept in 0..255. FGSM: one step of
eps along the sign of the loss gradient. PGD: that step, then {result.pgd_steps - 1} more of the
given size, each projected back into the eps-ball; the worst iterate per image counts (with one
step, PGD is FGSM).

![accuracy against eps](robustness.png)

{_markdown_table(["eps", "PGD step size", "FGSM accuracy", "PGD accuracy"], rows)}

## Adversarial examples at eps {shown_eps:g}

![adversarial examples](adversarial_examples.png)
""")
  rundir.write_text(os.path.join(out_dir, "results.json"), json.dumps({
      "checkpoint": step, "examples": len(labels_N), "eps": result.eps,
      "clean_accuracy": result.clean_accuracy, "fgsm_accuracy": result.fgsm_accuracy,
      "pgd_accuracy": result.pgd_accuracy, "pgd_steps": result.pgd_steps,
      "pgd_step_sizes": result.step_sizes}, indent=2) + "\n")
