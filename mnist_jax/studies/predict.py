"""Using a trained model: restore it from a workdir, and its outputs for any images.

  model = predict.load("runs/seed_mlp")                # the best checkpoint
  probs_NC = predict.probabilities(model, [photo_HW, drawing_HWC])

Each image is framed as the model's dataset frames its own first (digits.py). A run of
`config.num_seeds` models predicts with the mean of their probabilities (an ensemble).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import configs, data, metrics, steps
from mnist_jax.run import checkpoints, parallel, rundir, workers
from mnist_jax.studies import calibration, digits


def dataset_trained_on(meta: dict) -> data.DatasetInfo:
  """The dataset a model was trained on, as its checkpoint's meta item records it."""
  saved = meta["dataset"]
  return data.DatasetInfo(saved["name"], tuple(saved["image_shape"]), saved["num_classes"],
                          tuple(saved["class_names"]))


def load(workdir: str, checkpoint: str = "best") -> checkpoints.Restored:
  """Restores the model of `workdir`: its "best" checkpoint, the "latest", or a step number."""

  def template(config, meta):
    configs.validate(config, saved=True)  # As saved, or damaged: the checks of a config file.
    # Shapes alone, laid out as the pipelines' programs take a state: whole on every device, of
    # however many devices this machine has, whatever the training machine had.
    shapes = steps.state_shapes(config, dataset_trained_on(meta), meta["steps_per_epoch"])
    replicated = parallel.replicated(parallel.create_mesh())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        shapes)

  return checkpoints.restore(workdir, template, checkpoint, check_record=metrics.check_record,
                             selection_metric=metrics.selection_metric)


# ---------------------------------------------------------------------------------------------
# Outputs of a state.


def logits(state: steps.TrainState, images_NHWC: np.ndarray, *, batch_size: int, mean: float,
           std: float, num_seeds: int = 1) -> np.ndarray:
  """Logits `[N, num_classes]` of the model in `state` for uint8 images, in batches of one shape;
  `[num_seeds, N, num_classes]` for a state of several seeds. Each batch is brought to the host
  before the next starts, so that Ctrl-C is handled between batches."""
  num_examples = len(images_NHWC)
  padding = -num_examples % batch_size  # One batch shape, so one compilation.
  images_NHWC = np.pad(images_NHWC, [(0, padding)] + [(0, 0)] * 3)
  batches = [np.asarray(_batch_logits(state, images_NHWC[i : i + batch_size], mean, std, num_seeds))
             for i in range(0, len(images_NHWC), batch_size)]
  return np.concatenate(batches, axis=-2)[..., :num_examples, :]


@functools.partial(jax.jit, static_argnames=("mean", "std", "num_seeds"))
def _batch_logits(state: steps.TrainState, images_BHWC: jax.Array, mean: float, std: float,
                  num_seeds: int) -> jax.Array:
  images_BHWC = data.normalize(images_BHWC.astype(jnp.float32), mean, std)
  apply = lambda params: state.apply_fn({"params": params}, images_BHWC, train=False)
  return apply(state.params) if num_seeds == 1 else jax.vmap(apply)(state.params)


def ensemble_log_probabilities(logits_SNC: jax.Array) -> jax.Array:
  """Log of the mean of several models' softmax probabilities `[N, C]`, from their logits."""
  return (jax.nn.logsumexp(jax.nn.log_softmax(logits_SNC, axis=-1), axis=0)
          - jnp.log(logits_SNC.shape[0]))


@functools.partial(jax.jit, static_argnames=("mean", "std", "num_seeds"))
def log_probabilities(state: steps.TrainState, pixels_NHWC: jax.Array, *, mean: float, std: float,
                      num_seeds: int = 1) -> jax.Array:
  """The model's log-probabilities `[N, C]` for pixels 0..255 (float, so that they may be
  differentiated); of `num_seeds` models, the log of the mean of their probabilities."""
  logits_NC = _batch_logits(state, pixels_NHWC, mean, std, num_seeds)
  return jax.nn.log_softmax(logits_NC) if num_seeds == 1 else ensemble_log_probabilities(logits_NC)


# ---------------------------------------------------------------------------------------------
# Outputs of a restored model.


def log_probabilities_and_logits(model: checkpoints.Restored, images_NHWC: np.ndarray
                                 ) -> tuple[np.ndarray, np.ndarray]:
  """For uint8 images: the model's log-probabilities `[N, C]` (of the seeds' mean for a run of
  several), and each seed's logits `[S, N, C]`, through one compiled program per batch shape."""
  config = model.config
  logits_NC = logits(model.state, images_NHWC, batch_size=config.eval_batch_size,
                     mean=config.pixel_mean, std=config.pixel_std, num_seeds=config.num_seeds)
  logits_SNC = logits_NC if config.num_seeds > 1 else logits_NC[None]
  return np.asarray(ensemble_log_probabilities(logits_SNC)), logits_SNC


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
      `validation_temperature(model)`, for calibrated confidence (calibration.py).

  Raises:
    digits.ImageError: an image with no digit, or of an unusable shape.
  """
  info = dataset_trained_on(model.meta)
  digits.check_takes_28x28_grayscale(info, "predicting")
  if preprocess:
    images_NHW = np.stack([digits.mnist_like(image, info.name) for image in images])
  else:
    images_NHW = np.asarray(images).reshape(-1, digits.MNIST_SIZE, digits.MNIST_SIZE)
  log_probs_NC = log_probabilities(
      model.state, images_NHW[..., None].astype(np.float32), mean=model.config.pixel_mean,
      std=model.config.pixel_std, num_seeds=model.config.num_seeds)
  return calibration.softmax_with_temperature(np.asarray(log_probs_NC), temperature)


@contextlib.contextmanager
def framing_files(workdir: str, paths: Sequence[str]
                  ) -> Iterator[Callable[[checkpoints.Restored, int], np.ndarray]]:
  """Within, worker processes frame the image files at `paths` while the caller restores the
  model of `workdir` (framing imports scipy and runs on numpy: neither needs the model), as the
  dataset named in its `config.json` frames its images. `framed(model, i)` returns the i-th as
  `model` takes it, for `probabilities(..., preprocess=False)`; it frames here where no worker did
  (one core, a worker that died, a checkpoint of another dataset).

  Raises (from `framed`):
    digits.ImageError: as `probabilities` raises it.
  """
  try:
    dataset = rundir.read_config(workdir)["dataset"]
  except rundir.RunFileError:  # `load` says what is wrong.
    dataset = None
  with workers.forked(len(paths) if dataset in digits.FRAMINGS else 0) as pool:
    futures = [workers.submit(pool, digits.framed_file, path, dataset) for path in paths]

    def framed(model: checkpoints.Restored, i: int) -> np.ndarray:
      info = dataset_trained_on(model.meta)
      digits.check_takes_28x28_grayscale(info, "predicting")
      return workers.result(futures[i] if info.name == dataset else None, digits.framed_file,
                            paths[i], info.name)

    yield framed


# ---------------------------------------------------------------------------------------------
# Calibrated confidence.


def validation_temperature(model: checkpoints.Restored) -> tuple[float, str]:
  """The model's temperature, fitted on its validation split; and which split that is."""
  fitted = calibration.fit_on_validation(
      model.config, lambda images: log_probabilities_and_logits(model, images)[0])
  if fitted is None:
    raise calibration.CalibrationError(
        "--calibrated fits a temperature on the run's validation split, and this run has none; "
        "train with --config.validation_fraction=0.1 to hold one out")
  return fitted


def calibration_on_test_split(model: checkpoints.Restored, temperatures: Sequence[float]
                              ) -> list[tuple[float, float]]:
  """The test split's negative log-likelihood and expected calibration error at each temperature
  (1.0: the probabilities as trained)."""
  config = model.config
  test = data.load_split(config.dataset, "test", config.data_dir)
  log_probs_NC, _ = log_probabilities_and_logits(model, test.images_NHWC)
  return [(calibration.negative_log_likelihood(log_probs_NC, test.labels_N, t),
           calibration.expected_calibration_error(
               calibration.softmax_with_temperature(log_probs_NC, t), test.labels_N))
          for t in temperatures]
