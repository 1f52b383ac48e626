"""The classic Keras MNIST notebook's recipe: Flatten -> Dense(128, relu) -> Dense(10), Adam 1e-3.

  python -m mnist_jax.main --config=experiments/seed_mlp.py --workdir=runs/seed_mlp

Batch 32 for 10 epochs, pixels divided by 255, seed 0. Its results, on each machine measured (the
digits depend on the CPU's vector width), and the Keras original's on the same files: the
README's results table.

`experiments/seed_mlp.py:smoke` shrinks the run to one epoch at batch 128, for tests and CI.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.dataset = "mnist"
  config.data_dir = ml_collections.config_dict.placeholder(str)  # tfds' default, or TFDS_DATA_DIR.
  config.input_pipeline = "device"  # or "stream": chunks from host memory (for data too big for it).
  config.pixel_mean = 0.0  # After dividing by 255; MNIST's own statistics are 0.1307 and 0.3081.
  config.pixel_std = 1.0

  config.model = "mlp"
  config.model_args = ml_collections.ConfigDict(
      dict(hidden_sizes=(128,), activation="relu", dropout_rate=0.0)
  )

  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.lr_schedule = "constant"
  config.weight_decay = 0.0  # adamw only.
  config.momentum = 0.9  # sgd only.

  config.batch_size = 32
  config.eval_batch_size = 1024  # A power of two divides among any power-of-two device count.
  config.num_epochs = 10
  config.seed = 0
  config.num_seeds = 1  # Models trained at once (vmap), seeds seed .. seed + num_seeds - 1.

  # Held out from the end of the training split: 0 keeps the notebook's use of all 60,000. Where
  # set, the validation accuracy picks the best checkpoint and drives early stopping.
  config.validation_fraction = 0.0
  config.early_stopping_patience = 0  # Epochs without a better selection metric; 0: never stop.

  # Random per-image augmentation of training batches on the device (see mnist_jax/augment.py):
  # shifts of up to `augment_shift` pixels, rotations within +-`augment_rotate_degrees`, scalings
  # within 1 +- `augment_scale`. 0 turns each off; input_pipeline='device' only.
  config.augment_shift = 0
  config.augment_rotate_degrees = 0.0
  config.augment_scale = 0.0

  config.checkpoint_every_epochs = 1  # And after the last epoch, whatever this is.
  config.keep_checkpoints = 3  # The newest ones; the best (see validation_fraction) is kept too.

  if arg == "smoke":
    config.num_epochs = 1
    config.batch_size = 128
  elif arg is not None:
    raise ValueError(f"unknown variant {arg!r} of seed_mlp; use 'smoke' or none")
  return config
