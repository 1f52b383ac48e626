"""Using a trained model: restore it from a workdir and predict the digit in any image.

  model = predict.load("runs/seed_mlp")                # the best checkpoint
  probs_NC = predict.probabilities(model, [photo_HW, drawing_HWC])

Each image is framed as the model's dataset frames its own first (digits.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from mnist_jax import configs, data, metrics, steps
from mnist_jax.run import checkpoints, parallel
from mnist_jax.studies import calibration, digits


def dataset_info(meta: dict) -> data.DatasetInfo:
  """The dataset a model was trained on, as its checkpoint's meta item records it."""
  saved = meta["dataset"]
  return data.DatasetInfo(saved["name"], tuple(saved["image_shape"]), saved["num_classes"],
                          tuple(saved["class_names"]))


def load(workdir: str, checkpoint: str = "best") -> checkpoints.Restored:
  """Restores the model of `workdir`: its "best" checkpoint, the "latest", or a step number."""

  def template(config, meta):
    configs.validate(config)  # As saved, or damaged: the checks of a config file.
    # Shapes alone, laid out as the pipelines' programs take a state: whole on every device, of
    # however many devices this machine has, whatever the training machine had.
    shapes = steps.state_shapes(config, dataset_info(meta), meta["steps_per_epoch"])
    replicated = parallel.replicated(parallel.create_mesh())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        shapes)

  return checkpoints.restore(workdir, template, checkpoint, check_record=metrics.check_record,
                             selection_metric=metrics.selection_metric)


def probabilities(
    model: checkpoints.Restored, images: Sequence[np.ndarray] | np.ndarray, *, preprocess: bool = True,
    temperature: float = 1.0,
) -> np.ndarray:
  """Class probabilities `[N, num_classes]` of a trained model for N digit images; of a run of
  `config.num_seeds` models, the mean of theirs (an ensemble).

  Args:
    model: from `load(workdir)`.
    images: N arrays of pixels 0..255, `[H, W]` or `[H, W, 1|3|4]`, any size, or one stacked array.
    preprocess: frame each image as the model's dataset does first (`digits.mnist_like`). Pass False
      for images that already are, e.g. the dataset's own uint8 `[N, 28, 28, 1]`.
    temperature: divides the (ensemble's log-) probabilities before the softmax; from
      `folders.fit_temperature`, for calibrated confidence (calibration.py).

  Raises:
    digits.ImageError: an image with no digit, or of an unusable shape.
  """
  info = dataset_info(model.meta)
  digits.check_takes_28x28_grayscale(info, "predicting")
  if preprocess:
    images_NHW = np.stack([digits.mnist_like(image, info.name) for image in images])
  else:
    images_NHW = np.asarray(images).reshape(-1, digits.MNIST_SIZE, digits.MNIST_SIZE)
  log_probs_NC = steps.log_probabilities(
      model.state, images_NHW[..., None].astype(np.float32), mean=model.config.pixel_mean,
      std=model.config.pixel_std, num_seeds=model.config.num_seeds)
  return calibration.probabilities(np.asarray(log_probs_NC), temperature)
