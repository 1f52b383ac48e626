"""Side-by-side benchmark: this project's pipelines against Keras `model.fit` and a PyTorch loop.

  python -m mnist_jax.bench                # the seed recipe, 10 epochs, each loop once
  python -m mnist_jax.bench --repeats=3    # medians over three runs of each loop
  python -m mnist_jax.bench --quick        # one epoch, to check the harness

Every loop trains the same MLP (by default the seed recipe: 784-128-10, relu, Adam 1e-3, batch 32)
on the same arrays, in a process of its own, started one after another by this one, so that one
framework's threads and memory do not weigh on the next. Each child prints its result as its last
line of JSON; this process prints the table. Like `main.py`, this command owns its flags.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from mnist_jax.run import interrupts
from mnist_jax.tools import bench_others

_SEED_MLP = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "experiments", "seed_mlp.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _SEED_MLP, "The MLP recipe every loop trains (default: the repository's "
    "experiments/seed_mlp.py).", lock_config=True,
)
_REPEATS = flags.DEFINE_integer("repeats", 1, "Runs of each loop; the table shows medians.")
_QUICK = flags.DEFINE_bool("quick", False, "One epoch of each loop, to check the harness.")
_LOOPS = flags.DEFINE_list(
    "loops", "jax_device,jax_device_warm,command,jax_stream,tfdata_only,keras,torch",
    "Loops to run, in this order. jax_device_warm is jax_device again, with the compilation cache "
    "jax_device left (as a second `python -m mnist_jax.main` finds it); command is the whole "
    "`python -m mnist_jax.main` command, run twice with one compilation cache, the second timed: "
    "its time beyond training and compiling is shown below the table.",
)
_CHILD = flags.DEFINE_string("child", None, "Internal: run one loop and print its JSON line.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Internal: the JAX loops' persistent compilation cache, new each repeat.")


def _mnist_jax(config, pipeline: str) -> dict[str, Any]:
  from mnist_jax import metrics, pipelines, train  # pylint: disable=import-outside-toplevel
  from mnist_jax.run import parallel, rundir  # pylint: disable=import-outside-toplevel

  if _CACHE_DIR.value:  # As main.py's --jax_cache_dir.
    parallel.use_compilation_cache(_CACHE_DIR.value)
  config.input_pipeline = pipeline
  with tempfile.TemporaryDirectory() as workdir:
    _, final = train.train_and_evaluate(config, workdir)
    epoch_times = [record["epoch_time_s"] for record in rundir.read_history(workdir, metrics.check_record)]
  examples_on_device = pipelines.CHUNK_EXAMPLES if pipeline == "stream" else 70_000
  device_data_mb = examples_on_device * (28 * 28 + 4) / 2**20
  compile_s = final["compile_times_s"].get("train", 0.0)  # Not the test split's eval program.
  return {
      "train_s": final["train_time_s"] + compile_s,
      "compile_s": compile_s,
      "epoch_times_s": epoch_times,
      "test_accuracy": final["test_accuracy"],
      "device": _jax_device(),
      "device_data_mb": device_data_mb,
  }


def _command(config) -> dict[str, Any]:
  """`python -m mnist_jax.main` on the recipe as a user runs it a second time (data prepared, and
  every program it compiles in the compilation cache from a first, untimed run): its wall time
  against the training and compiling it reports."""
  from mnist_jax import metrics  # pylint: disable=import-outside-toplevel
  from mnist_jax.run import rundir  # pylint: disable=import-outside-toplevel

  del config  # Given to the command by its flags.
  config_args = [f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}"]
  config_args += [arg for arg in sys.argv[1:] if arg.startswith("--config.")]
  config_args += ["--config.num_epochs=1"] if _QUICK.value else []

  def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      result = subprocess.run(
          [sys.executable, "-m", "mnist_jax.main", *config_args, f"--workdir={workdir}",
           f"--jax_cache_dir={_CACHE_DIR.value}"], capture_output=True, text=True, check=False)
      wall_s = time.perf_counter() - start
      if result.returncode != 0:
        return {"failed": (result.stderr.strip().splitlines() or ["no output"])[-1]}
      final = rundir.read_final(workdir, metrics.check_record)
    return {"wall_s": wall_s, "train_s": final["train_time_s"], "compile_s": final["compile_time_s"]}

  first = run()
  return first if "failed" in first else run()


def _jax_device() -> str:
  """`cpu`, `gpu` or `tpu`; on GPUs, whether XLA was asked for deterministic ops (slower epochs)."""
  import jax  # pylint: disable=import-outside-toplevel

  platform = jax.devices()[0].platform
  deterministic = "--xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", "")
  return f"{platform} (deterministic ops)" if platform == "gpu" and deterministic else platform


def _median_seconds(fn, *args, repeats: int = 5) -> float:
  """Median wall time of `fn(*args)`, compiled and run once before timing."""
  import jax  # pylint: disable=import-outside-toplevel

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _epoch_matmuls(hidden_sizes, batch_size: int, steps: int):
  """One epoch's matmuls alone, at the training batch size, as `mlp_flops_per_example` counts
  them: a compiled scan whose step runs each dense layer forward, its weight gradient and (but for
  the first) its input gradient, with nothing else (no softmax, no optimizer, no data)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  widths = [784, *hidden_sizes, 10]
  keys = jax.random.split(jax.random.PRNGKey(0), len(widths))
  x = jax.random.normal(keys[0], (batch_size, widths[0]), jnp.float32)
  weights = [jax.random.normal(key, (i, o), jnp.float32) / i**0.5
             for key, i, o in zip(keys[1:], widths[:-1], widths[1:])]

  def step(weights, _):
    activations = [x]
    for w in weights:
      activations.append(activations[-1] @ w)
    grad, updated = activations[-1], list(weights)
    for layer in reversed(range(len(weights))):
      # A tiny step, so that the next step's products depend on this one's (nothing is hoisted).
      updated[layer] = weights[layer] - 1e-9 * (activations[layer].T @ grad)
      if layer:
        grad = grad @ weights[layer].T
    return updated, None

  return jax.jit(lambda w: jax.lax.scan(step, w, None, length=steps)[0]), weights


def _matmul_floor(config) -> dict[str, Any]:
  """GFLOP/s of a large jitted float32 matmul, the most this device does for a dense layer, and
  the seconds of one epoch's matmuls at the config's batch size (`_epoch_matmuls`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  n = 2048
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  seconds = _median_seconds(jax.jit(lambda x: x @ x), a)
  epoch, weights = _epoch_matmuls(config.model_args.hidden_sizes, config.batch_size,
                                  60_000 // config.batch_size)
  return {"gflops": 2 * n**3 / seconds / 1e9, "epoch_matmuls_s": _median_seconds(epoch, weights)}


def mlp_flops_per_example(hidden_sizes, num_inputs: int = 784, num_classes: int = 10) -> int:
  """FLOPs of one training example through an MLP: forward, weight gradients, input gradients.

  Each dense layer costs `2 * in * out` forward and as much for its weight gradient; the gradient
  with respect to its input is needed for every layer but the first.
  """
  widths = [num_inputs, *hidden_sizes, num_classes]
  layers = [2 * fan_in * fan_out for fan_in, fan_out in zip(widths[:-1], widths[1:])]
  return 2 * sum(layers) + sum(layers[1:])


_RUNNERS = {
    "jax_device": lambda config: _mnist_jax(config, "device"),
    "jax_device_warm": lambda config: _mnist_jax(config, "device"),
    "jax_stream": lambda config: _mnist_jax(config, "stream"),
    "tfdata_only": bench_others.tfdata_only,
    "keras": bench_others.keras,
    "torch": bench_others.torch,
    "matmul_floor": _matmul_floor,
    "command": _command,
}


def _run_child(loop: str, cache_dir: str, scratch: str) -> dict[str, Any]:
  """Runs one loop in a child process, in a session of its own: Ctrl-C reaches this process
  alone, which then ends the child's whole process group (the `command` loop's own child too).
  The child's temporary files go under `scratch`, which this process removes."""
  process = subprocess.Popen(
      [sys.executable, "-m", "mnist_jax.tools.bench", *sys.argv[1:], f"--child={loop}",
       f"--cache_dir={cache_dir}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
      env={**os.environ, "TMPDIR": scratch},
  )
  try:
    stdout, stderr = process.communicate()
  except BaseException:  # Interrupted: no child outlives this process.
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    process.wait()
    raise
  if process.returncode != 0:
    lines = stderr.strip().splitlines() or ["no output"]
    return {"failed": lines[-1]}
  return json.loads(stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
  values = [run[key] for run in runs if run.get(key) is not None]
  return statistics.median(values) if values else None


def _steady_epoch(run: dict[str, Any]) -> float:
  """The median epoch after the first (the only one, with one epoch)."""
  times = run["epoch_times_s"]
  return statistics.median(times[1:] or times)


def _table(results: dict[str, list[dict[str, Any]]], config) -> str:
  steps = 60_000 // config.batch_size
  examples_per_epoch = steps * config.batch_size
  baselines = {name: _median(results.get(name, []), "train_s") for name in ("keras", "torch")}
  header = ("| loop | train time (s) | steady epoch (s) | compile (s) | examples/s | test acc "
            "| peak RSS (MB) | Keras time / this | PyTorch time / this |")
  lines = [header, "|" + "---|" * 9]
  for loop, runs in results.items():
    if loop in ("matmul_floor", "command"):
      continue
    notes = [run.get("skipped") or run.get("failed") for run in runs if "train_s" not in run]
    if notes:
      lines.append(f"| {loop} | {notes[0]} |" + " |" * 8)
      continue
    for run in runs:
      run["steady_epoch_s"] = _steady_epoch(run)
    train_s, epoch_s = _median(runs, "train_s"), _median(runs, "steady_epoch_s")
    compile_s, accuracy = _median(runs, "compile_s"), _median(runs, "test_accuracy")
    cells = [
        loop,
        f"{train_s:.2f}",
        f"{epoch_s:.3f}",
        "-" if compile_s is None else f"{compile_s:.2f}",
        f"{examples_per_epoch / epoch_s:,.0f}",
        "-" if accuracy is None else f"{100 * accuracy:.2f}%",
        f"{_median(runs, 'peak_rss_mb'):.0f}",
        *("-" if baseline is None else f"{baseline / train_s:.1f}x"
          for baseline in baselines.values()),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _floor_summary(results: dict[str, list[dict[str, Any]]], config) -> str:
  gflops = _median(results["matmul_floor"], "gflops")
  flops = mlp_flops_per_example(config.model_args.hidden_sizes)
  epoch_gflop = flops * (60_000 // config.batch_size) * config.batch_size / 1e9
  floor_s = epoch_gflop / gflops
  summary = (f"matmul floor: a 2048^3 jitted matmul runs at {gflops:.0f} GFLOP/s; one epoch of this "
             f"MLP is {epoch_gflop:.1f} GFLOP, so at least {floor_s:.3g} s")
  device_runs = [run for run in results.get("jax_device", []) if "train_s" in run]
  if device_runs:
    epoch_s = _median(device_runs, "steady_epoch_s")
    summary += f"; jax_device's steady epoch is {epoch_s / floor_s:.2f}x that floor"
    matmuls_s = _median(results["matmul_floor"], "epoch_matmuls_s")
    summary += (f", and {epoch_s / matmuls_s:.2f}x the epoch's own matmuls run alone at batch "
                f"{config.batch_size} ({matmuls_s:.3g} s)")
    summary += f"; its data take {device_runs[0]['device_data_mb']:.1f} MB of device memory (uint8)"
  return summary


def _command_summary(runs: list[dict[str, Any]]) -> str:
  """The "command wall" row: what the whole command takes beyond training and compiling."""
  done = [run for run in runs if "wall_s" in run]
  if not done:
    return f"command wall: {runs[0].get('failed')}"
  for run in done:
    run["other_s"] = run["wall_s"] - run["train_s"] - run["compile_s"]
  return (f"command wall: `python -m mnist_jax.main` took {_median(done, 'wall_s'):.2f} s: training "
          f"{_median(done, 'train_s'):.2f} s, compiling {_median(done, 'compile_s'):.2f} s, and "
          f"{_median(done, 'other_s'):.2f} s besides (start-up, data, checkpoints, report)")


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  if _QUICK.value:
    config.num_epochs = 1
  if _CHILD.value:
    result = _RUNNERS[_CHILD.value](config)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    return
  from mnist_jax.run import parallel  # pylint: disable=import-outside-toplevel

  parallel.set_xla_flags()  # As main.py does; the loops inherit them.
  unknown = sorted(set(_LOOPS.value) - set(_RUNNERS))
  if unknown:
    sys.exit(f"mnist_jax.bench: unknown loops {unknown}; choose from {sorted(_RUNNERS)}")
  if config.model != "mlp":
    sys.exit("mnist_jax.bench: compares MLPs only; use an MLP config")
  results: dict[str, list[dict[str, Any]]] = {}
  # The children's temporary files (their workdirs) go under one directory of this process's,
  # removed however it ends: a child ended by Ctrl-C cannot remove its own.
  with tempfile.TemporaryDirectory() as scratch:
    for repeat in range(_REPEATS.value):
      with tempfile.TemporaryDirectory() as cache_dir:
        for loop in ["matmul_floor", *_LOOPS.value]:
          print(f"run {repeat + 1}/{_REPEATS.value}: {loop}", file=sys.stderr, flush=True)
          results.setdefault(loop, []).append(_run_child(loop, cache_dir, scratch))
  print(f"epochs {config.num_epochs}, batch {config.batch_size}, hidden "
        f"{tuple(config.model_args.hidden_sizes)}, {_REPEATS.value} run(s) each, medians shown")
  print(_table(results, config))
  print(_floor_summary(results, config))
  if "command" in results:
    print(_command_summary(results["command"]))
  devices = {loop: runs[0]["device"] for loop, runs in results.items() if "device" in runs[0]}
  print("devices: " + ", ".join(f"{loop} on {device}" for loop, device in devices.items()))


if __name__ == "__main__":
  interrupts.exit_on_interrupt("mnist_jax.bench")
  with interrupts.no_teardown():
    app.run(main)
