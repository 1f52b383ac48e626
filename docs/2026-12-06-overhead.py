"""The seed command's own overhead, two source trees side by side (docs/2026-12-06-install-and-clusters.md).

  python docs/2026-12-06-overhead.py --before=/path/to/old/tree --after=. --rounds=7

Alternates the trees, each run from the same Python with `PYTHONPATH` set to its tree, each with a
compilation cache of its own (filled by the first round). Prints, per tree, medians and ranges of
the seed command's wall time and overhead (wall minus `train_time_s` and `compile_time_s`), of
`--mode=predict` on one image, then the phases of the seed command (3 runs each); then the median
difference, round by round, of the wall, training and overhead times, and whether the two trees'
`predictions.npz` are identical; last, how long importing predict's libraries alone takes in the
same rounds (`LIBRARIES`), its floor. With `--phases WORKDIR OUT`, this file is the timed
command itself.
"""

import argparse
import atexit
import functools
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SEED = ["--config=experiments/seed_mlp.py"]
# What `--mode=predict` cannot do without: the model's libraries, its checkpoints' and its config's.
LIBRARIES = "import jax, flax.linen, orbax.checkpoint, ml_collections"


def phases(workdir: str, out: str) -> None:
  """Runs the seed command in this process with timers around its phases; writes them to `out`."""
  start = time.perf_counter()
  seconds: dict[str, float] = {}

  def timed(owner, name, phase):
    function = getattr(owner, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
      begin = time.perf_counter()
      try:
        return function(*args, **kwargs)
      finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - begin

    setattr(owner, name, wrapper)

  # pylint: disable=import-outside-toplevel
  import jax
  from mnist_jax import pipelines, steps, train
  from mnist_jax.report import training
  from mnist_jax.run import checkpoints
  from mnist_jax.tools import sweep  # noqa: F401  # Imported by the command too.
  seconds["imports"] = time.perf_counter() - start
  # Newer trees compile the initial state ahead and count it in `compile_time_s`.
  for name in ("initial_state", "compile_initial_state"):
    if hasattr(steps, name):
      timed(steps, name, "init")
  timed(checkpoints.TrainingCheckpoints, "end_of_epoch", "saves")
  # Older trees compute the predictions in one function, newer ones in three.
  for name in ("save_predictions", "_test_logits", "_saliency_maps", "_temperature"):
    if hasattr(training, name):
      timed(training, name, "report_predictions")
  timed(training, "after_training", "report")
  timed(train, "train_and_evaluate", "train_and_evaluate")
  create = pipelines.create_pipeline

  def create_timed(*args, **kwargs):
    pipeline = create(*args, **kwargs)
    evaluate = pipeline.evaluate

    def evaluate_timed(*args, **kwargs):
      begin = time.perf_counter()
      result = jax.block_until_ready(evaluate(*args, **kwargs))
      seconds["eval"] = seconds.get("eval", 0.0) + time.perf_counter() - begin
      return result

    pipeline.evaluate = evaluate_timed
    return pipeline

  pipelines.create_pipeline = create_timed

  @atexit.register  # The command ends its process itself, after the `atexit` functions.
  def write():
    seconds["main"] = time.perf_counter() - start
    with open(out, "w") as f:
      json.dump(seconds, f)

  sys.argv = ["mnist_jax.main", *SEED, f"--workdir={workdir}"]
  runpy.run_module("mnist_jax.main", run_name="__main__", alter_sys=True)


def _run(tree: str, args: list[str], cache: str) -> float:
  env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
  begin = time.perf_counter()
  subprocess.run([sys.executable, *args, f"--jax_cache_dir={cache}"], cwd=tree, env=env,
                 check=True, capture_output=True)
  return time.perf_counter() - begin


def _summary(values: list[float]) -> str:
  return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def compare(trees: dict[str, str], rounds: int, scratch: str) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from mnist_jax import data  # pylint: disable=import-outside-toplevel

  digit = os.path.join(scratch, "digit.png")
  test = data.load_split("mnist", "test", None)
  Image.fromarray(255 - test.images_NHWC[0, ..., 0]).resize((280, 280)).save(digit)
  results = {name: {"wall": [], "train": [], "overhead": [], "predict": [], "phases": []}
             for name in trees}
  libraries = []
  for i in range(rounds):
    for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
      tree, workdir, cache = trees[name], os.path.join(scratch, name), os.path.join(scratch, f"cache_{name}")
      shutil.rmtree(workdir, ignore_errors=True)
      wall = _run(tree, ["-m", "mnist_jax.main", *SEED, f"--workdir={workdir}"], cache)
      with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
      results[name]["wall"].append(wall)
      results[name]["train"].append(final["train_time_s"])
      results[name]["overhead"].append(wall - final["train_time_s"] - final["compile_time_s"])
      for _ in range(2):
        results[name]["predict"].append(_run(tree, ["-m", "mnist_jax.main", "--mode=predict",
                                                    f"--workdir={workdir}", f"--images={digit}"], cache))
      begin = time.perf_counter()
      subprocess.run([sys.executable, "-c", LIBRARIES], check=True)
      libraries.append(time.perf_counter() - begin)
      if i < 3:
        timed_dir, out = os.path.join(scratch, f"{name}_phases"), os.path.join(scratch, f"{name}.json")
        shutil.rmtree(timed_dir, ignore_errors=True)
        wall = _run(tree, [os.path.abspath(__file__), "--phases", timed_dir, out], cache)
        with open(out) as f:
          seconds = json.load(f)
        with open(os.path.join(timed_dir, "final_metrics.json")) as f:
          final = json.load(f)
        seconds["start_and_exit"] = wall - seconds.pop("main")
        # The predictions, then the figures (drawn beside the predictions since 56fc993).
        seconds["report_figures"] = seconds.pop("report") - seconds["report_predictions"]
        if "init" in final["compile_times_s"]:  # Counted as compiling: not overhead.
          seconds["init_compiling"] = seconds.pop("init")
        seconds["rest_of_loop"] = (seconds.pop("train_and_evaluate") - final["train_time_s"]
                                   - final["compile_time_s"] - seconds.get("init", 0.0)
                                   - seconds["eval"] - seconds["saves"])
        results[name]["phases"].append(seconds)
  for name, result in results.items():
    print(f"{name}: seed wall {_summary(result['wall'])}, overhead {_summary(result['overhead'])}, "
          f"predict {_summary(result['predict'])}")
    print("  phases: " + ", ".join(f"{phase} {statistics.median(p[phase] for p in result['phases']):.2f} s"
                                   for phase in result["phases"][0]))
  before, after = results.values()
  print("after - before, medians of the rounds' differences: " + ", ".join(
      f"{key} {statistics.median(a - b for a, b in zip(after[key], before[key])):+.2f} s"
      for key in ("wall", "train", "overhead")))
  saved = [np.load(os.path.join(scratch, name, "predictions.npz")) for name in trees]
  same = all(np.array_equal(saved[0][key], saved[1][key]) for key in saved[0].files)
  print(f"predictions.npz identical: {same and saved[0].files == saved[1].files}")
  print(f"importing predict's libraries alone ({LIBRARIES}): {_summary(libraries)}")


if __name__ == "__main__":
  if sys.argv[1:2] == ["--phases"]:
    phases(*sys.argv[2:4])
  else:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--rounds", type=int, default=7)
    flags = parser.parse_args()
    compare({"before": flags.before, "after": flags.after}, flags.rounds, tempfile.mkdtemp())
