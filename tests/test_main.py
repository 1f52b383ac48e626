"""`python -m mnist_jax.main` end to end, and every bad input it must refuse in one line."""

import json
import os

import pytest

from conftest import main_in_process, run_main


@pytest.mark.slow
def test_one_epoch_of_the_seed_recipe_end_to_end(tmp_path, mnist_test):
  del mnist_test  # Prepared already, as it is after the first run.
  result = run_main("--config=experiments/seed_mlp.py", "--config.num_epochs=1",
                    f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("epoch 1/1  train_loss ")
  assert result.stderr == ""  # No TensorFlow or XLA start-up chatter.
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert final["test_accuracy"] >= 0.93
  # Compiling, timed apart from training: the initial state's programs and each split's.
  assert set(final["compile_times_s"]) == {"init", "train", "test"}
  assert final["compile_time_s"] == pytest.approx(sum(final["compile_times_s"].values()))
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
         "config.num_epochs must be a whole number in [1, 100,000], got -1"),
        (["--config=experiments/seed_mlp.py", "--config.num_epochs=0"],
         "config.num_epochs must be a whole number in [1, 100,000], got 0"),
        # Dataset names that are paths, or no name.
        (["--config=experiments/seed_mlp.py", "--config.dataset="],
         "config.dataset '' is not a dataset name: use a tfds dataset name such as 'mnist'"),
        (["--config=experiments/seed_mlp.py", f"--config.dataset={os.path.abspath(os.sep)}tmp"],
         f"config.dataset '{os.path.abspath(os.sep)}tmp' is not a dataset name"),
        (["--config=experiments/seed_mlp.py", "--config.dataset=../.."],
         "config.dataset '../..' is not a dataset name"),

        (["--config=experiments/seed_mlp.py:huge"], "unknown variant 'huge'"),
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


@pytest.mark.parametrize("args, message", [
    (["--config.validation_fraction=0.000001"],
     "config.validation_fraction=1e-06 holds out 0 of the 60,000 training examples; validation "
     "needs at least 1,000 to rank checkpoints or fit a temperature"),
    (["--config.validation_fraction=0.0001"],
     "config.validation_fraction=0.0001 holds out 6 of the 60,000 training examples"),
    (["--config.validation_fraction=0.0166"], "holds out 996 of the 60,000 training examples"),
    (["--config=experiments/lr_batch_sweep.py:smoke", "--config.validation_fraction=0.0001",
      "--mode=sweep"], "holds out 6 of the 60,000 training examples"),
    (["--config.batch_size=100000"],
     "config.batch_size 100000 is larger than the 60000 training examples"),
])
def test_what_the_training_split_cannot_hold_is_refused_before_any_work(
    tmp_path, mnist_test, args, message):
  del mnist_test  # Prepared already, as it is after the first run.
  given = any(arg.startswith("--config=") for arg in args)
  config = [] if given else ["--config=experiments/seed_mlp.py"]
  result = main_in_process(*config, *args, f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("mnist_jax: ") and message in lines[0], lines
  assert result.stdout == "" and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("source, message", [
    ("def get_config(arg=None):\n  return {'dataset': 'mnist'}\n",
     "returned dict, not an ml_collections.ConfigDict; start it from mnist_jax.configs.defaults()"),
    ("def get_config(arg=None):\n  return None\n",
     "returned None, not an ml_collections.ConfigDict"),
    ("def get_config(arg=None):\n  return ['mnist']\n", "returned list, not an"),
    ("import ml_collections\ndef get_config(arg=None):\n"
     "  return ml_collections.ConfigDict({'dataset': 'mnist'})\n",
     "the config lacks 24 of its 25 fields (data_dir, input_pipeline, pixel_mean, pixel_std, model, "
     "...); start get_config from mnist_jax.configs.defaults() and set what differs"),
    ("from mnist_jax import configs\ndef get_config(arg=None):\n  config = configs.defaults()\n"
     "  del config['model_args']\n  return config\n",
     "the config lacks 1 of its 25 fields (model_args)"),
    ("from mnist_jax import configs\ndef get_config(arg=None):\n  config = configs.defaults()\n"
     "  config.lerning_rate = 0.1\n  return config\n", "unknown config field 'lerning_rate'"),
    ("def get_config(arg=None):\n  raise ValueError('first line\\nsecond line\\nthird line')\n",
     "the config file raised ValueError: first line (at "),
    ("def get_config(arg=None):\n  raise RuntimeError('\\n  indented first\\nsecond')\n",
     "the config file raised RuntimeError: indented first (at "),
    ("def get_config(arg=None):\n  return {}['input_pipeline']\n",
     "the config file raised KeyError: 'input_pipeline' (at "),
    ("import no_such_module_here\n",
     "the config file raised ModuleNotFoundError: No module named 'no_such_module_here' (at "),
    ("def get_config(arg=None)\n  return None\n", "the config file is not Python: expected ':'"),
    ("import sys\ndef get_config(arg=None):\n  sys.exit(3)\n",
     "the config file called sys.exit(3)"),
    ("import sys\nsys.exit(0)\n", "the config file called sys.exit(0)"),
    ("import sys\ndef get_config(arg=None):\n  sys.exit('bye')\n", "called sys.exit('bye')"),
])
def test_a_config_file_of_the_wrong_shape_is_one_line_and_a_nonzero_exit(tmp_path, source, message):
  path = tmp_path / "my_config.py"
  path.write_text(source)
  result = main_in_process(f"--config={path}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("mnist_jax: ") and message in lines[0], lines[0]
  assert "second" not in lines[0] and result.stdout == ""
  if "(at " in message:  # Where in the file it was raised.
    line = 1 if source.startswith("import no") else source.count("\n")  # The last line raises.
    assert lines[0].endswith(f"(at {path}:{line})")
  assert not os.path.exists(tmp_path / "run")
