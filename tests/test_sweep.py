"""Sweeps: every point trained into its own directory, a ranked summary, finished seeds skipped."""

import csv
import functools
import json
import os

import pytest

from conftest import REPO, load_config, main_in_process
from mnist_jax import data, train
from mnist_jax.report import training
from mnist_jax.run import rundir
from mnist_jax.tools import shares, sweep, sweep_tables

SMOKE = os.path.join(REPO, "experiments", "lr_batch_sweep.py")


def _files_of_a_report(config, workdir, state):
  """What `training.after_training` writes, without drawing it."""
  del config, state
  for name in (rundir.PREDICTIONS, rundir.REPORT):
    rundir.write_text(os.path.join(workdir, name), "")


@pytest.fixture
def fast_runs(monkeypatch):
  """Each split loaded once, and no figures: the sweep is under test, not loading or plotting."""
  monkeypatch.setattr(data, "load_split", functools.cache(data.load_split))
  monkeypatch.setattr(training, "after_training", _files_of_a_report)


def _csv_rows(workdir):
  with open(workdir / "sweep_summary.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_smoke_sweep_writes_a_ranked_summary_and_skips_finished_seeds(
    tmp_path, monkeypatch, fast_runs
):
  del fast_runs
  config = load_config("lr_batch_sweep", "smoke")
  points = sweep.load_sweep(f"{SMOKE}:smoke")
  assert len(points) == 8  # 2 learning rates x 2 batch sizes x 2 seeds.
  points = [point for point in points if point["batch_size"] == 512]  # Half, for time.
  rows = sweep.run_sweep(config, str(tmp_path), points)

  table = _csv_rows(tmp_path)
  assert len(table) == 2 and [row["point"] for row in table] == [row["point"] for row in rows]
  accuracies = [float(row["val_accuracy_mean"]) for row in table]  # validation_fraction 0.1.
  assert accuracies == sorted(accuracies, reverse=True)
  for row in table:
    finals = [json.loads((tmp_path / row["point"] / f"seed_{seed}" / "final_metrics.json")
                         .read_text()) for seed in (0, 1)]
    for name in ("val_accuracy", "test_accuracy"):
      first, second = (final[name] for final in finals)
      assert float(row[f"{name}_mean"]) == pytest.approx((first + second) / 2)
      assert float(row[f"{name}_std"]) == pytest.approx(abs(first - second) / 2 ** 0.5)
    config_json = json.loads((tmp_path / row["point"] / "seed_1" / "config.json").read_text())
    assert (config_json["learning_rate"], config_json["batch_size"], config_json["seed"]) == (
        float(row["learning_rate"]), int(row["batch_size"]), 1)
  assert any(float(row["test_accuracy_std"]) > 0 for row in table)  # Seeds train different models.
  markdown = (tmp_path / "sweep_summary.md").read_text()
  lines = [line for line in markdown.splitlines() if line.startswith("| ")]
  assert len(lines) == 1 + 2  # The header and one row per point.
  assert lines[1].startswith(f"| 1 | {table[0]['learning_rate']} | {table[0]['batch_size']} | ")

  # Again: nothing trains; one seed's results removed: only that seed trains again.
  trained = []
  real_train = train.train_and_evaluate

  def counting_train(config, workdir, **kwargs):
    trained.append(workdir)
    return real_train(config, workdir, **kwargs)

  monkeypatch.setattr(train, "train_and_evaluate", counting_train)
  summary = (tmp_path / "sweep_summary.csv").read_text()
  sweep.run_sweep(config, str(tmp_path), points)
  assert trained == [] and (tmp_path / "sweep_summary.csv").read_text() == summary
  last = tmp_path / table[-1]["point"] / "seed_0"
  (last / "final_metrics.json").unlink()
  sweep.run_sweep(config, str(tmp_path), points)
  assert trained == [str(last)]
  assert (tmp_path / "sweep_summary.csv").read_text() == summary  # Resumed from its checkpoint.
  # Final metrics older than the config are those of an earlier run (e.g. one with fewer epochs).
  first = tmp_path / table[0]["point"] / "seed_1"
  final_time = os.path.getmtime(first / "final_metrics.json")
  os.utime(first / "config.json", (final_time + 60, final_time + 60))
  sweep.run_sweep(config, str(tmp_path), points)
  assert trained == [str(last), str(first)]


def test_points_group_seeds_and_get_safe_distinct_names():
  points = sweep.group_points(
      [{"learning_rate": 0.1, "seed": 0}, {"learning_rate": 0.1, "seed": 3},
       {"model_args.hidden_sizes": (256, 256)}], default_seed=7)
  assert [(p.name, p.seeds) for p in points] == [
      ("learning_rate=0.1", (0, 3)), ("model_args.hidden_sizes=_256_256_", (7,))]
  with pytest.raises(sweep.SweepError, match="seed 0 twice"):
    sweep.group_points([{"seed": 0}, {"seed": 0}], default_seed=0)
  with pytest.raises(sweep.SweepError, match="share the directory name"):
    sweep.group_points([{"dataset": "a b"}, {"dataset": "a/b"}], default_seed=0)


@pytest.mark.slow
def test_vmapped_seeds_count_one_by_one_and_validation_accuracy_ranks(tmp_path, fast_runs):
  del fast_runs
  config = load_config("lr_batch_sweep", "smoke")
  config.num_seeds, config.validation_fraction = 2, 0.1
  rows = sweep.run_sweep(config, str(tmp_path), [{"learning_rate": lr} for lr in (1e-3, 3e-3)])

  assert [row["seeds"] for row in rows] == [2, 2]
  assert rows[0]["val_accuracy_mean"] >= rows[1]["val_accuracy_mean"]
  for row in rows:
    final = json.loads((tmp_path / row["point"] / "seed_0" / "final_metrics.json").read_text())
    values = final["val_accuracy_per_seed"]
    assert len(values) == 2 and values[0] != values[1]
    assert row["val_accuracy_mean"] == pytest.approx(sum(values) / 2)
    assert row["val_accuracy_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
  header = _csv_rows(tmp_path)[0].keys()
  assert list(header)[3:5] == ["val_accuracy_mean", "val_accuracy_std"]
  assert "reads the test set" not in (tmp_path / "sweep_summary.md").read_text()


_BAD_SWEEP = f"""
from mnist_jax import configs
get_config = configs.load_module({os.path.join(REPO, "experiments", "seed_mlp.py")!r}).get_config
def get_sweep(arg=None):
  return [{{"learning_rate": 0.1}}, {{%s}}]
"""


@pytest.mark.parametrize(
    "point, message",
    [
        ('"lerning_rate": 0.1', "the sweep sets unknown config field 'lerning_rate'"),
        ('"model_args.widths": (3,)', "unknown config field 'model_args.widths'"),
        ('"batch_size": "many"', "the sweep sets config.batch_size to 'many'"),
        ('"batch_size": 0', "sweep point batch_size=0,seed=0: config.batch_size must be a whole number in [1, 1,048,576], got 0"),
    ],
)
def test_a_bad_sweep_is_one_clear_line_before_anything_trains(tmp_path, point, message):
  experiment = tmp_path / "bad_sweep.py"
  experiment.write_text(_BAD_SWEEP % point)
  result = main_in_process("--mode=sweep", f"--config={experiment}",
                           f"--workdir={tmp_path / 'run'}")
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("mnist_jax: ") and message in lines[0], lines[0]
  assert not (tmp_path / "run" / "learning_rate=0.1").exists()


def test_a_config_file_without_get_sweep_is_refused(tmp_path):
  config_file = os.path.join(REPO, "experiments", "seed_mlp.py")
  result = main_in_process("--mode=sweep", f"--config={config_file}",
                           f"--workdir={tmp_path / 'unused'}")
  assert result.returncode != 0
  assert result.stderr.strip() == (
      f"mnist_jax: {config_file} defines no get_sweep(arg=None), which --mode=sweep needs")
  assert not (tmp_path / "unused").exists()


def test_shares_of_a_sweep_come_from_the_flag_or_a_slurm_array():
  assert shares.parse_share("1/4") == shares.Share(1, 4)
  assert shares.array_share(None, None, None, None, None) == shares.Share(0, 1)
  assert shares.array_share("3", "4", "0", "3", None) == shares.Share(3, 4)
  assert shares.array_share("5", "8", "1", "8", None) == shares.Share(4, 8)  # --array=1-8%2.
  assert shares.array_share("6", "4", "0", "6", "2") == shares.Share(3, 4)  # --array=0-6:2.
  for text in ("4/4", "1", "a/2", "-1/2", "", "1/0"):
    with pytest.raises(shares.ShareError, match=r"is not i/n with 0 <= i < n"):
      shares.parse_share(text)
  with pytest.raises(shares.ShareError, match="do not form a range; submit with sbatch --array"):
    shares.array_share("5", "3", "1", "7", None)  # --array=1,5,7.
  with pytest.raises(shares.ShareError, match="SLURM_ARRAY_TASK_COUNT, _MIN or _MAX is missing"):
    shares.array_share("0", None, None, None, None)


@pytest.mark.parametrize("flags, message", [
    (["--mode=sweep", "--sweep_shard=2/2"],
     "--sweep_shard=2/2 is not i/n with 0 <= i < n, e.g. --sweep_shard=0/4"),
    (["--sweep_shard=0/2"], "--sweep_shard is for --mode=sweep, not --mode=train"),
])
def test_a_bad_share_is_one_line_before_anything_trains(tmp_path, flags, message):
  result = main_in_process(*flags, f"--config={SMOKE}:smoke", f"--workdir={tmp_path / 'run'}")
  assert result.returncode != 0
  assert result.stderr.strip() == f"mnist_jax: {message}", result.stderr
  assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


@pytest.mark.slow
def test_shares_train_every_run_once_and_a_seed_is_finished_only_with_everything_it_writes(
    tmp_path, monkeypatch, capsys, fast_runs
):
  del fast_runs
  config = load_config("lr_batch_sweep", "smoke")
  config.batch_size = 512
  points = [{"learning_rate": lr, "seed": seed} for lr in (1e-3, 3e-3) for seed in (0, 1)]
  trained = []
  real_train = train.train_and_evaluate

  def counting_train(config, workdir, **kwargs):
    trained.append(os.path.relpath(workdir, tmp_path))
    return real_train(config, workdir, **kwargs)

  monkeypatch.setattr(train, "train_and_evaluate", counting_train)
  rows = sweep.run_sweep(config, str(tmp_path), points, share=shares.Share(1, 2))
  assert trained == ["learning_rate=0.001/seed_1", "learning_rate=0.003/seed_1"]
  assert rows == []  # No point has all its seeds yet.
  assert "0 of 2 points finished" in (tmp_path / "sweep_summary.md").read_text()
  rows = sweep.run_sweep(config, str(tmp_path), points, share=shares.Share(0, 2))
  runs = sweep.sweep_runs(config, sweep.group_points(points, config.seed))
  assert sorted(trained) == sorted(run.name for run in runs)  # Each run once.
  summary = (tmp_path / "sweep_summary.csv").read_text()
  assert len(rows) == 2 and len(_csv_rows(tmp_path)) == 2
  assert sweep.run_sweep(config, str(tmp_path), points) == rows and len(trained) == 4
  assert (tmp_path / "sweep_summary.csv").read_text() == summary
  capsys.readouterr()

  # A seed killed while it drew its report, one whose report is of an earlier run, and one whose
  # final metrics were cut short: each is trained again (a resume: no epoch trains), not counted.
  run_dirs = [tmp_path / name for name in trained]
  (run_dirs[0] / "report.md").unlink()
  old = os.path.getmtime(run_dirs[1] / "final_metrics.json") - 60
  os.utime(run_dirs[1] / "predictions.npz", (old, old))
  final = run_dirs[2] / "final_metrics.json"
  final.write_text(final.read_text()[:40])
  assert sweep.run_sweep(config, str(tmp_path), points) == rows
  assert trained[4:] == [os.path.relpath(d, tmp_path) for d in sorted(run_dirs[:3])]
  out = capsys.readouterr().out
  damaged = [line for line in out.splitlines() if "is damaged" in line]
  assert len(damaged) == 1 and damaged[0].endswith("training it again, from its checkpoints")
  assert "epoch 1/1" not in out and out.count("resuming from checkpoint") == 3
  assert (tmp_path / "sweep_summary.csv").read_text() == summary
  runs = sweep.sweep_runs(config, sweep.group_points(points, config.seed))
  assert all(sweep.unfinished(str(tmp_path / run.name), run.config) is None for run in runs)

  # Another share's damaged run is named, with the share that trains it again.
  final.write_text("{")
  rows = sweep.run_sweep(config, str(tmp_path), points, share=shares.Share(1, 2))
  share = next(i % 2 for i, run in enumerate(runs) if tmp_path / run.name == run_dirs[2])
  assert share == 0 and len(rows) == 1
  lines = [line for line in capsys.readouterr().out.splitlines() if "is damaged" in line]
  assert lines == [f"sweep: {final} is damaged (not JSON: Expecting property name enclosed in "
                   "double quotes: line 1 column 2 (char 1)); run share 0/2 of this sweep again "
                   "(--sweep_shard, or its array task) to train it again"]


def _finish(workdir, run, accuracy):
  """A finished run's files, as training and its report leave them, without training."""
  run_dir = os.path.join(workdir, run.name)
  os.makedirs(run_dir, exist_ok=True)
  rundir.write_config(run_dir, run.config)
  rundir.write_final(run_dir, {"epoch": 1, "step": 1, "val_loss": 1.0, "val_accuracy": accuracy,
                               "test_loss": 1.0, "test_accuracy": accuracy, "train_time_s": 1.0})
  _files_of_a_report(run.config, run_dir, None)


def test_the_last_summary_holds_every_run_finished_while_another_task_wrote_it(
    tmp_path, monkeypatch
):
  config = load_config("lr_batch_sweep", "smoke")
  points = sweep.group_points([{"learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2)], config.seed)
  runs = sweep.sweep_runs(config, points)
  for run, accuracy in zip(runs[:2], (0.5, 0.75)):
    _finish(tmp_path, run, accuracy)
  real_write = rundir.write_text

  def write_while_another_finishes(path, text):  # Another task finishes between read and write.
    if not os.path.exists(tmp_path / runs[2].name):
      _finish(tmp_path, runs[2], 0.25)
    real_write(path, text)

  monkeypatch.setattr(rundir, "write_text", write_while_another_finishes)
  rows = sweep.write_summary(str(tmp_path), points, runs, "val_accuracy", "title")
  assert [row["val_accuracy_mean"] for row in rows] == [0.75, 0.5, 0.25]
  assert [row["point"] for row in _csv_rows(tmp_path)] == [row["point"] for row in rows]
  assert "3 of 3 points finished" in (tmp_path / "sweep_summary.md").read_text()
  assert sorted(os.listdir(tmp_path)) == sorted(  # No temporary files left.
      [sweep_tables.SUMMARY_CSV, sweep_tables.SUMMARY_MD, *(run.point.name for run in runs)])
