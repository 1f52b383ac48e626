"""On a real one-node SLURM (slurm_cluster.py): `srun` training, array sweeps, requeued runs.

A tier of its own, as it installs system packages: run with `MNIST_JAX_SLURM_TESTS=1 python -m
pytest -q tests/test_slurm.py` (as .ci/run does), which installs Debian's slurm and munge with apt
where it runs as root and fails where SLURM can be neither found nor installed; skipped otherwise.
"""

import csv
import json
import os
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from mnist_jax.studies import predict
from mnist_jax.tools import sweep, sweep_tables
from slurm_cluster import SlurmCluster, install_reason
from test_parallel import PARALLEL_BATCH, _free_port, _smoke_flags, _wait_for_all, _worker

pytestmark = pytest.mark.slow
MAIN = [sys.executable, "-m", "mnist_jax.main"]
TWO_DEVICES = "--xla_force_host_platform_device_count=2"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
  if not os.environ.get("MNIST_JAX_SLURM_TESTS"):  # Set by .ci/run.
    pytest.skip("a one-node SLURM, installed with apt as root: set MNIST_JAX_SLURM_TESTS=1")
  reason = install_reason()
  if reason:
    pytest.fail(reason)
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
  with open(workdir / sweep_tables.SUMMARY_CSV, newline="") as f:
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


def test_a_requeued_job_started_at_once_runs_again(slurm, tmp_path):
  output = tmp_path / "job.out"
  job = slurm.sbatch("--requeue", "--open-mode=append", f"--output={output}", "--wrap",
                     "echo started; exec sleep 300")

  def wait_until_started(times):
    slurm.wait_for(lambda: _job_output(output).count("started") == times or slurm.job_states(
        job).get(job) not in ("PENDING", "CONFIGURING", "RUNNING"), 60, f"job {job} to start")
    assert _job_output(output).count("started") == times, (slurm.job_states(job),
                                                           _job_output(output))

  try:
    for times in (1, 2):
      wait_until_started(times)
      # Past the two seconds slurmctld leaves between scheduling passes, so that `start_now`
      # starts the job at once, and early in a second, so that the job is pending again within
      # the second it was requeued in: where `start_now` did not wait for the next, it failed.
      time.sleep(2)
      while time.time() % 1 > 0.1:
        time.sleep(0.01)
      assert slurm.run("scontrol", "requeue", job).returncode == 0
      slurm.wait_for(lambda: slurm.job_states(job).get(job) == "PENDING", 60, f"job {job} requeued")
      slurm.start_now(job)
    wait_until_started(3)
  finally:
    slurm.run("scancel", job)


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_run_requeued_in_the_middle_resumes_to_the_same_bits(slurm, tmp_path, tasks):
  num_epochs = 4
  command = [*MAIN, f"--config={os.path.join(REPO, 'experiments', 'seed_mlp.py')}:smoke",
             f"--config.num_epochs={num_epochs}", f"--config.batch_size={PARALLEL_BATCH}"]
  if tasks > 1:  # srun starts the processes; jax.distributed finds them through SLURM.
    command = ["srun", *command, "--multihost"]

  def submit(name, *options):
    return slurm.sbatch(f"--ntasks={tasks}", f"--chdir={REPO}", f"--output={tmp_path / name}.out",
                        *options, "--wrap", " ".join(["exec", *command,
                                                       f"--workdir={tmp_path / name}"]))

  reference = submit("uninterrupted")
  job = submit("requeued", "--requeue", "--open-mode=append")
  output = tmp_path / "requeued.out"
  metrics = tmp_path / "requeued" / "metrics.jsonl"
  slurm.wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 300,
                 f"the first epoch of job {job}: {_job_output(output)}")
  result = slurm.run("scontrol", "requeue", job)
  assert result.returncode == 0, result.stderr
  slurm.wait_for(lambda: slurm.job_states(job).get(job) == "PENDING", 120,
                 f"job {job} to be requeued: {_job_output(output)}")
  slurm.start_now(job)
  for name, job_id in (("uninterrupted", reference), ("requeued", job)):
    states = slurm.wait(job_id, timeout_s=400)
    assert states == {job_id: "COMPLETED"}, (
        f"{states}\n{_job_output(tmp_path / f'{name}.out')}\n"
        f"{slurm.run('scontrol', 'show', 'job', job_id).stdout}\n{slurm.logs()}")
  log = _job_output(output)
  stops = [int(line.split(" after epoch ")[1].split(";")[0]) for line in log.splitlines()
           if line.startswith("mnist_jax: stopped by SIGTERM after epoch ")]
  assert len(stops) == tasks and len(set(stops)) == 1, log  # Every process after the same epoch.
  assert 1 <= stops[0] < num_epochs and log.count("resuming from checkpoint") == 1, log
  assert "Gloo" not in log and log.count(f"epoch {num_epochs}/{num_epochs} ") == 1, log

  runs = {name: tmp_path / name for name in ("uninterrupted", "requeued")}
  params = {name: predict.load(str(path), "latest").state.params for name, path in runs.items()}
  for (path, leaf), other in zip(jax.tree_util.tree_leaves_with_path(params["requeued"]),
                                 jax.tree.leaves(params["uninterrupted"])):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other), err_msg=str(path))
  timeless = lambda record: {key: value for key, value in record.items()
                             if not key.endswith(("time_s", "times_s", "_per_s"))}
  finals, histories = {}, {}
  for name, path in runs.items():
    finals[name] = timeless(json.loads((path / "final_metrics.json").read_text()))
    histories[name] = [timeless(json.loads(line))
                       for line in (path / "metrics.jsonl").read_text().splitlines()]
  assert finals["requeued"] == finals["uninterrupted"]
  assert histories["requeued"] == histories["uninterrupted"] and len(histories["requeued"]) == 4
