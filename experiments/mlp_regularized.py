"""A wider MLP with dropout: 784-1024-1024-10, dropout 0.2, AdamW with cosine decay.

  python -m mnist_jax.main --config=experiments/mlp_regularized.py --workdir=runs/mlp_regularized

Batch 128, 20 epochs, standardized inputs; aimed above Keras' classic 512-512 dropout MLP.
Result: the README's results table.
"""

import ml_collections

from mnist_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = configs.sibling(__file__, "seed_mlp", arg)
  config.pixel_mean, config.pixel_std = 0.1307, 0.3081
  config.model_args = ml_collections.ConfigDict(
      dict(hidden_sizes=(1024, 1024), activation="relu", dropout_rate=0.2)
  )
  config.optimizer = "adamw"
  config.weight_decay = 1e-4
  config.lr_schedule = "cosine"
  if arg is None:
    config.batch_size = 128
    config.num_epochs = 20
  return config
