"""On a real one-node SLURM (slurm_cluster.py): `srun` training, array sweeps, requeued runs.

Skipped, with the reason, where SLURM is neither installed nor installable (not root, no apt).
"""

import csv
import json
import os
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from mnist_jax import train
from mnist_jax.studies import predict
from mnist_jax.tools import sweep
from slurm_cluster import SlurmCluster, install_reason
from test_parallel import PARALLEL_BATCH, _by_device, _free_port, _smoke_flags, _wait_for_all, _worker

pytestmark = pytest.mark.slow
MAIN = [sys.executable, "-m", "mnist_jax.main"]
TWO_DEVICES = "--xla_force_host_platform_device_count=2"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
  reason = install_reason()
  if reason:
    pytest.skip(reason)
  cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
  cluster.start()
  try:
    yield cluster
  finally:
    cluster.stop()


def _job_output(path):
  return path.read_text() if path.exists() else "(no output)"


def test_srun_with_two_tasks_trains_as_two_processes_do(slurm, tmp_path):
  flags = _smoke_flags(tmp_path / "srun", 1, f"--config.batch_size={PARALLEL_BATCH}", "--multihost")
  result = slurm.run("srun", "--ntasks=2", f"--chdir={REPO}", "--kill-on-bad-exit=1",
                     sys.executable, os.path.join("tests", "parallel_worker.py"),
                     str(tmp_path / "srun_params"), *flags, timeout=300, XLA_FLAGS=TWO_DEVICES)
  assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{slurm.logs()}"
  lines = result.stdout.splitlines()
  assert [line for line in lines if not line.startswith("joining ")][:1] == [
      line for line in lines if line.startswith("epoch ")]  # No library chatter before it.
  assert sum(line.startswith("epoch ") for line in lines) == 1, result.stdout
  assert not any("Gloo" in line for line in lines + result.stderr.splitlines()), result.stdout

  # The same two processes started by hand, with the coordinator flags that srun makes needless.
  local = _smoke_flags(tmp_path / "local", 1, f"--config.batch_size={PARALLEL_BATCH}",
                       "--multihost", f"--coordinator_address=localhost:{_free_port()}",
                       "--num_processes=2")
  workers = []
  try:
    for process_id in range(2):
      workers.append(_worker(tmp_path / "local_params", [*local, f"--process_id={process_id}"],
                             TWO_DEVICES, tmp_path / f"log{process_id}"))
    _wait_for_all(workers, timeout=200)
  finally:
    for worker in workers:
      worker.kill()
      worker.wait()
  assert [worker.returncode for worker in workers] == [0, 0], (tmp_path / "log0").read_text()
  for process in range(2):
    under_srun = np.load(tmp_path / "srun_params" / f"process{process}.npz")
    by_hand = np.load(tmp_path / "local_params" / f"process{process}.npz")
    assert sorted(under_srun.files) == sorted(by_hand.files) and len(under_srun.files) > 0
    for key in under_srun.files:
      np.testing.assert_array_equal(under_srun[key], by_hand[key], err_msg=key)
  finals = [json.loads((tmp_path / name / "final_metrics.json").read_text())
            for name in ("srun", "local")]
  for name in ("train_loss", "test_loss", "test_accuracy"):
    assert finals[0][name] == finals[1][name], name


def _accuracy_rows(workdir):
  """The summary's rows without the run times, which differ from run to run."""
  with open(workdir / sweep.SUMMARY_CSV, newline="") as f:
    return [{key: value for key, value in row.items() if not key.startswith("train_time_s")}
            for row in csv.DictReader(f)]


def test_an_array_sweep_trains_each_run_once_and_sums_up_as_one_process(slurm, tmp_path):
  config = os.path.join(REPO, "experiments", "lr_batch_sweep.py") + ":smoke"
  command = [*MAIN, "--mode=sweep", f"--config={config}"]
  one = slurm.sbatch(f"--chdir={REPO}", f"--output={tmp_path / 'one.out'}", "--wrap",
                     " ".join(["exec", *command, f"--workdir={tmp_path / 'one'}"]))
  array = slurm.sbatch("--array=0-1", f"--chdir={REPO}", f"--output={tmp_path / 'array_%a.out'}",
                       "--wrap", " ".join(["exec", *command, f"--workdir={tmp_path / 'array'}"]))
  for job in (one, array):
    states = slurm.wait(job, timeout_s=900)
    outputs = "\n".join(_job_output(path) for path in sorted(tmp_path.glob("*.out")))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{outputs}"

  runs = sweep.sweep_runs(load_config("lr_batch_sweep", "smoke"),
                          sweep.group_points(sweep.load_sweep(config), 0))
  assert len(runs) == 8
  trained = []
  for task in range(2):
    output = (tmp_path / f"array_{task}.out").read_text()
    assert f"sweep: share {task}/2: 4 of the 8 runs" in output, output
    trained += [line.rsplit(" -> ", 1)[1] for line in output.splitlines() if " -> " in line]
  assert sorted(trained) == sorted(str(tmp_path / "array" / run.name) for run in runs)
  assert _accuracy_rows(tmp_path / "array") == _accuracy_rows(tmp_path / "one")
  assert len(_accuracy_rows(tmp_path / "one")) == 4
  for run in runs:
    assert sweep.unfinished(str(tmp_path / "array" / run.name), run.config) is None


def test_a_run_requeued_in_the_middle_resumes_to_the_same_bits(slurm, tmp_path):
  config = load_config("seed_mlp", "smoke")
  config.num_epochs = 4
  flags = [f"--config={os.path.join(REPO, 'experiments', 'seed_mlp.py')}:smoke",
           f"--config.num_epochs={config.num_epochs}"]
  output = tmp_path / "job.out"
  job = slurm.sbatch("--requeue", "--open-mode=append", f"--chdir={REPO}", f"--output={output}",
                     "--wrap", " ".join(["exec", *MAIN, *flags, f"--workdir={tmp_path / 'run'}"]))
  metrics = tmp_path / "run" / "metrics.jsonl"
  slurm.wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 300,
                 f"the first epoch of job {job}: {_job_output(output)}")
  result = slurm.run("scontrol", "requeue", job)
  assert result.returncode == 0, result.stderr
  # SLURM holds a requeued job back for two minutes; start it as soon as it can run.
  slurm.wait_for(lambda: slurm.job_states(job).get(job) == "PENDING", 120,
                 f"job {job} to be requeued: {_job_output(output)}")
  assert slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0
  states = slurm.wait(job, timeout_s=300)
  log = _job_output(output)
  assert states == {job: "COMPLETED"}, f"{states}\n{log}"
  assert "stopped by SIGTERM after epoch" in log and "resuming from checkpoint" in log, log
  stopped_after = int(log.split("stopped by SIGTERM after epoch ")[1].split(";")[0])
  assert 1 <= stopped_after < config.num_epochs, log

  state, final = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
  requeued = predict.load(str(tmp_path / "run"), "latest").state
  for (path, leaf), other in zip(jax.tree_util.tree_leaves_with_path(requeued.params),
                                 jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other), err_msg=str(path))
  timeless = lambda record: {key: value for key, value in record.items()
                             if not key.endswith(("time_s", "times_s", "_per_s"))}
  assert timeless(json.loads((tmp_path / "run" / "final_metrics.json").read_text())) == timeless(
      final)
  history = [timeless(json.loads(line)) for line in metrics.read_text().splitlines()]
  reference = (tmp_path / "uninterrupted" / "metrics.jsonl").read_text().splitlines()
  assert history == [timeless(json.loads(line)) for line in reference]

