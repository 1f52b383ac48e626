"""The best CNN recipe here: the `cnn.py` network, wider head, trained longer on augmented images.

  python -m mnist_jax.main --config=experiments/cnn_best.py --workdir=runs/cnn_best

Two 3x3 conv layers (32, 64) with max-pooling, a 256-wide dense layer, dropout 0.25; Adam 1e-3
with cosine decay over 20 epochs at batch 128, standardized inputs. Each training image is drawn
anew every step (on the device, inside the epoch's scan, see mnist_jax/augment.py): rotated by up
to +-10 degrees, scaled by 0.9-1.1, then shifted by up to 2 pixels each way. All 60,000 training
images are used; the reported accuracy is the last epoch's, nothing is selected on the test set.
Results for seeds 0, 1 and 2 in one vmapped program (`--config.num_seeds=3`): the README's
results table; epoch by epoch: docs/2026-11-30-results.md ("CNN, best recipe").

`experiments/cnn_best.py:smoke` is one epoch at batch 128 with the same augmentation.
"""

import ml_collections

from mnist_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = configs.sibling(__file__, "cnn", arg)
  config.model_args.dense_size = 256
  config.augment_shift = 2
  config.augment_rotate_degrees = 10.0
  config.augment_scale = 0.1
  if arg is None:
    config.num_epochs = 20
  return config
