"""The jitted steps and the training loop, on real MNIST batches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from mnist_jax import data, pipelines, steps, train

INFO = data.DatasetInfo("mnist", (28, 28, 1), 10, tuple("0123456789"))


def _state(config, seed=0):
  return steps.create_train_state(config, INFO, jax.random.PRNGKey(seed), steps_per_epoch=100)


def _batch(split, size=64):
  return {
      "image": jnp.asarray(data.normalize(split.images_NHWC[:size].astype(np.float32), 0.0, 1.0)),
      "label": jnp.asarray(split.labels_N[:size]),
  }


def test_train_step_lowers_the_loss_on_a_fixed_batch(mnist_train):
  config = load_config("seed_mlp")
  state, batch = _state(config), _batch(mnist_train)
  step = jax.jit(steps.train_step)
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 25


def test_jitted_train_step_does_not_retrace(mnist_train):
  config = load_config("seed_mlp")
  traces = []

  def counted_step(state, batch):
    traces.append(None)
    return steps.train_step(state, batch)

  step = jax.jit(counted_step, donate_argnums=0)
  state = _state(config)
  for _ in range(3):
    state, _ = step(state, _batch(mnist_train))
  assert len(traces) == 1


def test_evaluate_counts_every_test_example(mnist_test):
  config = load_config("seed_mlp")
  state = _state(config)
  # 10,000 is no multiple of 768: the last batch is padded, and its padding must not count.
  metrics = jax.jit(steps.evaluate, static_argnames=("batch_size", "mean", "std"))(
      state, mnist_test.images_NHWC, mnist_test.labels_N, batch_size=768, mean=0.0, std=1.0
  )
  assert int(metrics["count"]) == 10_000
  logits = state.apply_fn({"params": state.params}, _batch(mnist_test, 10_000)["image"])
  expected = np.mean(np.argmax(logits, -1) == mnist_test.labels_N)
  np.testing.assert_allclose(float(metrics["accuracy"]), expected, rtol=1e-6)


@pytest.mark.parametrize("model", ["seed_mlp", "cnn"])
def test_compiled_initial_state_and_epoch_keys_have_the_bits_of_op_by_op(model):
  config = load_config(model)
  state, epoch_rngs = steps.compile_initial_state(config, INFO, 100)()
  init_rng, data_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  expected = steps.create_train_state(config, INFO, init_rng, 100)
  expected_epoch_rngs = [jax.random.fold_in(data_rng, e) for e in range(config.num_epochs + 1)]
  for leaf, expected_leaf in zip(jax.tree.leaves((state, list(epoch_rngs))),
                                 jax.tree.leaves((expected, expected_epoch_rngs)), strict=True):
    np.testing.assert_array_equal(leaf, expected_leaf)


def test_epoch_order_is_a_permutation_drawn_from_the_key():
  orders = [steps.epoch_order(jax.random.fold_in(jax.random.PRNGKey(0), e), 1000) for e in (1, 2)]
  for order in orders:
    assert order.dtype == np.int32 and sorted(order) == list(range(1000))
  assert (orders[0] != orders[1]).mean() > 0.9
  again = steps.epoch_order(jax.random.fold_in(jax.random.PRNGKey(0), 1), 1000)
  np.testing.assert_array_equal(again, orders[0])
  seeds = steps.epoch_order(jax.random.split(jax.random.PRNGKey(0), 3), 1000)
  assert seeds.shape == (3, 1000) and len({tuple(order) for order in seeds}) == 3


def test_train_epoch_trains_on_the_examples_of_its_order(mnist_test):
  config = load_config("seed_mlp")
  images, labels = jnp.asarray(mnist_test.images_NHWC), jnp.asarray(mnist_test.labels_N)
  epoch = jax.jit(steps.train_epoch, static_argnames=("batch_size", "mean", "std"))
  # An order that names only the 3s: the model learns that every digit is a 3.
  threes = np.flatnonzero(mnist_test.labels_N == 3).astype(np.int32)
  state, metrics = epoch(_state(config), images, labels, threes, jax.random.PRNGKey(1),
                         batch_size=32, mean=0.0, std=1.0)
  assert int(state.step) == len(threes) // 32
  assert float(metrics["accuracy"]) > 0.9
  logits = state.apply_fn({"params": state.params}, _batch(mnist_test, 1000)["image"])
  assert (np.argmax(logits, -1) == 3).all()


@pytest.mark.slow
def test_both_pipelines_train_the_same_model(tmp_path, monkeypatch):
  config = load_config("seed_mlp", "smoke")
  config.validation_fraction = 0.1
  finals, states = {}, {}
  monkeypatch.setattr(pipelines, "CHUNK_EXAMPLES", 5000)  # Chunks of 39 steps, the last of 34.
  for pipeline in ("device", "stream"):
    config.input_pipeline = pipeline
    states[pipeline], finals[pipeline] = train.train_and_evaluate(config, str(tmp_path / pipeline))
    lines = (tmp_path / pipeline / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
  assert finals["stream"]["test_accuracy"] > 0.92 and finals["stream"]["test_examples"] == 10_000
  # The same order, steps and keys: the same bits, and the same counts of right answers.
  jax.tree.map(np.testing.assert_array_equal, states["stream"].params, states["device"].params)
  for key in ("train_loss", "train_accuracy", "val_accuracy", "test_accuracy", "val_examples"):
    assert finals["stream"][key] == finals["device"][key], key
  for key in ("val_loss", "test_loss"):  # Summed in chunks: the last bits may differ.
    assert finals["stream"][key] == pytest.approx(finals["device"][key], rel=1e-6)


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(tmp_path):
  config = load_config("seed_mlp", "smoke")
  config.num_epochs = 2
  _, first = train.train_and_evaluate(config, str(tmp_path / "a"))
  _, second = train.train_and_evaluate(config, str(tmp_path / "b"))
  keys = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
  assert [first[k] for k in keys] == [second[k] for k in keys]
  config.seed = 1
  _, other = train.train_and_evaluate(config, str(tmp_path / "c"))
  assert other["train_loss"] != first["train_loss"]


def test_non_finite_loss_stops_training_with_a_clear_message(tmp_path, monkeypatch):
  real_step = steps.train_step

  def diverging_step(state, batch):  # What a learning rate far too high does, sooner or later.
    state, metrics = real_step(state, batch)
    return state, {**metrics, "loss": metrics["loss"] * jnp.inf}

  monkeypatch.setattr(steps, "train_step", diverging_step)
  with pytest.raises(train.TrainingError, match="training loss became inf in epoch 1; lower "):
    train.train_and_evaluate(load_config("seed_mlp", "smoke"), str(tmp_path))
