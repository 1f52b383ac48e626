"""Adversarial robustness (FGSM and PGD, L-infinity) and input-gradient saliency of a trained model.

  result = attacks.accuracy_under_attack(state, images_NHWC, labels_N, [0.0, 0.1, 0.2],
                                         mean=0.0, std=1.0, num_seeds=1, pgd_steps=10)

`eps` is in pixel units after dividing by 255: 0.1 lets every pixel move by 25.5 grey levels.
Attacks work on float pixels in 0..255 and keep them there, so at eps 0 the model sees exactly the
images that evaluation sees. FGSM takes one step of eps along the sign of the loss gradient. PGD
starts with that same step, then takes `steps - 1` more of `step_size` (default 2.5 eps / steps),
projecting back into the eps-ball and the valid range after each; per example it keeps the worst
iterate seen (a misclassified one over a correct one, then the higher loss), so PGD is never
weaker than FGSM on any example. The loss is the cross-entropy of the model (of the mean of the
seeds' probabilities, for a run of several seeds: the ensemble is attacked).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import steps


def _losses_and_gradient(state, pixels_BHWC, labels_B, mean, std, num_seeds):
  """Per-example cross-entropy, whether each is wrong, and the gradient of their sum."""

  def total(pixels):
    log_probs_BC = steps.log_probabilities(state, pixels, mean=mean, std=std, num_seeds=num_seeds)
    losses_B = -jnp.take_along_axis(log_probs_BC, labels_B[:, None], axis=1)[:, 0]
    return losses_B.sum(), (losses_B, log_probs_BC.argmax(axis=1) != labels_B)

  (_, (losses_B, wrong_B)), gradient = jax.value_and_grad(total, has_aux=True)(pixels_BHWC)
  return losses_B, wrong_B, gradient


@functools.partial(jax.jit, static_argnames=("mean", "std", "num_seeds", "steps"))
def attack_batch(state: steps.TrainState, pixels_BHWC: jax.Array, labels_B: jax.Array,
                 eps: jax.Array, step_size: jax.Array, *, mean: float, std: float, num_seeds: int,
                 steps: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """FGSM's and PGD's adversarial pixels (0..255) for one batch, and whether each is misclassified.

  `eps` and `step_size` are in units of 1/255 of the range, like the module's.
  """
  eps, step_size = eps * 255.0, step_size * 255.0
  low, high = jnp.maximum(pixels_BHWC - eps, 0.0), jnp.minimum(pixels_BHWC + eps, 255.0)
  _, _, gradient = _losses_and_gradient(state, pixels_BHWC, labels_B, mean, std, num_seeds)
  fgsm = jnp.clip(pixels_BHWC + eps * jnp.sign(gradient), low, high)
  losses, wrong, gradient = _losses_and_gradient(state, fgsm, labels_B, mean, std, num_seeds)

  def step(_, carry):
    pixels, gradient, worst, worst_loss, worst_wrong = carry
    pixels = jnp.clip(pixels + step_size * jnp.sign(gradient), low, high)
    losses, wrong, gradient = _losses_and_gradient(state, pixels, labels_B, mean, std, num_seeds)
    better = (wrong & ~worst_wrong) | ((wrong == worst_wrong) & (losses > worst_loss))
    pick = lambda new, old: jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return pixels, gradient, pick(pixels, worst), pick(losses, worst_loss), worst_wrong | wrong

  _, _, pgd, _, pgd_wrong = jax.lax.fori_loop(
      1, steps, step, (fgsm, gradient, fgsm, losses, wrong))
  return fgsm, wrong, pgd, pgd_wrong


@dataclasses.dataclass(frozen=True)
class Robustness:
  """Accuracy per eps under no attack, FGSM and PGD, and one batch's adversarial images."""

  eps: list[float]
  clean_accuracy: float
  fgsm_accuracy: list[float]
  pgd_accuracy: list[float]
  pgd_steps: int
  step_sizes: list[float]
  examples_fgsm_KHWC: dict[float, np.ndarray]  # The first batch's adversarial images, uint8.
  examples_pgd_KHWC: dict[float, np.ndarray]
  predictions_fgsm_K: dict[float, np.ndarray]
  predictions_pgd_K: dict[float, np.ndarray]


def accuracy_under_attack(
    state: steps.TrainState, images_NHWC: np.ndarray, labels_N: np.ndarray, eps: list[float], *,
    mean: float, std: float, num_seeds: int, pgd_steps: int = 10, step_size: float | None = None,
    batch_size: int = 500, num_examples_kept: int = 10,
) -> Robustness:
  """Accuracy of the model over `images_NHWC` (uint8) under each attack at each eps (0 is
  always among them: its accuracy is the clean one)."""
  eps = sorted({0.0, *map(float, eps)})
  num = len(labels_N)
  padding = -num % batch_size  # One batch shape, one compilation; padded rows are not counted.
  pixels_NHWC = np.pad(images_NHWC, [(0, padding)] + [(0, 0)] * 3).astype(np.float32)
  labels_N = np.pad(labels_N, (0, padding))
  fgsm_acc, pgd_acc, sizes = [], [], []
  kept_fgsm, kept_pgd, predicted_fgsm, predicted_pgd = {}, {}, {}, {}
  for e in eps:
    size = 2.5 * e / pgd_steps if step_size is None else step_size
    wrong_fgsm = wrong_pgd = 0
    for start in range(0, len(labels_N), batch_size):
      rows = slice(start, start + batch_size)
      fgsm, fgsm_wrong, pgd, pgd_wrong = attack_batch(
          state, pixels_NHWC[rows], labels_N[rows], jnp.float32(e), jnp.float32(size), mean=mean,
          std=std, num_seeds=num_seeds, steps=pgd_steps)
      counted = np.arange(start, start + batch_size) < num
      wrong_fgsm += int(np.sum(np.asarray(fgsm_wrong) & counted))
      wrong_pgd += int(np.sum(np.asarray(pgd_wrong) & counted))
      if start == 0:
        k = min(num_examples_kept, num)
        kept_fgsm[e] = np.round(np.asarray(fgsm[:k])).astype(np.uint8)
        kept_pgd[e] = np.round(np.asarray(pgd[:k])).astype(np.uint8)
        predicted_fgsm[e], predicted_pgd[e] = (
            np.asarray(steps.log_probabilities(state, pixels, mean=mean, std=std,
                                               num_seeds=num_seeds).argmax(axis=1))
            for pixels in (fgsm[:k], pgd[:k]))
    fgsm_acc.append((num - wrong_fgsm) / num)
    pgd_acc.append((num - wrong_pgd) / num)
    sizes.append(size)
  return Robustness(eps, fgsm_acc[0], fgsm_acc, pgd_acc, pgd_steps, sizes, kept_fgsm, kept_pgd,
                    predicted_fgsm, predicted_pgd)


@functools.partial(jax.jit, static_argnames=("mean", "std", "num_seeds"))
def saliency(state: steps.TrainState, images_NHWC: jax.Array, classes_N: jax.Array, *,
             mean: float, std: float, num_seeds: int = 1) -> jax.Array:
  """|d log p(class) / d pixel| of each image for the given class (e.g. the predicted one),
  scaled to 0..1 per image: where a change of the pixels would change that belief most."""

  def log_prob(pixels):
    log_probs_NC = steps.log_probabilities(state, pixels, mean=mean, std=std, num_seeds=num_seeds)
    return jnp.take_along_axis(log_probs_NC, classes_N[:, None], axis=1).sum()

  magnitude_NHWC = jnp.abs(jax.grad(log_prob)(images_NHWC.astype(jnp.float32)))
  return magnitude_NHWC / jnp.maximum(magnitude_NHWC.max(axis=(1, 2, 3), keepdims=True), 1e-12)
