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


MODELS = {"mlp": MLP}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """The module registered as `name` in `MODELS`, built from its config fields."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes, **kwargs)
