"""Adversarial robustness of a trained model: accuracy under FGSM and PGD (L-infinity).

  result = attacks.attack_test_split(model, [0.0, 0.1, 0.2], pgd_steps=10)
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

PGD's steps run as compiled calls of about `CHUNK_S` seconds each, however many steps are asked
for: Python waits for a compiled call to end before it handles a signal, so Ctrl-C ends an attack
between two calls.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import data, steps
from mnist_jax.run import checkpoints
from mnist_jax.studies import predict

CHUNK_S = 0.25
PROGRESS_EVERY_S = 10.0

Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]


def _losses_and_gradient(state, pixels_BHWC, labels_B, mean, std, num_seeds):
  """Per-example cross-entropy, whether each is wrong, and the gradient of their sum."""

  def total(pixels):
    log_probs_BC = predict.log_probabilities(state, pixels, mean=mean, std=std,
                                             num_seeds=num_seeds)
    losses_B = -jnp.take_along_axis(log_probs_BC, labels_B[:, None], axis=1)[:, 0]
    return losses_B.sum(), (losses_B, log_probs_BC.argmax(axis=1) != labels_B)

  (_, (losses_B, wrong_B)), gradient = jax.value_and_grad(total, has_aux=True)(pixels_BHWC)
  return losses_B, wrong_B, gradient


@functools.partial(jax.jit, static_argnames=("mean", "std", "num_seeds"))
def _fgsm(state: steps.TrainState, pixels_BHWC: jax.Array, labels_B: jax.Array, eps: jax.Array, *,
          mean: float, std: float, num_seeds: int) -> tuple[Carry, jax.Array, jax.Array]:
  """FGSM's step as PGD's first: `(pixels, gradient, worst, worst_loss, worst_wrong)` after it,
  and the bounds of the eps-ball within 0..255."""
  eps = eps * 255.0
  low, high = jnp.maximum(pixels_BHWC - eps, 0.0), jnp.minimum(pixels_BHWC + eps, 255.0)
  _, _, gradient = _losses_and_gradient(state, pixels_BHWC, labels_B, mean, std, num_seeds)
  fgsm = jnp.clip(pixels_BHWC + eps * jnp.sign(gradient), low, high)
  losses, wrong, gradient = _losses_and_gradient(state, fgsm, labels_B, mean, std, num_seeds)
  return (fgsm, gradient, fgsm, losses, wrong), low, high


@functools.partial(jax.jit, static_argnames=("mean", "std", "num_seeds"))
def _pgd_steps(state: steps.TrainState, carry: Carry, labels_B: jax.Array, low: jax.Array,
               high: jax.Array, step_size: jax.Array, num_steps: jax.Array, *, mean: float,
               std: float, num_seeds: int) -> Carry:
  """`num_steps` more PGD steps (a traced count: one program for any)."""
  step_size = step_size * 255.0

  def step(_, carry):
    pixels, gradient, worst, worst_loss, worst_wrong = carry
    pixels = jnp.clip(pixels + step_size * jnp.sign(gradient), low, high)
    losses, wrong, gradient = _losses_and_gradient(state, pixels, labels_B, mean, std, num_seeds)
    better = (wrong & ~worst_wrong) | ((wrong == worst_wrong) & (losses > worst_loss))
    pick = lambda new, old: jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return pixels, gradient, pick(pixels, worst), pick(losses, worst_loss), worst_wrong | wrong

  return jax.lax.fori_loop(0, num_steps, step, carry)


class _Chunks:
  """Runs steps in calls of about `target_s` seconds each, the size of each call measured on the
  last, and reports each call's steps to `done`."""

  def __init__(self, target_s: float = CHUNK_S, done: Callable[[int], None] = lambda steps: None):
    self.size, self.target_s, self.done = 1, target_s, done

  def run(self, call: Callable[[Carry, int], Carry], carry: Carry, num_steps: int) -> Carry:
    """`call(carry, n)` until it has run `num_steps` steps, each call waited for."""
    left = num_steps
    while left > 0:
      n = min(self.size, left)
      start = time.perf_counter()
      carry = jax.block_until_ready(call(carry, n))
      per_call = int(n * self.target_s / max(time.perf_counter() - start, 1e-6))
      self.size = max(1, min(4 * self.size, per_call))  # The first call compiles: grow slowly.
      left -= n
      self.done(n)
    return carry


def attack_batch(state: steps.TrainState, pixels_BHWC: jax.Array, labels_B: jax.Array,
                 eps: float, step_size: float, *, mean: float, std: float, num_seeds: int,
                 steps: int, chunks: _Chunks | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """FGSM's and PGD's adversarial pixels (0..255) for one batch, and whether each is misclassified.

  `eps` and `step_size` are in units of 1/255 of the range, like the module's.
  """
  kwargs = dict(mean=mean, std=std, num_seeds=num_seeds)
  carry, low, high = _fgsm(state, pixels_BHWC, labels_B, jnp.float32(eps), **kwargs)
  fgsm, fgsm_wrong = carry[0], carry[4]
  run = lambda carry, n: _pgd_steps(state, carry, labels_B, low, high, jnp.float32(step_size),
                                    jnp.int32(n), **kwargs)
  _, _, pgd, _, pgd_wrong = (chunks or _Chunks()).run(run, carry, steps - 1)
  return fgsm, fgsm_wrong, pgd, pgd_wrong


@dataclasses.dataclass(frozen=True)
class Robustness:
  """Accuracy per eps under no attack, FGSM and PGD, and one batch's adversarial images."""

  eps: list[float]
  clean_accuracy: float
  fgsm_accuracy: list[float]
  pgd_accuracy: list[float]
  pgd_steps: int
  step_sizes: list[float]
  num_examples: int
  images_KHWC: np.ndarray  # The first images attacked, uint8, and their labels.
  labels_K: np.ndarray
  examples_fgsm_KHWC: dict[float, np.ndarray]  # Their adversarial images, uint8.
  examples_pgd_KHWC: dict[float, np.ndarray]
  predictions_fgsm_K: dict[float, np.ndarray]
  predictions_pgd_K: dict[float, np.ndarray]


class _Progress:
  """Called with the steps each compiled call ran; every `every_s` a line with the share of the
  attack's steps done and the time left."""

  def __init__(self, total_steps: int, every_s: float, out: TextIO):
    self.total, self.every_s, self.out = total_steps, every_s, out
    self.done, self.start = 0, time.perf_counter()
    self.last = self.start

  def __call__(self, steps_done: int) -> None:
    self.done += steps_done
    now = time.perf_counter()
    if now - self.last < self.every_s or self.done >= self.total:
      return
    self.last = now
    left_s = round((self.total - self.done) * (now - self.start) / self.done)
    print(f"  attack: {self.done / self.total:.0%} of its steps  ETA {left_s // 60}:"
          f"{left_s % 60:02d}", file=self.out, flush=True)


def accuracy_under_attack(
    state: steps.TrainState, images_NHWC: np.ndarray, labels_N: np.ndarray, eps: list[float], *,
    mean: float, std: float, num_seeds: int, pgd_steps: int = 10, step_size: float | None = None,
    batch_size: int = 500, num_examples_kept: int = 10, progress_every_s: float | None = None,
    out: TextIO | None = None,
) -> Robustness:
  """Accuracy of the model over `images_NHWC` (uint8) under each attack at each eps (0 is
  always among them: its accuracy is the clean one). With `progress_every_s`, a line to `out`
  (stdout) when the attack starts and one every so many seconds after."""
  eps = sorted({0.0, *map(float, eps)})
  num = len(labels_N)
  padding = -num % batch_size  # One batch shape, one compilation; padded rows are not counted.
  pixels_NHWC = np.pad(images_NHWC, [(0, padding)] + [(0, 0)] * 3).astype(np.float32)
  labels_N = np.pad(labels_N, (0, padding))
  num_batches = len(labels_N) // batch_size
  progress = lambda steps_done: None
  if progress_every_s is not None:
    out = out or sys.stdout
    print(f"attack: {num} images, eps {', '.join(f'{e:g}' for e in eps)}, FGSM and PGD of "
          f"{pgd_steps} steps", file=out, flush=True)
    progress = _Progress(len(eps) * num_batches * pgd_steps, progress_every_s, out)
  chunks = _Chunks(done=progress)
  k = min(num_examples_kept, num)
  fgsm_acc, pgd_acc, sizes = [], [], []
  kept_fgsm, kept_pgd, predicted_fgsm, predicted_pgd = {}, {}, {}, {}
  for e in eps:
    size = 2.5 * e / pgd_steps if step_size is None else step_size
    wrong_fgsm = wrong_pgd = 0
    for start in range(0, len(labels_N), batch_size):
      rows = slice(start, start + batch_size)
      fgsm, fgsm_wrong, pgd, pgd_wrong = attack_batch(
          state, pixels_NHWC[rows], labels_N[rows], e, size, mean=mean, std=std,
          num_seeds=num_seeds, steps=pgd_steps, chunks=chunks)
      progress(1)  # FGSM's step.
      counted = np.arange(start, start + batch_size) < num
      wrong_fgsm += int(np.sum(np.asarray(fgsm_wrong) & counted))
      wrong_pgd += int(np.sum(np.asarray(pgd_wrong) & counted))
      if start == 0:
        kept_fgsm[e] = np.round(np.asarray(fgsm[:k])).astype(np.uint8)
        kept_pgd[e] = np.round(np.asarray(pgd[:k])).astype(np.uint8)
        predicted_fgsm[e], predicted_pgd[e] = (
            np.asarray(predict.log_probabilities(state, pixels, mean=mean, std=std,
                                                 num_seeds=num_seeds).argmax(axis=1))
            for pixels in (fgsm[:k], pgd[:k]))
    fgsm_acc.append((num - wrong_fgsm) / num)
    pgd_acc.append((num - wrong_pgd) / num)
    sizes.append(size)
  return Robustness(eps, fgsm_acc[0], fgsm_acc, pgd_acc, pgd_steps, sizes, num,
                    np.asarray(images_NHWC[:k]), np.asarray(labels_N[:k]), kept_fgsm, kept_pgd,
                    predicted_fgsm, predicted_pgd)


def attack_test_split(model: checkpoints.Restored, eps: list[float], pgd_steps: int,
                      num_examples: int | None = None) -> Robustness:
  """FGSM and PGD accuracy against eps on the first `num_examples` test images (all of them by
  default), with progress lines on stdout."""
  config = model.config
  test = data.load_split(config.dataset, "test", config.data_dir)
  return accuracy_under_attack(
      model.state, test.images_NHWC[:num_examples], test.labels_N[:num_examples], eps,
      mean=config.pixel_mean, std=config.pixel_std, num_seeds=config.num_seeds,
      pgd_steps=pgd_steps, progress_every_s=PROGRESS_EVERY_S)
