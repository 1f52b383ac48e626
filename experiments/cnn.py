"""A small CNN: two 3x3 conv layers (32, 64) with max-pooling, a 128-wide dense layer, dropout,
trained on images shifted by up to one pixel (on the device).

  python -m mnist_jax.main --config=experiments/cnn.py --workdir=runs/cnn

Adam 1e-3 with cosine decay, batch 128, standardized inputs. Results for seeds 0, 1 and 2
(`--config.seed=S`): the README's results table; without the shifts:
docs/2026-11-30-results.md.
"""

import ml_collections

from mnist_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = configs.sibling(__file__, "seed_mlp", arg)
  config.pixel_mean, config.pixel_std = 0.1307, 0.3081
  config.model = "cnn"
  config.model_args = ml_collections.ConfigDict(
      dict(features=(32, 64), dense_size=128, activation="relu", dropout_rate=0.25)
  )
  config.lr_schedule = "cosine"
  config.augment_shift = 1
  if arg is None:
    config.batch_size = 128
    config.num_epochs = 5
  return config
