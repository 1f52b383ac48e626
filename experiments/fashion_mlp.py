"""The regularized MLP (784-1024-1024-10, dropout 0.2, AdamW, cosine) on Fashion-MNIST.

  python -m mnist_jax.main --config=experiments/fashion_mlp.py --workdir=runs/fashion_mlp

`fashion_mnist` loads through tfds: it must be prepared in tfds' data dir (`tfds build
fashion_mnist` where there is network access, then `config.data_dir` or `TFDS_DATA_DIR`); where it
is not, the run stops with one line that says so. Inputs are standardized with Fashion-MNIST's
published pixel statistics (mean 0.2860, std 0.3530 after dividing by 255). Result: the README's
results table (not measured yet); the training code path is tested on `tfds.testing.mock_data`
(tests/test_fashion.py).

`experiments/fashion_mlp.py:smoke`: one epoch at batch 128.
"""

import ml_collections

from mnist_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = configs.sibling(__file__, "mlp_regularized", arg)
  config.dataset = "fashion_mnist"
  config.pixel_mean, config.pixel_std = 0.2860, 0.3530
  return config
