"""The reports of the studies of a trained model: `report.md`, figures and `results.json` of a
labelled folder's evaluation (`<workdir>/eval/<folder name>/`) and of the adversarial attacks
(`<workdir>/attack/`). The studies compute (studies/); this module writes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from mnist_jax.report import drawing, tables
from mnist_jax.run import checkpoints, rundir
from mnist_jax.studies import attacks, calibration, folders, saliency

EVAL_DIR = "eval"
ATTACK_DIR = "attack"
RESULTS = "results.json"


def write_folder_report(workdir: str, model: checkpoints.Restored,
                        evaluation: folders.FolderEvaluation) -> str:
  """Writes `<workdir>/eval/<folder name>/`: `report.md` and figures of the model's predictions
  on a labelled folder, with the temperature of the evaluation applied where it was fitted, and
  `results.json`. A later evaluation of a folder of the same name replaces it, whole. Returns the
  path of `report.md`."""
  result = evaluation.results
  out_dir = os.path.join(workdir, EVAL_DIR, os.path.basename(os.path.realpath(result["folder"])))
  shutil.rmtree(out_dir, ignore_errors=True)
  _write_folder_markdown(out_dir, f"Evaluation on `{result['folder']}`", evaluation, model)
  rundir.write_text(os.path.join(out_dir, RESULTS), json.dumps(result, indent=2) + "\n")
  return os.path.join(out_dir, rundir.REPORT)


def _write_folder_markdown(out_dir: str, title: str, evaluation: folders.FolderEvaluation,
                           model: checkpoints.Restored) -> dict[str, float]:
  images_NHWC, labels_N = evaluation.images_NHWC, evaluation.labels_N
  log_probs_NC, result, names = evaluation.log_probs_NC, evaluation.results, evaluation.names
  class_names = list(evaluation.class_names)
  temperature = result["temperature"] if result["temperature_fitted_on"] else None
  probs_NC = calibration.softmax_with_temperature(log_probs_NC, temperature or 1.0)
  predicted_N = probs_NC.argmax(axis=1)
  counts_CC = tables.confusion_counts(labels_N, predicted_N, len(class_names))
  mistakes = tables.most_confident_mistakes(probs_NC, labels_N, tables.NUM_MISTAKES)
  captions = [f"{class_names[predicted_N[i]]} / {class_names[labels_N[i]]}\np = "
              f"{probs_NC[i, predicted_N[i]]:.3f}" for i in mistakes]
  config = model.config
  figures = {
      "confusion_matrix": drawing.Plot(
          "confusion_matrix", counts_CC, *tables.recall_and_precision(counts_CC), class_names,
          f"Confusion matrix, {len(labels_N)} images, accuracy {result['accuracy']:.2%}"),
      "confident_mistakes": drawing.Plot(
          "image_grid", images_NHWC[mistakes], captions,
          f"The {len(mistakes)} most confident mistakes: prediction / truth",
          [drawing.WRONG_COLOR] * len(mistakes)),
      "reliability": tables.reliability_figure(log_probs_NC, labels_N, f"{len(labels_N)} images"),
  }
  saliency_text = ""
  if len(mistakes):
    saliency_KHWC = np.asarray(saliency.saliency(
        model.state, images_NHWC[mistakes], predicted_N[mistakes], mean=config.pixel_mean,
        std=config.pixel_std, num_seeds=config.num_seeds))
    figures["mistake_saliency"] = tables.saliency_figure(images_NHWC[mistakes],
                                                         saliency_KHWC.max(axis=-1), captions)
    saliency_text = tables.SALIENCY_TEXT.format(figure="mistake_saliency.png")
  seconds = drawing.write_pngs(figures, out_dir)
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

{tables.markdown_table(["images", "accuracy", "per seed", "NLL", "ECE", "mean confidence"], summary)}

## Confusion matrix

![confusion matrix](confusion_matrix.png)

{tables.confusion_table(counts_CC, class_names)}
{tables.calibration_section(log_probs_NC, labels_N, temperature,
                            result["temperature_fitted_on"], "reliability.png",
                            tables.NOT_CALIBRATED)}
## The {len(mistakes)} most confident mistakes

![most confident mistakes](confident_mistakes.png)

{tables.markdown_table(["file", "true", "predicted", "probability"], rows)}
{saliency_text}{_skipped_section(result["skipped"])}""")
  return seconds


def _skipped_section(skipped: list[str]) -> str:
  if not skipped:
    return ""
  return f"\n## Skipped ({len(skipped)})\n\n" + "".join(f"- `{entry}`\n" for entry in skipped)


def write_attack_report(workdir: str, result: attacks.Robustness, class_names: tuple[str, ...],
                        step: int) -> str:
  """Writes `<workdir>/attack/`: `report.md`, the accuracy-against-eps curves, a gallery of
  adversarial examples, and `results.json`. Returns the path of `report.md`."""
  out_dir = os.path.join(workdir, ATTACK_DIR)
  shown_eps = min((e for e in result.eps if e > 0), key=lambda e: abs(e - 0.1), default=0.0)
  k = len(result.examples_pgd_KHWC[shown_eps])
  gallery = np.concatenate([result.images_KHWC[:k], result.examples_fgsm_KHWC[shown_eps],
                            result.examples_pgd_KHWC[shown_eps]])
  truth = result.labels_K[:k]
  predicted = np.concatenate([truth, result.predictions_fgsm_K[shown_eps],
                              result.predictions_pgd_K[shown_eps]])
  captions = [f"{attack}: {class_names[p]}" for attack, row in
              zip(("truth", "FGSM", "PGD"), predicted.reshape(3, k)) for p in row]
  caption_colors = [drawing.RIGHT_COLOR if p == y else drawing.WRONG_COLOR
                    for p, y in zip(predicted, np.tile(truth, 3))]
  drawing.write_pngs({
      "robustness": drawing.Plot(
          "robustness_curves", result.eps, {"FGSM": result.fgsm_accuracy,
                                            f"PGD ({result.pgd_steps} steps)": result.pgd_accuracy},
          f"Accuracy under attack, {result.num_examples} test images"),
      "adversarial_examples": drawing.Plot(
          "image_grid", gallery, captions, f"Test images, then FGSM and PGD at eps {shown_eps:g}",
          caption_colors, ncols=k),
  }, out_dir)
  # One PGD step is FGSM's step of eps: no step size of its own.
  rows = [[f"{e:g}", f"{size:.4f}" if result.pgd_steps > 1 else "-", f"{fgsm:.2%}", f"{pgd:.2%}"]
          for e, size, fgsm, pgd in zip(result.eps, result.step_sizes, result.fgsm_accuracy,
                                        result.pgd_accuracy)]
  num, clean = result.num_examples, result.clean_accuracy
  rundir.write_text(os.path.join(out_dir, rundir.REPORT), f"""# Adversarial robustness

Checkpoint {step}, the first {num} test images; clean accuracy {clean:.2%}.
L-infinity attacks in pixel units after dividing by 255, pixels kept in 0..255. FGSM: one step of
eps along the sign of the loss gradient. PGD: that step, then {result.pgd_steps - 1} more of the
given size, each projected back into the eps-ball; the worst iterate per image counts (with one
step, PGD is FGSM).

![accuracy against eps](robustness.png)

{tables.markdown_table(["eps", "PGD step size", "FGSM accuracy", "PGD accuracy"], rows)}

## Adversarial examples at eps {shown_eps:g}

![adversarial examples](adversarial_examples.png)
""")
  rundir.write_text(os.path.join(out_dir, RESULTS), json.dumps(_attack_results(result, step),
                                                               indent=2) + "\n")
  return os.path.join(out_dir, rundir.REPORT)


def _attack_results(result: attacks.Robustness, step: int) -> dict[str, Any]:
  return {"checkpoint": step, "examples": result.num_examples, "eps": result.eps,
          "clean_accuracy": result.clean_accuracy, "fgsm_accuracy": result.fgsm_accuracy,
          "pgd_accuracy": result.pgd_accuracy, "pgd_steps": result.pgd_steps,
          "pgd_step_sizes": result.step_sizes}
