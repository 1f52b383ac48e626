"""What the training report and the study reports share: the numbers they compute from a model's
predictions, and the markdown tables and sections that show them (with the figures of the
calibration and saliency sections).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnist_jax.report import drawing
from mnist_jax.studies import calibration

NUM_MISTAKES = 25

# ---------------------------------------------------------------------------------------------
# Numbers.


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
# Markdown.


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """A markdown table: a header row, then a row of cells each."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def confusion_table(counts_CC: np.ndarray, class_names: list[str]) -> str:
  """Counts, recall per row and precision per column ("-" where a class has no examples or was
  never predicted)."""
  recall_C, precision_C = recall_and_precision(counts_CC)
  share = lambda value, count: f"{value:.2%}" if count else "-"
  rows = [[f"**{name}**", *counts_CC[i].tolist(), int(counts_CC[i].sum()),
           share(recall_C[i], counts_CC[i].sum())] for i, name in enumerate(class_names)]
  rows.append(["**precision**",
               *(share(p, count) for p, count in zip(precision_C, counts_CC.sum(axis=0))), "", ""])
  return markdown_table(["true (row), predicted (column)", *class_names, "examples", "recall"],
                        rows)


NO_VALIDATION_SPLIT = (
    " No temperature was fitted: the run holds out no validation split "
    "(`config.validation_fraction`), and one fitted on training examples sharpens "
    "probabilities that are already too sharp on unseen ones.")
NOT_CALIBRATED = (" Probabilities as trained; `--calibrated` divides the logits by the "
                  "temperature fitted on the run's validation split.")


def calibration_section(logits_NC: np.ndarray, labels_N: np.ndarray, temperature: float | None,
                        fitted_on: str, figure: str, without: str = NO_VALIDATION_SPLIT) -> str:
  """Markdown: NLL, ECE and mean confidence as trained and, where fitted, temperature scaled;
  `without` says why there is no temperature where there is none."""
  scalings = [("as trained", 1.0)]
  if temperature is not None:
    scalings.append((f"temperature scaled, T = {temperature:.3f}", temperature))
  rows = []
  for name, t in scalings:
    probs_NC = calibration.softmax_with_temperature(logits_NC, t)
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

{markdown_table(["probabilities", "NLL", "ECE", "mean confidence", "accuracy"], rows)}
"""


def reliability_figure(logits_NC: np.ndarray, labels_N: np.ndarray, what: str) -> drawing.Plot:
  """The calibration section's figure, to draw: a reliability diagram of `what` (e.g. "test split")."""
  probs_NC = calibration.softmax_with_temperature(logits_NC)
  bins = calibration.reliability(probs_NC, labels_N)
  ece = calibration.expected_calibration_error(probs_NC, labels_N)
  return drawing.Plot("reliability_diagram", bins.edges, bins.accuracy, bins.confidence,
                      bins.counts, f"Reliability, {what}: ECE {ece:.4f}")


SALIENCY_TEXT = """
## Where the model looked in its most confident mistakes

Beside each mistake, the magnitude of the gradient of the predicted class's log-probability with
respect to each pixel, scaled to its image's largest (dark: the pixels whose change would move the
prediction most).

![saliency of the mistakes]({figure})
"""


def saliency_figure(images_KHWC: np.ndarray, saliency_KHW: np.ndarray, captions: list[str]
                    ) -> drawing.Plot:
  """The saliency section's figure, to draw: each mistake beside its saliency map (dark: where a
  change moves the prediction most)."""
  pairs = np.empty((2 * len(images_KHWC), *images_KHWC.shape[1:]), np.uint8)
  pairs[0::2] = images_KHWC
  pairs[1::2] = np.round(saliency_KHW[..., None] * 255).astype(np.uint8)
  labels = [text for caption in captions for text in (caption, "saliency")]
  return drawing.Plot("image_grid", pairs, labels, "Most confident mistakes and where the model "
                      "looked: |d log p(predicted) / d pixel|", ncols=10)
