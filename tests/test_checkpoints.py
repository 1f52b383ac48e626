"""Saving, retention, fallback from damaged checkpoints, config checks and the workdir lock."""

import gc
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, load_config, main_in_process
from mnist_jax import configs, data, metrics, pipelines, steps, train
from mnist_jax.run import checkpoints, guard, integrity, rundir
from mnist_jax.studies import predict

INFO = data.DatasetInfo("mnist", (28, 28, 1), 10, tuple("0123456789"))
META = {"steps_per_epoch": 100, "dataset": {"name": "mnist", "image_shape": [28, 28, 1],
                                            "num_classes": 10, "class_names": list("0123456789")}}


def _config(**changes):
  config = load_config("seed_mlp", "smoke")
  config.num_epochs = 10
  config.update(changes)
  return config


def _fresh_state(config):
  return steps.create_train_state(config, INFO, jax.random.PRNGKey(config.seed), 100)


def _training(workdir, config, **kwargs):
  """The checkpoints of a training run in `workdir`, wired as train.py wires them."""
  return checkpoints.TrainingCheckpoints(
      str(workdir), config, selection_metric=metrics.selection_metric(config),
      check_record=metrics.check_record,
      config_changes=lambda saved: configs.config_changes(saved, config), **kwargs)


def _restore(workdir, which="best"):
  """Restores as predict.load does, into a fresh state of the saved config."""
  return checkpoints.restore(str(workdir), lambda config, meta: _fresh_state(config), which,
                             check_record=metrics.check_record,
                             selection_metric=metrics.selection_metric)


def _save_epochs(workdir, config, accuracies):
  """Resumes `workdir` and saves one fake epoch per accuracy; returns the last state saved."""
  with _training(workdir, config) as ckpts:
    state, history = ckpts.resume(_fresh_state(config), META)
    for accuracy in accuracies:
      epoch = len(history) + 1
      state = state.replace(step=jnp.int32(100 * epoch),
                            params=jax.tree.map(lambda p: p + 1.0, state.params))
      history.append(_record(epoch, 100 * epoch, accuracy))
      ckpts.end_of_epoch(state, history)
  return state


def _record(epoch, step, accuracy):
  return {"epoch": epoch, "step": step, "test_loss": 1.0 - accuracy, "test_accuracy": accuracy}


def _steps(workdir):
  return sorted(int(name) for name in os.listdir(checkpoints.checkpoint_dir(str(workdir))))


def test_save_then_resume_restores_every_leaf_bitwise(tmp_path, mnist_train):
  config = _config()
  state = _fresh_state(config)
  batch = {"image": data.normalize(mnist_train.images_NHWC[:64].astype(np.float32), 0.0, 1.0),
           "label": mnist_train.labels_N[:64]}
  for _ in range(3):  # Adam's moments and count become non-trivial.
    state, _ = jax.jit(steps.train_step)(state, batch)
  history = [_record(1, 3, 0.5)]
  with _training(tmp_path, config) as ckpts:
    ckpts.resume(_fresh_state(config), META)
    ckpts.end_of_epoch(state, history)

  with _training(tmp_path, config) as ckpts:
    restored, restored_history = ckpts.resume(_fresh_state(config), META)
  assert restored_history == history
  assert int(restored.step) == 3
  leaves, treedef = jax.tree.flatten(checkpoints._as_pytree(state))
  restored_leaves, restored_treedef = jax.tree.flatten(checkpoints._as_pytree(restored))
  assert restored_treedef == treedef
  for leaf, restored_leaf in zip(leaves, restored_leaves):
    assert restored_leaf.dtype == leaf.dtype
    np.testing.assert_array_equal(restored_leaf, leaf)

  # The documented plain-orbax restore reads the same params, with no mnist_jax code.
  plain = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "3" / "state")
  jax.tree.map(np.testing.assert_array_equal, plain["params"], jax.device_get(state.params))

  model = predict.load(str(tmp_path), "latest")
  assert rundir.config_dict(model.config) == rundir.config_dict(config)
  assert model.meta["epoch"] == 1
  jax.tree.map(np.testing.assert_array_equal, model.state.params, state.params)


def test_retention_keeps_the_best_and_the_newest(tmp_path):
  config = _config(keep_checkpoints=2)
  _save_epochs(tmp_path, config, [0.5, 0.9, 0.6, 0.7, 0.65])
  assert _steps(tmp_path) == [200, 400, 500]  # Epoch 2 (the best), then the newest two.
  assert _restore(tmp_path, "best").meta["epoch"] == 2
  assert _restore(tmp_path, "latest").meta["epoch"] == 5
  assert _restore(tmp_path, "400").meta["epoch"] == 4
  with pytest.raises(checkpoints.CheckpointError, match=r"one of the steps \[200, 400, 500\]"):
    _restore(tmp_path, "300")


def test_what_killed_saves_left_is_gone_before_the_run_goes_on(tmp_path):
  config = _config()
  _save_epochs(tmp_path, config, [0.5])
  directory = checkpoints.checkpoint_dir(str(tmp_path))
  for name in ("200.orbax-checkpoint-tmp-1796139338", "300.orbax-checkpoint-tmp"):
    os.makedirs(os.path.join(directory, name, "state"))  # As a save killed midway leaves it.
  with _training(tmp_path, config):
    # Gone at once, not by a thread of orbax's own that would still be listing the directory
    # while the run loads its data.
    assert sorted(os.listdir(directory)) == ["100"]
  assert _restore(tmp_path, "latest").meta["epoch"] == 1


def test_checkpoint_every_n_epochs_and_at_the_end(tmp_path):
  config = _config(checkpoint_every_epochs=3, keep_checkpoints=10, num_epochs=7)
  _save_epochs(tmp_path, config, [0.1] * 7)
  assert _steps(tmp_path) == [300, 600, 700]


class _Clock:
  """Seconds that pass only when told to."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _epochs_every(seconds, clock, workdir, config, accuracies):
  """`_save_epochs`, each epoch taking `seconds` of `clock`; every state it leaves behind deleted,
  as the next epoch's step deletes the buffers it donates."""
  with _training(workdir, config, clock=clock) as ckpts:
    state, history = ckpts.resume(_fresh_state(config), META)
    for accuracy in accuracies:
      epoch = len(history) + 1
      clock.now += seconds
      new = state.replace(step=jnp.int32(100 * epoch),
                          params=jax.tree.map(lambda p: p + 1.0, state.params))
      jax.tree.map(lambda x: x.delete(), state.params)
      state = new
      history.append(_record(epoch, 100 * epoch, accuracy))
      ckpts.end_of_epoch(state, history)


def test_saves_wait_for_the_interval_and_keep_the_best_epoch_as_saving_each_would(tmp_path):
  config = _config(checkpoint_interval_s=10.0, keep_checkpoints=2, num_epochs=7)
  accuracies = [0.5, 0.9, 0.6, 0.7, 0.65, 0.8, 0.6]
  _epochs_every(4.0, _Clock(), tmp_path / "interval", config, accuracies)
  # Due at 12 s (epoch 3) and 24 s (epoch 6), and the last; epoch 2, the best, saved before 3.
  assert _steps(tmp_path / "interval") == [200, 600, 700]
  _save_epochs(tmp_path / "each", _config(keep_checkpoints=2, num_epochs=7), accuracies)
  assert _steps(tmp_path / "each") == [200, 600, 700]
  for which in ("best", "latest", "600"):
    saved, expected = _restore(tmp_path / "interval", which), _restore(tmp_path / "each", which)
    assert saved.meta["history"] == expected.meta["history"]
    for leaf, expected_leaf in zip(jax.tree.leaves(saved.state), jax.tree.leaves(expected.state)):
      np.testing.assert_array_equal(leaf, expected_leaf)


def test_a_run_without_checkpoints_opens_orbax_at_its_first_save(tmp_path):
  config = _config(checkpoint_interval_s=10.0, num_epochs=3)
  clock, directory = _Clock(), checkpoints.checkpoint_dir(str(tmp_path))
  with _training(tmp_path, config, clock=clock) as ckpts:
    state, history = ckpts.resume(_fresh_state(config), META)
    for epoch, seconds in [(1, 4.0), (2, 8.0)]:
      clock.now = seconds
      history.append(_record(epoch, 100 * epoch, 0.5))
      ckpts.end_of_epoch(state.replace(step=jnp.int32(100 * epoch)), history)
      assert not os.path.exists(directory), epoch  # Not due: orbax's manager not opened yet.
    clock.now = 12.0
    history.append(_record(3, 300, 0.5))
    ckpts.end_of_epoch(state.replace(step=jnp.int32(300)), history)
  assert _steps(tmp_path) == [100, 300]  # Epoch 1, the best, held back until the last.


def test_the_modules_that_train_import_no_orbax():
  # A run without checkpoints imports it while it trains (TrainingCheckpoints.resume).
  code = ("import sys, mnist_jax.main, mnist_jax.train, mnist_jax.report.training; "
          "print(sorted(m for m in sys.modules if m.startswith(('orbax', 'tensorstore'))))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          check=True)
  assert result.stdout.strip() == "[]"


def test_after_a_resume_only_an_epoch_better_than_the_saved_ones_is_held_back_for_saving(tmp_path):
  config = _config(checkpoint_interval_s=10.0, keep_checkpoints=10, num_epochs=6)
  clock = _Clock()
  _epochs_every(4.0, clock, tmp_path, config, [0.5, 0.4, 0.45])  # Epoch 1 saved before 3.
  assert _steps(tmp_path) == [100, 300]
  _epochs_every(4.0, clock, tmp_path, config, [0.48, 0.47, 0.46])  # None beats epoch 1.
  assert _steps(tmp_path) == [100, 300, 600]
  assert _restore(tmp_path, "best").meta["epoch"] == 1


def _damage(workdir, step):
  """Truncates every file of a checkpoint's state, as a disk that filled up would."""
  for root, _, files in os.walk(os.path.join(checkpoints.checkpoint_dir(str(workdir)), str(step))):
    for name in files:
      if "state" in root:
        os.truncate(os.path.join(root, name), 0)


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
  config = _config()
  _save_epochs(tmp_path, config, [0.1, 0.2, 0.3])
  _damage(tmp_path, 300)
  capsys.readouterr()
  with _training(tmp_path, config) as ckpts:
    state, history = ckpts.resume(_fresh_state(config), META)
  err = capsys.readouterr().err
  assert "checkpoint 300" in err and "cannot be restored" in err and "using checkpoint 200" in err
  assert int(state.step) == 200 and [r["epoch"] for r in history] == [1, 2]
  # The damaged step is kept aside, not deleted, and the run goes on past it.
  assert os.path.isdir(tmp_path / "checkpoints_unreadable" / "300")
  _save_epochs(tmp_path, config, [0.3])
  assert _steps(tmp_path) == [100, 200, 300]


def test_no_readable_checkpoint_is_an_error_that_touches_nothing(tmp_path):
  config = _config()
  _save_epochs(tmp_path, config, [0.1, 0.2])
  _damage(tmp_path, 100)
  _damage(tmp_path, 200)
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint in .* can be restored"):
    with _training(tmp_path, config) as ckpts:
      ckpts.resume(_fresh_state(config), META)
  assert _steps(tmp_path) == [100, 200]


def test_a_different_config_is_refused_with_the_changed_keys(tmp_path):
  _save_epochs(tmp_path, _config(), [0.1])
  changed = _config(learning_rate=0.01)
  changed.model_args.hidden_sizes = (64,)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"changed: learning_rate, model_args\.hidden_sizes\).*--allow_config"):
    with _training(tmp_path, changed) as ckpts:
      ckpts.resume(_fresh_state(changed), META)

  # More epochs under a constant learning rate continue the same run.
  longer = _config(num_epochs=20)
  assert _save_epochs(tmp_path, longer, [0.2]).step == 200

  # The explicit flag resumes under a new learning rate.
  faster = _config(learning_rate=0.01, num_epochs=20)
  with _training(tmp_path, faster, allow_config_change=True) as ckpts:
    _, history = ckpts.resume(_fresh_state(faster), META)
  assert len(history) == 2


def test_the_input_pipeline_may_change_on_resume():
  stream = _config(input_pipeline="stream")  # It trains the same bits as the device pipeline.
  assert configs.config_changes(rundir.config_dict(_config()), stream) == []


def test_fields_that_only_one_version_of_the_config_has_are_named_as_such():
  config = _config(learning_rate=0.01)
  saved = rundir.config_dict(_config())
  del saved["augment_shift"]  # As a checkpoint from before the field existed.
  saved["retired_field"] = 1
  assert configs.config_changes(saved, config) == [
      "augment_shift (not in the saved config)", "learning_rate",
      "retired_field (only in the saved config)"]


def test_num_epochs_counts_as_a_change_under_a_schedule_over_the_run(tmp_path):
  _save_epochs(tmp_path, _config(lr_schedule="cosine"), [0.1])
  longer = _config(lr_schedule="cosine", num_epochs=20)
  with pytest.raises(checkpoints.CheckpointError, match=r"changed: num_epochs\)"):
    with _training(tmp_path, longer) as ckpts:
      ckpts.resume(_fresh_state(longer), META)


def test_a_second_training_run_in_the_same_workdir_refuses(tmp_path):
  with _training(tmp_path, _config()):
    with pytest.raises(guard.WorkdirInUse, match="in use by a training run"):
      with _training(tmp_path, _config()):
        pass
    result = main_in_process("--config=experiments/seed_mlp.py:smoke", f"--workdir={tmp_path}")
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mnist_jax: "), result.stderr
  assert f"pid {os.getpid()} holds" in lines[0]
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_run_saved_by_version_0_1_0_evaluates_and_resumes(tmp_path):
  """`tests/data/run_0.1.0`: the checkpoints of 2 epochs of a 784-8-10 MLP (seed_mlp:smoke), saved
  by the code before its steps, pipelines and run files moved into modules of their own."""
  workdir = tmp_path / "run"
  shutil.copytree(os.path.join(REPO, "tests", "data", "run_0.1.0"), workdir)
  model = predict.load(str(workdir), "latest")
  assert (model.step, model.meta["epoch"], list(model.config.model_args.hidden_sizes)) == (936, 2, [8])
  saved = model.meta["history"][-1]
  test = pipelines.evaluate_test_split(model.config, model.state)
  # Other CPUs round differently: at most a few of the 10,000 examples may change sides.
  assert abs(float(test["accuracy"]) - saved["test_accuracy"]) <= 3e-4
  np.testing.assert_allclose(float(test["loss"]), saved["test_loss"], rtol=1e-3)

  config = configs.defaults()  # With the fields added since, as a config file starts.
  config.update(model.config.to_dict())
  config.num_epochs = 3
  _, final = train.train_and_evaluate(config, str(workdir))
  history = rundir.read_history(str(workdir), metrics.check_record)
  assert [record["epoch"] for record in history] == [1, 2, 3]
  assert history[:2] == model.meta["history"]
  assert final["step"] == 3 * 468 and final["test_accuracy"] > saved["test_accuracy"] - 0.01


def _array_files(workdir, step):
  """The files of a checkpoint's array data (orbax's OCDBT `d/` directories)."""
  state = os.path.join(checkpoints.checkpoint_dir(str(workdir)), str(step), "state")
  return sorted((os.path.join(root, name) for root, _, names in os.walk(state)
                 if os.path.basename(root) == "d" for name in names), key=os.path.getsize)


def _flip_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x01]))


# A damaged index node left to orbax's concurrent reads left failures behind, printed as the
# process went on or exited ("Task exception was never retrieved", "Event loop is closed").
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_flipped_bit_in_any_array_file_is_one_warning_and_a_fallback(tmp_path, capsys, caplog):
  config = _config()
  _save_epochs(tmp_path, config, [0.1, 0.9])
  for path in _array_files(tmp_path, 200):  # Every array file, at its middle byte.
    original = open(path, "rb").read()
    _flip_byte(path, len(original) // 2)
    try:
      model = _restore(tmp_path, "best")
      if model.step == 200:  # Orbax read the same values back: the byte held no array data.
        continue
    finally:
      open(path, "wb").write(original)
    err = capsys.readouterr().err
    assert model.step == 100 and "cannot be restored" in err
    assert len(err.splitlines()) == 1 and "bound method" not in err and "TensorStore(" not in err
  params = _restore(tmp_path, "best").state.params
  assert params["Dense_0"]["kernel"].shape == (784, 128)

  path = _array_files(tmp_path, 200)[-1]  # The largest: the first layer's kernel.
  _flip_byte(path, os.path.getsize(path) // 2)
  capsys.readouterr()
  with _training(tmp_path, config) as ckpts:
    state, history = ckpts.resume(_fresh_state(config), META)
  err = capsys.readouterr().err
  assert "checkpoint 200" in err and "differ from their saved digests: params/Dense_0/kernel" in err
  assert int(state.step) == 100 and len(history) == 1
  assert os.path.isdir(tmp_path / "checkpoints_unreadable" / "200")
  gc.collect()  # Where a failed read's task is freed and its error logged.
  assert not [record for record in caplog.records if record.name == "asyncio"], caplog.text


def _config_with(workdir, step, **changes):
  """The config item of a checkpoint with `changes`: still a config that passes every check."""
  path = workdir / "checkpoints" / str(step) / "config" / "metadata"
  return json.dumps({**json.loads(path.read_text()), **changes})


def _meta_with_accuracy(workdir, step, accuracy):
  """The meta item of a checkpoint with its last epoch's accuracy changed: still valid meta."""
  path = workdir / "checkpoints" / str(step) / "meta" / "metadata"
  meta = json.loads(path.read_text())
  meta["history"][-1]["test_accuracy"] = accuracy
  return json.dumps(meta)


@pytest.mark.parametrize("item, text", [
    ("meta/metadata", "{}"), ("meta/metadata", '{"epoch": 2}'), ("meta/metadata", "[1]"),
    # 0.9 -> 0.95 would rank the same checkpoint best, from a number never measured.
    ("meta/metadata", lambda workdir: _meta_with_accuracy(workdir, 200, 0.95)),
    ("config/metadata", '{"model": "mlp"}'), ("config/metadata", "{bad"),
    # A bit flipped in a number (1.0 -> 3.0) leaves a valid config: only its digest tells.
    ("config/metadata", lambda workdir: _config_with(workdir, 200, pixel_std=3.0)),
])
def test_a_damaged_meta_or_config_item_is_a_damaged_checkpoint(tmp_path, capsys, item, text):
  config = _config()
  _save_epochs(tmp_path, config, [0.1, 0.9])
  text = text(tmp_path) if callable(text) else text
  with open(tmp_path / "checkpoints" / "200" / item, "w") as f:
    f.write(text)
  capsys.readouterr()
  assert _restore(tmp_path, "best").step == 100  # Not the damaged best.
  assert "checkpoint 200" in capsys.readouterr().err
  with _training(tmp_path, config) as ckpts:
    state, _ = ckpts.resume(_fresh_state(config), META)
  assert int(state.step) == 100 and os.path.isdir(tmp_path / "checkpoints_unreadable" / "200")


@pytest.mark.parametrize("text", ["{bad", "{}", '{"selection": "high"}', ""])
def test_a_damaged_metrics_item_neither_misleads_eval_nor_stops_training(tmp_path, capsys, text):
  config = _config()
  _save_epochs(tmp_path, config, [0.1, 0.9, 0.5])
  with open(tmp_path / "checkpoints" / "200" / "metrics" / "metrics", "w") as f:
    f.write(text)
  # "best" is ranked by the checked meta item, so orbax's own copy of the metric does not count.
  assert _restore(tmp_path, "best").step == 200
  capsys.readouterr()
  _save_epochs(tmp_path, config, [0.6])  # Orbax's retention would trip on it: set aside first.
  assert "moved unreadable checkpoint 200" in capsys.readouterr().err
  assert _steps(tmp_path) == [100, 300, 400]


def _swap(workdir, step_a, step_b, item=None):
  """Swaps two step directories (or one item of theirs) by hand, as a user might."""
  root = workdir / "checkpoints"
  a, b = (root / str(step) / (item or "") for step in (step_a, step_b))
  os.rename(a, root / "swap")
  os.rename(b, a)
  os.rename(root / "swap", b)


@pytest.mark.parametrize("item", [None, "state", "meta"])
def test_a_step_directory_holding_another_step_is_damaged(tmp_path, capsys, item):
  config = _config()
  _save_epochs(tmp_path, config, [0.1, 0.5, 0.9])
  _swap(tmp_path, 200, 300, item)
  capsys.readouterr()
  assert _restore(tmp_path, "latest").step == 100
  err = capsys.readouterr().err
  assert "checkpoint 300" in err and "checkpoint 200" in err and "using checkpoint 100" in err
  if item is None:  # Its meta item names the step it belongs to.
    assert "(it holds step 200 (epoch 2), not step 300)" in err
  assert _restore(tmp_path, "best").step == 100  # Neither the contents of 300 (0.9) nor of 200.
  with pytest.raises(checkpoints.CheckpointError, match="checkpoint 200: "):
    _restore(tmp_path, "200")

  # A resume sets both aside, trains on from 100, and its saves of 200 and 300 are written.
  state = _save_epochs(tmp_path, config, [0.6, 0.7])
  assert sorted(os.listdir(tmp_path / "checkpoints_unreadable")) == ["200", "300"]
  assert _steps(tmp_path) == [100, 200, 300]
  restored = _restore(tmp_path, "latest")
  assert (restored.step, restored.meta["history"][-1]["test_accuracy"]) == (300, 0.7)
  jax.tree.map(np.testing.assert_array_equal, restored.state.params, state.params)


def test_older_checkpoints_of_other_steps_are_set_aside_on_resume(tmp_path, capsys):
  config = _config()
  _save_epochs(tmp_path, config, [0.1, 0.5, 0.9])
  _swap(tmp_path, 100, 200)
  capsys.readouterr()
  _save_epochs(tmp_path, config, [0.95])  # Resumes from 300, the newest, which is whole.
  err = capsys.readouterr().err
  assert "checkpoint 100 in" in err and "not step 100); setting it aside" in err
  assert sorted(os.listdir(tmp_path / "checkpoints_unreadable")) == ["100", "200"]
  assert _steps(tmp_path) == [300, 400]


def test_two_swapped_checkpoints_and_no_other_are_refused_touching_nothing(tmp_path):
  config = _config()
  _save_epochs(tmp_path, config, [0.1, 0.5])
  _swap(tmp_path, 100, 200)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"checkpoint 200: it holds step 100 \(epoch 1\), not step 200; "
                           r"checkpoint 100: it holds step 200"):
    _save_epochs(tmp_path, config, [0.6])
  assert _steps(tmp_path) == [100, 200] and not os.path.exists(tmp_path / "checkpoints_unreadable")


def test_a_save_that_cannot_be_written_is_an_error_not_a_silent_skip(tmp_path):
  config = _config()
  state = _save_epochs(tmp_path, config, [0.1, 0.5, 0.9])
  before = {name: sorted(os.listdir(tmp_path / "checkpoints" / name)) for name in ("200", "300")}
  with _training(tmp_path, config) as ckpts:
    for step in (200, 300):  # orbax's save returns False for a step not past its latest.
      with pytest.raises(checkpoints.CheckpointError,
                         match=f"checkpoint {step} cannot be written to .* already holds "
                               f"checkpoint 300"):
        ckpts.end_of_epoch(state.replace(step=jnp.int32(step)), [_record(2, step, 0.99)])
  assert {name: sorted(os.listdir(tmp_path / "checkpoints" / name)) for name in before} == before
  assert _restore(tmp_path, "best").meta["history"][-1]["test_accuracy"] == 0.9


# A restore into arrays of other shapes used to fail halfway through orbax's reads, whose
# coroutines then printed "Exception ignored in: <coroutine ...>" with a TensorStore spec each.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_foreign_checkpoint_with_allow_config_change_is_one_clean_line(tmp_path, capsys):
  config, other = _config(), _config()
  other.model_args.hidden_sizes = (16,)
  _save_epochs(tmp_path / "run", config, [0.1])
  _save_epochs(tmp_path / "other", other, [0.1, 0.2])
  shutil.copytree(tmp_path / "other" / "checkpoints" / "200",
                  tmp_path / "run" / "checkpoints" / "200")
  capsys.readouterr()
  with _training(tmp_path / "run", config, allow_config_change=True) as ckpts:
    state, history = ckpts.resume(_fresh_state(config), META)
  gc.collect()  # Where unfinished coroutines were freed and printed.
  err = capsys.readouterr().err.splitlines()
  assert int(state.step) == 100 and len(history) == 1
  assert err[0].endswith("cannot be restored (its arrays do not fit the state to restore: "
                         "params/Dense_0/bias is float32[16] there, float32[128] here); "
                         "using checkpoint 100"), err
  assert len(err) == 2 and err[1].startswith("mnist_jax: warning: moved unreadable checkpoint 200")

  other_only = tmp_path / "other_only"  # No checkpoint fits: one line, nothing touched.
  shutil.copytree(tmp_path / "other", other_only)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"checkpoint 200: its arrays do not fit .*; checkpoint 100: its arrays"):
    with _training(other_only, config, allow_config_change=True) as ckpts:
      ckpts.resume(_fresh_state(config), META)
  gc.collect()
  assert _steps(other_only) == [100, 200] and not capsys.readouterr().err


def test_a_library_error_is_described_in_one_line_cut_at_a_word():
  read = ValueError('FAILED_PRECONDITION: Error reading "params.Dense_0.kernel/0.0" in OCDBT '
                    'database at local file "/w/checkpoints/2/state/": ZSTD_decompressStream() '
                    'failed: Unknown frame descriptor; at byte 0 [source locations=\'a.cc:1\']')
  try:  # As orbax wraps it.
    raise Exception("Encountered error while reading array index: (). See full TensorStore "
                    "details: <bound method spec of TensorStore({\n  'base': {\n})>.") from read
  except Exception as e:  # pylint: disable=broad-except
    wrapped = e
  assert integrity.describe(wrapped) == (
      "array params/Dense_0/kernel cannot be read (ZSTD_decompressStream() failed: Unknown frame "
      "descriptor; at byte 0)")
  words = " ".join(f"word{i}" for i in range(100))
  described = integrity.describe(ValueError(words + "\nsecond line"))
  assert described.startswith("ValueError: word0 word1 ") and described.endswith(" ...")
  kept = described[len("ValueError: "):-len(" ...")]
  assert len(described) <= 220 and words.startswith(kept + " ")  # Whole words only.
