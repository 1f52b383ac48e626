"""Stronger models, validation hold-out, early stopping and many seeds in one program."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, train_and_report
from mnist_jax import data, steps, train

INFO = data.DatasetInfo("mnist", (28, 28, 1), 10, tuple("0123456789"))


@pytest.mark.parametrize("experiment", [pytest.param("cnn", marks=pytest.mark.slow), "mlp_regularized", "fast_mlp"])
def test_each_experiment_model_lowers_its_loss_on_a_fixed_batch(mnist_train, experiment):
  config = load_config(experiment)
  state = steps.create_train_state(config, INFO, jax.random.PRNGKey(0), steps_per_epoch=100)
  batch = {
      "image": jnp.asarray(data.normalize(mnist_train.images_NHWC[:128].astype(np.float32),
                                          config.pixel_mean, config.pixel_std)),
      "label": jnp.asarray(mnist_train.labels_N[:128]),
  }
  step = jax.jit(steps.train_step)
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


def test_validation_is_the_end_of_train_and_disjoint_from_training(mnist_train):
  train_split, val_split = data.holdout_splits(60_000, 0.1)
  kept, held_out = data.load_split("mnist", train_split), data.load_split("mnist", val_split)
  assert (len(kept), len(held_out)) == (54_000, 6_000)
  np.testing.assert_array_equal(kept.images_NHWC, mnist_train.images_NHWC[:54_000])
  np.testing.assert_array_equal(held_out.images_NHWC, mnist_train.images_NHWC[54_000:])
  assert data.holdout_splits(60_000, 0.0) == ("train", None)
  assert data.num_examples("mnist", val_split) == 6_000


def test_stopped_early_counts_epochs_since_the_best():
  history = [{"val_accuracy": a} for a in (0.90, 0.95, 0.94, 0.95)]
  assert not train.stopped_early(history, "val_accuracy", 3)
  assert train.stopped_early(history, "val_accuracy", 2)  # The best, 0.95, was 2 epochs ago.
  assert not train.stopped_early(history, "val_accuracy", 0)


@pytest.mark.slow
def test_early_stopping_ends_a_run_that_stopped_improving(tmp_path):
  config = load_config("seed_mlp", "smoke")
  config.num_epochs, config.validation_fraction, config.early_stopping_patience = 5, 0.1, 1
  config.learning_rate = 1e-12  # The model cannot improve, so the first epoch stays the best.
  _, final = train.train_and_evaluate(config, str(tmp_path))
  assert final["stopped_early"] and final["epoch"] == 2
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2]
  assert records[0]["val_examples"] == 6_000 and records[0]["test_examples"] == 10_000


@pytest.mark.slow
def test_vmapped_seeds_match_the_same_seeds_trained_one_by_one(tmp_path):
  config = load_config("seed_mlp", "smoke")
  config.num_seeds = 2
  together = train_and_report(config, tmp_path / "together")
  config.num_seeds = 1
  for seed in (0, 1):
    config.seed = seed
    _, alone = train.train_and_evaluate(config, str(tmp_path / f"seed{seed}"))
    for key in ("train_loss", "test_loss", "test_accuracy"):
      np.testing.assert_allclose(together[f"{key}_per_seed"][seed], alone[key], rtol=1e-4)
  assert together["test_accuracy"] == pytest.approx(np.mean(together["test_accuracy_per_seed"]))
  assert together["test_accuracy_per_seed"][0] != together["test_accuracy_per_seed"][1]
  report = (tmp_path / "together" / "report.md").read_text()
  assert "## 2 seeds trained together" in report
  assert f"| 1 | {together['test_accuracy_per_seed'][1]:.2%} |" in report
