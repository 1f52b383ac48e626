"""The classic Keras MNIST notebook's recipe: Flatten -> Dense(128, relu) -> Dense(10), Adam 1e-3.

  python -m mnist_jax.main --config=experiments/seed_mlp.py --workdir=runs/seed_mlp

Batch 32 for 10 epochs, pixels divided by 255, seed 0. Its results, on each machine measured (the
digits depend on the CPU's vector width), and the Keras original's on the same files: the
README's results table.

`experiments/seed_mlp.py:smoke` shrinks the run to one epoch at batch 128 and saves after every
epoch, for tests and CI.
"""

import ml_collections

from mnist_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = configs.defaults()  # This recipe is what mnist_jax/configs.py declares as defaults.
  if arg == "smoke":
    config.num_epochs = 1
    config.batch_size = 128
    config.checkpoint_interval_s = 0.0  # Every epoch saves, as the tests of resuming need.
  elif arg is not None:
    raise ValueError(f"unknown variant {arg!r} of seed_mlp; use 'smoke' or none")
  return config
