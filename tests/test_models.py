"""The modules' sizes and output shapes, and `PatchConv` against `nn.Conv`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import models

MNIST_SHAPE = (28, 28, 1)


def _num_params(model: nn.Module) -> int:
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *MNIST_SHAPE)))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))


def test_mlp_parameter_count_matches_its_layers():
  assert _num_params(models.MLP(hidden_sizes=(128,), num_classes=10)) == (
      28 * 28 * 1 * 128 + 128  # hidden
      + 128 * 10 + 10  # head
  )
  assert _num_params(models.MLP(hidden_sizes=(64, 32), num_classes=3)) == (
      28 * 28 * 1 * 64 + 64
      + 64 * 32 + 32
      + 32 * 3 + 3
  )


def test_cnn_parameter_count_matches_its_layers():
  assert _num_params(models.CNN(features=(32, 64), dense_size=128, num_classes=10)) == (
      3 * 3 * 1 * 32 + 32  # conv 1
      + 3 * 3 * 32 * 64 + 64  # conv 2
      + (28 // 2 // 2) * (28 // 2 // 2) * 64 * 128 + 128  # dense, after two 2x2 pools
      + 128 * 10 + 10  # head
  )
  assert _num_params(models.CNN(features=(8,), dense_size=16, num_classes=3)) == (
      3 * 3 * 1 * 8 + 8
      + (28 // 2) * (28 // 2) * 8 * 16 + 16
      + 16 * 3 + 3
  )


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("num_classes", [10, 3])
def test_logits_have_shape_batch_by_classes(name, num_classes):
  model = models.create_model(name, num_classes)
  images_BHWC = jnp.zeros((5, *MNIST_SHAPE))
  logits_BC = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), images_BHWC)[0]
  assert logits_BC.shape == (5, num_classes)
  assert logits_BC.dtype == jnp.float32


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("channels", [1, 3])
def test_patch_conv_computes_the_same_function_as_nn_conv(kernel_size, channels):
  features = 4
  rng = np.random.default_rng(0)
  images_BHWC = rng.standard_normal((2, 7, 10, channels), np.float32)
  # Patches are concatenated row by row, then column, each holding all channels: the row-major
  # flattening of a `[k, k, C, F]` conv kernel. Flax refuses a kernel of any other shape.
  kernel_PF = rng.standard_normal((kernel_size * kernel_size * channels, features), np.float32)
  bias_F = rng.standard_normal((features,), np.float32)  # Not zeros, so a dropped bias would show.
  kernel_KKCF = kernel_PF.reshape((kernel_size, kernel_size, channels, features))
  conv = nn.Conv(features, (kernel_size, kernel_size), padding="SAME")
  with jax.default_matmul_precision("float32"):  # No TF32 on a GPU.
    expected_BHWF = conv.apply({"params": {"kernel": kernel_KKCF, "bias": bias_F}}, images_BHWC)
    actual_BHWF = models.PatchConv(features, kernel_size).apply(
        {"params": {"Dense_0": {"kernel": kernel_PF, "bias": bias_F}}}, images_BHWC
    )
  assert actual_BHWF.shape == (2, 7, 10, features)
  np.testing.assert_allclose(actual_BHWF, expected_BHWF, rtol=1e-5, atol=1e-5)


def test_create_model_refuses_an_unknown_name():
  with pytest.raises(ValueError, match="unknown model 'resnet'.*'cnn', 'mlp'"):
    models.create_model("resnet", 10)
