"""Where a trained model looks: the input-gradient saliency of its predictions.

  saliency_NHWC = saliency.saliency(state, images_NHWC, predicted_N, mean=0.0, std=1.0)

The magnitude of the gradient of a class's log-probability with respect to each pixel, scaled to
its image's largest: the pixels whose change would move that belief most.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mnist_jax import steps
from mnist_jax.studies import predict


@functools.partial(jax.jit, static_argnames=("mean", "std", "num_seeds"))
def saliency(state: steps.TrainState, images_NHWC: jax.Array, classes_N: jax.Array, *,
             mean: float, std: float, num_seeds: int = 1) -> jax.Array:
  """|d log p(class) / d pixel| of each image for the given class (e.g. the predicted one),
  scaled to 0..1 per image: where a change of the pixels would change that belief most."""

  def log_prob(pixels):
    log_probs_NC = predict.log_probabilities(state, pixels, mean=mean, std=std,
                                             num_seeds=num_seeds)
    return jnp.take_along_axis(log_probs_NC, classes_N[:, None], axis=1).sum()

  magnitude_NHWC = jnp.abs(jax.grad(log_prob)(images_NHWC.astype(jnp.float32)))
  return magnitude_NHWC / jnp.maximum(magnitude_NHWC.max(axis=(1, 2, 3), keepdims=True), 1e-12)
