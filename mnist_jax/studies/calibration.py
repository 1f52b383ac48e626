"""Whether a model's confidence matches its accuracy, and temperature scaling to make it so.

  ece = calibration.expected_calibration_error(probs_NC, labels_N)   # 15 equal-width bins
  temperature = calibration.fit_temperature(held_out_logits_NC, held_out_labels_N)
  probs_NC = calibration.softmax_with_temperature(logits_NC, temperature)

Confidence is the top class's probability. The bins split [0, 1] into 15 equal widths (a
confidence of exactly 1 falls in the last); the expected calibration error (ECE) is the mean over
examples of |accuracy - mean confidence| of their bin. Temperature scaling divides the logits by
one number T, fitted to minimize the negative log-likelihood (NLL) of held-out examples: it never
changes a prediction, only its confidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.scipy import optimize

from mnist_jax import configs, data, errors

NUM_BINS = 15


class CalibrationError(errors.UserError):
  """A temperature that cannot be fitted, with a message that says why."""


@dataclasses.dataclass(frozen=True)
class Reliability:
  """Per confidence bin: examples, their mean confidence and their accuracy (NaN where empty)."""

  edges: np.ndarray  # [NUM_BINS + 1]
  counts: np.ndarray
  confidence: np.ndarray
  accuracy: np.ndarray


def reliability(probs_NC: np.ndarray, labels_N: np.ndarray,
                num_bins: int = NUM_BINS) -> Reliability:
  confidence_N = probs_NC.max(axis=1).astype(np.float64)
  correct_N = (probs_NC.argmax(axis=1) == labels_N).astype(np.float64)
  bin_N = np.minimum((confidence_N * num_bins).astype(np.int64), num_bins - 1)
  counts = np.bincount(bin_N, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = lambda values: np.bincount(bin_N, values, minlength=num_bins) / counts
    return Reliability(np.linspace(0.0, 1.0, num_bins + 1), counts, mean(confidence_N),
                       mean(correct_N))


def expected_calibration_error(probs_NC: np.ndarray, labels_N: np.ndarray,
                               num_bins: int = NUM_BINS) -> float:
  bins = reliability(probs_NC, labels_N, num_bins)
  filled = bins.counts > 0
  gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
  return float(np.sum(gaps * bins.counts[filled]) / len(labels_N))


def log_softmax(logits_NC: np.ndarray) -> np.ndarray:
  """In float64 and numpy, as reports score predictions: no program for JAX to trace and load."""
  logits_NC = np.asarray(logits_NC, np.float64)
  shifted_NC = logits_NC - logits_NC.max(axis=-1, keepdims=True)
  return shifted_NC - np.log(np.exp(shifted_NC).sum(axis=-1, keepdims=True))


def softmax_with_temperature(logits_NC: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """`softmax(logits / temperature)`, in float32 (log-probabilities may stand for logits)."""
  return np.exp(log_softmax(np.asarray(logits_NC, np.float64) / temperature)).astype(np.float32)


def negative_log_likelihood(logits_NC: np.ndarray, labels_N: np.ndarray,
                            temperature: float = 1.0) -> float:
  log_probs_NC = log_softmax(np.asarray(logits_NC, np.float64) / temperature)
  return -float(np.mean(np.take_along_axis(log_probs_NC, np.asarray(labels_N)[:, None], axis=1)))


def _nll(log_temperature: jax.Array, logits_NC: jax.Array, labels_N: jax.Array) -> jax.Array:
  log_probs_NC = jax.nn.log_softmax(logits_NC / jnp.exp(log_temperature), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs_NC, labels_N[:, None], axis=1))


@jax.jit
def _fit(logits_NC: jax.Array, labels_N: jax.Array) -> jax.Array:
  loss = lambda x: _nll(x[0], logits_NC, labels_N)
  return jnp.exp(optimize.minimize(loss, jnp.zeros(1), method="BFGS").x[0])


def fit_temperature(logits_NC: np.ndarray, labels_N: np.ndarray) -> float:
  """The T > 0 that minimizes the NLL of `softmax(logits / T)` on these (held-out) examples."""
  return float(_fit(jnp.asarray(logits_NC, jnp.float32), jnp.asarray(labels_N)))


def held_out_split(config: ml_collections.ConfigDict) -> str | None:
  """The split a run's temperature is fitted on: its validation split, None where it has none.

  Not a slice of the training split: the model has learnt those examples, so it is right and
  sure of itself there, and a temperature fitted there sharpens its probabilities; for the seed
  recipe that made the test NLL and ECE worse (docs/2026-12-01-studies.md). A split too small to
  fit one on (`configs.check_validation_split`), as runs trained before that check may hold, is
  refused.
  """
  if not config.validation_fraction:
    return None
  num_train = data.num_examples(config.dataset, "train", config.data_dir)
  configs.check_validation_split(config, num_train)
  return data.holdout_splits(num_train, config.validation_fraction)[1]


def fit_on_validation(config: ml_collections.ConfigDict,
                      log_probabilities: Callable[[np.ndarray], np.ndarray]
                      ) -> tuple[float, str] | None:
  """The temperature of a model, from its `log_probabilities(uint8 images)` (or logits) on the
  run's validation split, and which split that is; None for a run without one."""
  split = held_out_split(config)
  if split is None:
    return None
  held_out = data.load_split(config.dataset, split, config.data_dir)
  temperature = fit_temperature(log_probabilities(held_out.images_NHWC), held_out.labels_N)
  return temperature, f"the validation split ({split})"
