"""Augmentation on the device: shapes, keys, exact shifts, rotations, and training with it."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from mnist_jax import augment, configs, data, steps

INFO = data.DatasetInfo("mnist", (28, 28, 1), 10, tuple("0123456789"))
AUG = augment.Augmentation(shift=2, rotate_degrees=10.0, scale=0.1)


@pytest.fixture(scope="module")
def digits_BHWC(mnist_test):
  return jnp.asarray(mnist_test.images_NHWC[:16].astype(np.float32))


def test_augmentation_keeps_shape_and_dtype_and_follows_its_key(digits_BHWC):
  apply = jax.jit(AUG.__call__)
  first = apply(digits_BHWC, jax.random.PRNGKey(0))
  assert first.shape == digits_BHWC.shape and first.dtype == digits_BHWC.dtype
  np.testing.assert_array_equal(first, apply(digits_BHWC, jax.random.PRNGKey(0)))
  other = apply(digits_BHWC, jax.random.PRNGKey(1))
  assert not np.allclose(first, other)
  assert not np.allclose(first, digits_BHWC)


def test_zero_augmentation_is_the_identity(digits_BHWC):
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(augment.random_shift(digits_BHWC, key, 0), digits_BHWC)
  np.testing.assert_array_equal(augment.Augmentation()(digits_BHWC, key), digits_BHWC)
  # A rotation by 0 degrees at scale 1, forced through the resampling, moves nothing either.
  resampled = augment.random_rotate_scale(digits_BHWC, key, 1e-9, 0.0)
  np.testing.assert_allclose(resampled, digits_BHWC, atol=1e-3)


def test_shift_moves_each_image_by_its_drawn_offset(digits_BHWC):
  key, max_shift = jax.random.PRNGKey(3), 3
  shifted = np.asarray(augment.random_shift(digits_BHWC, key, max_shift))
  offsets = np.asarray(augment.shift_offsets(key, len(digits_BHWC), max_shift))
  assert np.abs(offsets).max() <= max_shift and len(np.unique(offsets, axis=0)) > 1
  originals = np.asarray(digits_BHWC)
  for image, moved, (dy, dx) in zip(originals, shifted, offsets):
    expected = np.zeros_like(image)
    expected[max(dy, 0) : 28 + min(dy, 0), max(dx, 0) : 28 + min(dx, 0)] = (
        image[max(-dy, 0) : 28 + min(-dy, 0), max(-dx, 0) : 28 + min(-dx, 0)])
    np.testing.assert_array_equal(moved, expected)
    ys, xs = np.nonzero(image[..., 0] > 200)  # A real ink pixel lands on its shifted place.
    assert moved[ys[0] + dy, xs[0] + dx, 0] == image[ys[0], xs[0], 0]


def test_rotation_turns_a_point_by_at_most_the_angle_about_the_centre():
  point = np.zeros((8, 28, 28, 1), np.float32)
  point[:, 13, 22] = 1.0  # 8.5 pixels right of the centre (13.5, 13.5), 0.5 up.
  rotated = np.asarray(augment.random_rotate_scale(jnp.asarray(point), jax.random.PRNGKey(0),
                                                   20.0, 0.0))
  rows, cols = np.meshgrid(np.arange(28) - 13.5, np.arange(28) - 13.5, indexing="ij")
  before = math.atan2(-0.5, 8.5)
  turns = []
  for image in rotated[..., 0]:
    weight = image.sum()
    assert 0.5 < weight < 1.5  # Bilinear resampling spreads, but keeps roughly, the ink.
    angle = math.atan2((rows * image).sum() / weight, (cols * image).sum() / weight)
    turns.append(math.degrees(angle - before))
  assert max(abs(t) for t in turns) <= 21 and np.std(turns) > 1, turns


@pytest.mark.slow
def test_augmented_cnn_trains_and_its_epochs_are_reproducible(mnist_train):
  config = load_config("cnn_best", "smoke")
  config.lr_schedule = "constant"  # Cosine over the smoke run's length would end at zero.
  images = jnp.asarray(mnist_train.images_NHWC[:1024])
  labels = jnp.asarray(mnist_train.labels_N[:1024])
  compiled = jax.jit(functools.partial(
      steps.train_epoch, batch_size=128, mean=config.pixel_mean, std=config.pixel_std,
      augmentation=augment.Augmentation.from_config(config)))
  epoch = lambda state, rng: compiled(state, images, labels, steps.epoch_order(rng, 1024), rng)
  init = steps.create_train_state(config, INFO, jax.random.PRNGKey(0), steps_per_epoch=8)
  state, losses = init, []
  for e in range(4):
    state, metrics = epoch(state, jax.random.PRNGKey(e))
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.6 * losses[0], losses
  again, _ = epoch(init, jax.random.PRNGKey(0))
  first, _ = epoch(init, jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, again.params, first.params)


def test_augmentation_is_refused_for_the_stream_pipeline_and_negative_values():
  config = load_config("cnn_best", "smoke")
  config.input_pipeline = "stream"
  with pytest.raises(configs.ConfigError, match="augment.*input_pipeline='device'"):
    configs.validate(config)
  config = load_config("cnn_best", "smoke")
  config.augment_shift = -1
  with pytest.raises(configs.ConfigError, match=r"augment_shift must be a whole number in \[0, 16\], got -1"):
    configs.validate(config)
