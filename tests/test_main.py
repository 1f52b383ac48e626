"""`python -m mnist_jax.main` end to end, and every bad input it must refuse in one line."""

import json
import os

import pytest

from conftest import main_in_process, run_main


def test_one_epoch_of_the_seed_recipe_end_to_end(tmp_path, mnist_test):
  del mnist_test  # Prepared already, as it is after the first run.
  result = run_main("--config=experiments/seed_mlp.py", "--config.num_epochs=1",
                    f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("epoch 1/1  train_loss ")
  assert result.stderr == ""  # No TensorFlow or XLA start-up chatter.
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert final["test_accuracy"] >= 0.93
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["batch_size"] == 32 and config["model_args"]["hidden_sizes"] == [128]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=experiments/no_such.py"], "No such file or directory"),
        (["--config=tests/conftest.py"], "defines no get_config"),
        (["--config=experiments/seed_mlp.py", "--config.lerning_rate=0.1"],
         "unknown config field 'lerning_rate'"),
        (["--config=experiments/seed_mlp.py", "--config.batch_size=many"],
         "--config.batch_size=many"),
        pytest.param(["--config=experiments/seed_mlp.py", "--config.dataset=no_such_dataset"],
                     "unknown dataset 'no_such_dataset'", marks=pytest.mark.tf),
        pytest.param(["--config=experiments/seed_mlp.py", "--config.dataset=kmnist"],
                     "cannot be downloaded here", marks=pytest.mark.tf),
        (["--config=experiments/seed_mlp.py", "--config.dataset=../.."], "is not a dataset name"),
        (["--config=experiments/seed_mlp.py", "--config.batch_size=0"],
         "config.batch_size must be a whole number in [1, 1,048,576], got 0"),
        (["--config=experiments/seed_mlp.py", "--config.num_epochs=-1"],
         "config.num_epochs must be a whole number in [0, 100,000], got -1"),
        (["--config=experiments/seed_mlp.py:huge"], "unknown variant 'huge'"),
        (["--config=experiments/seed_mlp.py", "--config.batch_size=100000"],
         "config.batch_size 100000 is larger than the 60000 training examples"),
        (["--workdir_typo=x"], "Unknown command line flag 'workdir_typo'"),
        # A flag for another mode would be ignored.
        (["--mode=eval", "--images=a.png"], "--images is for --mode=predict, not --mode=eval"),
        (["--mode=predict", "--images_dir=x"], "--images_dir is for --mode=eval, not --mode=predict"),
        (["--config=experiments/seed_mlp.py", "--calibrated"],
         "--calibrated is for --mode=eval or predict, not --mode=train"),
        (["--mode=attack", "--eps="], "--eps needs at least one value"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(tmp_path, args, message):
  result = main_in_process(*args, f"--workdir={tmp_path / 'run'}")
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("mnist_jax: ") and message in lines[0], lines[0]
  assert not os.path.exists(tmp_path / "run")  # A command that fails creates nothing.
