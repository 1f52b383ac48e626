"""Flax modules. Each maps images `[B, H, W, C]` (float, normalized) to logits `[B, num_classes]`."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten, then `Dense(width) -> activation -> dropout` per hidden layer, then `Dense(classes)`."""

  hidden_sizes: Sequence[int] = (128,)
  num_classes: int = 10
  activation: str = "relu"
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, images_BHWC: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    x = images_BHWC.reshape((images_BHWC.shape[0], -1))
    for width in self.hidden_sizes:
      x = getattr(nn, self.activation)(nn.Dense(width)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class PatchConv(nn.Module):
  """A 'SAME', stride-1 convolution written as shifted copies of the input and one `Dense`.

  Same function as `nn.Conv`, but XLA:CPU runs a convolution inside `lax.scan` (our epochs) on a
  slow path, many times slower than this; outside a scan the two run alike.
  """

  features: int
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
    _, height, width, _ = x_BHWC.shape
    k = self.kernel_size
    before, after = (k - 1) // 2, k // 2  # As nn.Conv's "SAME", for even sizes too.
    padded = jnp.pad(x_BHWC, ((0, 0), (before, after), (before, after), (0, 0)))
    patches_BHWP = jnp.concatenate(
        [padded[:, i : i + height, j : j + width, :] for i in range(k) for j in range(k)], -1
    )
    return nn.Dense(self.features)(patches_BHWP)


class CNN(nn.Module):
  """`conv 3x3 -> activation -> max-pool 2x2` per entry of `features`, then a dense head.

  The Flax MNIST example's network with its widths as fields, and dropout before the last layer.
  """

  features: Sequence[int] = (32, 64)
  dense_size: int = 128
  num_classes: int = 10
  activation: str = "relu"
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, images_BHWC: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    act = getattr(nn, self.activation)
    x = images_BHWC
    for width in self.features:
      x = nn.max_pool(act(PatchConv(width)(x)), (2, 2), strides=(2, 2))
    x = act(nn.Dense(self.dense_size)(x.reshape((x.shape[0], -1))))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


MODELS = {"mlp": MLP, "cnn": CNN}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """The module registered as `name` in `MODELS`, built from its config fields."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes, **kwargs)
