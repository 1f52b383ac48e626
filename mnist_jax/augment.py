"""Random image augmentation on the device: integer shifts and small rotations/scalings.

Pure functions of a batch `images_BHWC` (float) and a PRNG key, usable under `jit`, `lax.scan`
and `vmap`. Pixels moved in from outside the image take `fill_value`; training applies them to
pixel values before normalization, where 0 is MNIST's background.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections


def shift_offsets(rng: jax.Array, batch: int, max_shift: int) -> jax.Array:
  """`[batch, 2]` integer (row, column) offsets, each uniform in `[-max_shift, max_shift]`."""
  return jax.random.randint(rng, (batch, 2), -max_shift, max_shift + 1)


def random_shift(
    images_BHWC: jax.Array, rng: jax.Array, max_shift: int, fill_value: float = 0.0
) -> jax.Array:
  """Each image moved by its own offset from `shift_offsets`: pixel `(y, x)` goes to `(y+dy, x+dx)`.

  Written as a pad by `max_shift` and one `lax.dynamic_slice` per image (exact, no resampling).
  """
  if max_shift == 0:
    return images_BHWC
  _, height, width, channels = images_BHWC.shape
  m = max_shift
  padded = jnp.pad(images_BHWC, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=fill_value)
  offsets_B2 = shift_offsets(rng, images_BHWC.shape[0], max_shift)

  def crop(image_HWC, offset_2):
    start = m - offset_2  # Output pixel (y, x) reads padded (y + m - dy, x + m - dx).
    return jax.lax.dynamic_slice(image_HWC, (start[0], start[1], 0), (height, width, channels))

  return jax.vmap(crop)(padded, offsets_B2)


def random_rotate_scale(
    images_BHWC: jax.Array, rng: jax.Array, max_degrees: float, max_scale: float,
    fill_value: float = 0.0,
) -> jax.Array:
  """Each image rotated by an angle uniform in `+-max_degrees` and scaled by a factor uniform in
  `1 +- max_scale`, about its centre, resampled bilinearly (`jax.scipy.ndimage.map_coordinates`).
  """
  if max_degrees == 0 and max_scale == 0:
    return images_BHWC
  batch, height, width, _ = images_BHWC.shape
  angle_rng, scale_rng = jax.random.split(rng)
  uniform_B = lambda rng: jax.random.uniform(rng, (batch,), minval=-1, maxval=1)
  angles_B = uniform_B(angle_rng) * math.radians(max_degrees)
  scales_B = 1 + uniform_B(scale_rng) * max_scale
  rows_HW, cols_HW = jnp.meshgrid(jnp.arange(height) - (height - 1) / 2,
                                  jnp.arange(width) - (width - 1) / 2, indexing="ij")

  def transform(image_HWC, angle, scale):
    # The output pixel at (r, c) from the centre reads the input at R(-angle) (r, c) / scale.
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    src_rows = cos * rows_HW + sin * cols_HW + (height - 1) / 2
    src_cols = -sin * rows_HW + cos * cols_HW + (width - 1) / 2
    channel = lambda x_HW: jax.scipy.ndimage.map_coordinates(
        x_HW, [src_rows, src_cols], order=1, mode="constant", cval=fill_value)
    return jax.vmap(channel, -1, -1)(image_HWC)

  return jax.vmap(transform)(images_BHWC, angles_B, scales_B)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """What to draw for each training image; hashable, so it can be a static argument of `jit`."""

  shift: int = 0
  rotate_degrees: float = 0.0
  scale: float = 0.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Augmentation:
    return cls(config.augment_shift, config.augment_rotate_degrees, config.augment_scale)

  @property
  def enabled(self) -> bool:
    return bool(self.shift or self.rotate_degrees or self.scale)

  def __call__(self, images_BHWC: jax.Array, rng: jax.Array) -> jax.Array:
    """Rotation and scaling first (when asked for), then the integer shift."""
    affine_rng, shift_rng = jax.random.split(rng)
    images_BHWC = random_rotate_scale(images_BHWC, affine_rng, self.rotate_degrees, self.scale)
    return random_shift(images_BHWC, shift_rng, self.shift)
