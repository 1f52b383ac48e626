"""Data parallel training: 8 CPU devices and 2 processes on localhost against one device."""

import functools
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, main_in_process, run_main
from mnist_jax import data, steps, train
from mnist_jax.run import parallel
from mnist_jax.studies import predict
from parallel_worker import local_params

EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


# The batch size of the runs compared across device and process counts: 60 steps an epoch
# exercise the collectives as well as the smoke config's 468 do.
PARALLEL_BATCH = 1000


def _smoke_flags(workdir, num_epochs, *flags):
  return ["--config=experiments/seed_mlp.py:smoke", f"--config.num_epochs={num_epochs}", *flags,
          f"--workdir={workdir}"]


def _one_device_params(tmp_path, num_epochs):
  """The smoke config at `PARALLEL_BATCH` trained here, in this single-device process."""
  config = load_config("seed_mlp", "smoke")
  config.num_epochs, config.batch_size = num_epochs, PARALLEL_BATCH
  state, _ = train.train_and_evaluate(config, str(tmp_path / "one_device"))
  (params,) = _by_device(local_params(state)).values()
  return params


def _by_device(arrays):
  """`device<id>/<path>` -> {device id: {path: array}}."""
  devices = {}
  for key, array in arrays.items():
    device, path = key.split("/", 1)
    devices.setdefault(device, {})[path] = array
  return devices


def _assert_close(params, reference):
  """Equal up to float summation order. After 936 Adam steps of about 1e-3 (two epochs at batch
  128), the weights of one hidden unit have been seen to drift by up to 1.1e-4 between eight
  devices and one; the runs compared here take at most 120."""
  assert params.keys() == reference.keys()
  for path, array in params.items():
    np.testing.assert_allclose(array, reference[path], rtol=1e-4, atol=3e-4, err_msg=path)


def _worker(params_dir, flags, xla_flags, log_path, **env_vars):
  env = {**os.environ, "XLA_FLAGS": xla_flags, **env_vars}
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, os.path.join("tests", "parallel_worker.py"), str(params_dir), *flags],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_all(workers, timeout):
  """Waits until every worker has exited, one has failed, or `timeout` seconds have passed."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    codes = [worker.poll() for worker in workers]
    if None not in codes or any(code not in (None, 0) for code in codes):
      return
    time.sleep(0.2)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_eight_devices_train_like_one(tmp_path):
  flags = _smoke_flags(tmp_path / "run", 2, f"--config.batch_size={PARALLEL_BATCH}")
  worker = _worker(tmp_path / "params", flags, EIGHT_DEVICES, tmp_path / "log")
  try:
    worker.wait(timeout=300)
  finally:
    worker.kill()
  assert worker.returncode == 0, (tmp_path / "log").read_text()
  devices = _by_device(np.load(tmp_path / "params" / "process0.npz"))
  assert len(devices) == 8
  reference = _one_device_params(tmp_path, 2)
  for params in devices.values():
    _assert_close(params, reference)
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [60, 120]

  # A run evaluates on as many devices as the machine has, whatever number trained it: the eight
  # devices' run on this process's one, the one device's run on eight.
  evaluated = {"run": main_in_process("--mode=eval", f"--workdir={tmp_path / 'run'}",
                                      "--checkpoint=latest")}
  evaluated["one_device"] = subprocess.run(
      [sys.executable, "-m", "mnist_jax.main", "--mode=eval", "--checkpoint=latest",
       f"--workdir={tmp_path / 'one_device'}"],
      env={**os.environ, "XLA_FLAGS": EIGHT_DEVICES}, capture_output=True, text=True, check=False)
  for name, result in evaluated.items():
    assert result.returncode == 0, result.stderr
    final = json.loads((tmp_path / name / "final_metrics.json").read_text())
    assert f"test_accuracy {final['test_accuracy']!r}" in result.stdout, result.stdout


@pytest.mark.slow
def test_two_processes_on_localhost_train_like_one(tmp_path):
  flags = _smoke_flags(tmp_path / "run", 1, f"--config.batch_size={PARALLEL_BATCH}", "--multihost",
                       f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2")
  workers = []
  try:
    for process_id in range(2):
      workers.append(_worker(
          tmp_path / "params", [*flags, f"--process_id={process_id}"],
          "--xla_force_host_platform_device_count=2", tmp_path / f"log{process_id}",
      ))
    _wait_for_all(workers, timeout=150)
  finally:  # A worker still running here is stuck: the other one failed, or time ran out.
    for worker in workers:
      worker.kill()
      worker.wait()
  for process_id, worker in enumerate(workers):
    assert worker.returncode == 0, (tmp_path / f"log{process_id}").read_text()

  processes = [_by_device(np.load(tmp_path / "params" / f"process{i}.npz")) for i in range(2)]
  assert [len(devices) for devices in processes] == [2, 2]
  copies = [params for devices in processes for params in devices.values()]
  for params in copies[1:]:  # Replicated by collectives: the same bits everywhere.
    for path, array in params.items():
      np.testing.assert_array_equal(array, copies[0][path], err_msg=path)
  _assert_close(copies[0], _one_device_params(tmp_path, 1))

  # Process 0 wrote the files; both wrote the checkpoint, which one process alone restores.
  assert {"config.json", "final_metrics.json", "metrics.jsonl", "checkpoints", "report.md"} <= set(
      os.listdir(tmp_path / "run"))
  restored = predict.load(str(tmp_path / "run"), "latest").state.params
  for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
    np.testing.assert_array_equal(np.asarray(leaf), copies[0][jax.tree_util.keystr(path)])
  assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
  assert "epoch 1/1" in (tmp_path / "log0").read_text()
  assert "epoch 1/1" not in (tmp_path / "log1").read_text()


@pytest.mark.slow
def test_a_batch_that_does_not_divide_among_devices_names_sizes_that_do(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", EIGHT_DEVICES)
  result = run_main(*_smoke_flags(tmp_path / "run", 1, "--config.batch_size=100"))
  assert result.returncode != 0
  assert result.stderr.strip() == (
      "mnist_jax: config.batch_size 100 does not divide among the 8 devices; "
      "use a multiple of 8, such as 96 or 104"
  )
  assert not os.path.exists(tmp_path / "run")  # Refused before the workdir is made.


@pytest.mark.parametrize(
    "flag", ["--process_id=1", "--coordinator_address=localhost:1234", "--multihost_timeout=5"])
def test_cluster_flags_need_multihost(tmp_path, flag):
  result = main_in_process(*_smoke_flags(tmp_path, 1), flag)
  assert result.returncode != 0
  assert result.stderr.strip() == f"mnist_jax: --{flag[2:].split('=')[0]} needs --multihost"


@pytest.mark.slow
def test_a_process_whose_peers_never_come_gives_up_in_one_line(tmp_path):
  address = f"localhost:{_free_port()}"
  result = run_main(*_smoke_flags(tmp_path / "run", 1), "--multihost", f"--coordinator_address={address}",
                    "--num_processes=2", "--process_id=1", "--multihost_timeout=2")
  assert result.returncode == 1
  assert result.stdout == f"joining 2 processes at {address} (up to 2 s)\n"
  assert result.stderr == (f"mnist_jax: not every process joined at {address} within 2 s "
                           "(--multihost_timeout); start them all with the same "
                           "--coordinator_address and --num_processes, each with its own "
                           "--process_id\n")
  assert not os.path.exists(tmp_path / "run")


def test_multihost_outside_a_cluster_it_can_detect_asks_for_the_cluster_flags(tmp_path):
  env_names = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES")
  if any(name in os.environ for name in env_names):
    pytest.skip("runs inside a cluster that JAX detects")
  result = run_main(*_smoke_flags(tmp_path, 1), "--multihost")
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mnist_jax: jax.distributed.initialize failed")
  assert "coordinator address" in lines[0]


def _check_padding_on_eight_devices():
  """1003 random examples, padded to divide among 8 devices, against the same unpadded on one."""
  import jax  # pylint: disable=import-outside-toplevel

  assert jax.device_count() == 8
  parallel.use_compilation_cache(parallel.COMPILATION_CACHE)  # As the suite's own process does.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1003, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 1003, dtype=np.int32)
  info = data.DatasetInfo("random", (28, 28, 1), 10, tuple("0123456789"))
  state = steps.create_train_state(load_config("seed_mlp"), info, jax.random.PRNGKey(0), 15)
  mesh = parallel.create_mesh()
  sharded = dict(batch_sharding=parallel.data_sharding(mesh), mean=0.0, std=1.0)
  replicated_state = jax.device_put(state, parallel.state_sharding(mesh, state))
  rng = jax.random.PRNGKey(1)
  order = steps.epoch_order(rng, 1003)

  epoch = functools.partial(steps.train_epoch, batch_size=64, mean=0.0, std=1.0)
  one, _ = jax.jit(epoch)(state, images, labels, order, rng)
  train_arrays = parallel.put_examples((images, labels), mesh)
  assert train_arrays[0].shape[0] == 1008
  eight, _ = jax.jit(functools.partial(steps.train_epoch, batch_size=64, **sharded))(
      replicated_state, *train_arrays, order, rng)
  assert int(eight.step) == int(one.step) == 1003 // 64
  for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # Adam steps are about 1e-3.

  expected = jax.jit(functools.partial(steps.evaluate, batch_size=96, mean=0.0, std=1.0))(
      one, images, labels)
  test_arrays = parallel.put_examples((images, labels), mesh, multiple=96)
  assert test_arrays[0].shape[0] == 1056
  got = jax.jit(functools.partial(steps.evaluate, batch_size=96, num_examples=1003, **sharded))(
      jax.device_put(one, parallel.state_sharding(mesh, one)), *test_arrays)
  assert int(got["count"]) == int(expected["count"]) == 1003
  assert float(got["accuracy"]) == float(expected["accuracy"])
  np.testing.assert_allclose(float(got["loss"]), float(expected["loss"]), rtol=1e-5)


@pytest.mark.slow
def test_padding_rows_are_never_drawn_or_counted():
  result = subprocess.run(
      [sys.executable, "-c", "import test_parallel; test_parallel._check_padding_on_eight_devices()"],
      cwd=os.path.join(REPO, "tests"), env={**os.environ, "XLA_FLAGS": EIGHT_DEVICES},
      capture_output=True, text=True, timeout=300, check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]


def test_xla_flags_are_added_to_the_users_and_never_override_them(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"{EIGHT_DEVICES} --xla_gpu_deterministic_ops=false")
  parallel.set_xla_flags()
  assert os.environ["XLA_FLAGS"].split() == [
      EIGHT_DEVICES, "--xla_gpu_deterministic_ops=false", "--xla_cpu_prefer_vector_width=512"]
  once = os.environ["XLA_FLAGS"]
  parallel.set_xla_flags()
  assert os.environ["XLA_FLAGS"] == once


def test_a_compilation_cache_that_cannot_be_written_is_one_warning(tmp_path, capsys):
  (tmp_path / "file").write_text("")  # A folder under a file cannot exist, for root too.
  before = jax.config.jax_compilation_cache_dir
  parallel.use_compilation_cache(str(tmp_path / "file" / "cache"))
  assert jax.config.jax_compilation_cache_dir == before
  assert capsys.readouterr().err == (
      f"mnist_jax: warning: the compilation cache {tmp_path / 'file' / 'cache'} cannot be written; "
      "programs compile in every run (give --jax_cache_dir a writable folder, or '' for none)\n")


def _filtered(chunks):
  gloo = parallel.GlooFilter()
  return b"".join(gloo.feed(chunk) for chunk in chunks) + gloo.end()


def _gloo_pieces(rank, peers):
  """One gloo line, in the writes its `std::cout <<` makes."""
  return [b"[Gloo] Rank ", b"%d" % rank, b" is connected to ", b"%d" % peers, b" peer ranks. ",
          b"Expected number of connected peer ranks is : ", b"%d" % peers, b"\n"]


OURS = [b"joining all processes at the coordinator the cluster names (up to 300 s)\n"]
AFTER = [b"epoch 1/1  train_loss 0.8230  train_acc 0.8005  test_acc 0.9027  1.49s", b"\n",
         b"\n", b"12\n", b"Expected to see: nothing of gloo's\n"]


@pytest.mark.parametrize("gloo_writes", [
    # Streams that srun passed on from two processes with two devices each.
    [b"[Gloo] Rank 3 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3",
     b"[Gloo] Rank 2 is connected to 3 peer ranks. Expected number of connected peer ranks is : ",
     b"3\n", b"\n"],
    [b"[Gloo] Rank ", b"3", b" is connected to ", b"3 peer ranks. Expected number of connected "
     b"peer ranks is : 3\n[Gloo] Rank 2 is connected to 3 peer ranks. Expected number of "
     b"connected peer ranks is : 3\n"],
    [b"[Gloo] Rank 2", b" is connected to 3 peer ranks. Expected number of connected peer ranks "
     b"is : 3\n", *_gloo_pieces(3, 3)],
])
def test_gloo_lines_written_at_once_by_several_threads_are_all_dropped(gloo_writes):
  assert _filtered([*OURS, *gloo_writes, *AFTER]) == b"".join(OURS + AFTER)


def test_gloo_lines_are_dropped_however_their_pieces_mix_and_the_stream_is_cut():
  rng = np.random.default_rng(0)
  for _ in range(300):
    threads = [_gloo_pieces(rank, 3) for rank in range(rng.integers(1, 5))]
    writes = []
    while threads:  # Each thread's pieces in order, the threads' in any order.
      thread = threads[rng.integers(len(threads))]
      writes.append(thread.pop(0))
      threads = [thread for thread in threads if thread]
    stream = b"".join(OURS + writes + AFTER)
    cuts = sorted(rng.choice(len(stream), size=rng.integers(0, 30), replace=False))
    chunks = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)])]
    assert _filtered(chunks) == b"".join(OURS + AFTER), writes
