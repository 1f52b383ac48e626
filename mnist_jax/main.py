"""Command line: `python -m mnist_jax.main --config=experiments/<name>.py --workdir=runs/<name>`.

  --mode=train    (default) train, or resume from the workdir's latest checkpoint, then report
  --mode=eval     test loss and accuracy of a checkpoint (--checkpoint=best|latest|<step>), or
                  its report on a labelled folder (--images_dir=my_digits); --calibrated
  --mode=predict  the digit in each of --images=a.png,b.jpg
  --mode=attack   test accuracy under FGSM and PGD at each of --eps (studies/)
  --mode=explore  the config's dataset: shapes, class counts and plots
  --mode=report   redraw the training report of a finished --workdir (no --config needed)
  --mode=sweep    train every point of the config file's get_sweep() (see sweep.py)

This module owns the flags and nothing else; each mode is a function of a config and a workdir,
imported when that mode runs (eval and predict load no plotting, TensorBoard or TensorFlow).
"""

import ast
import contextlib
import functools
import gc
import os
import re
import shlex
import signal
import sys
import sysconfig
import traceback
from typing import Any

from mnist_jax.run import interrupts

if __name__ == "__main__":
  # Ctrl-C ends the command with one line from here on, during the slow imports below too.
  # Training stops at the end of an epoch instead (run/guard.py), and restores this after.
  interrupts.exit_on_interrupt()

import ml_collections  # pylint: disable=wrong-import-position
from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from mnist_jax import errors  # pylint: disable=wrong-import-position
from mnist_jax.report import drawing  # pylint: disable=wrong-import-position
from mnist_jax.run import parallel, quiet, workers  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/seed_mlp.py (or ...py:smoke).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
_JAX_CACHE_DIR = flags.DEFINE_string(
    "jax_cache_dir", parallel.COMPILATION_CACHE,
    "Persistent compilation cache, so a second run skips compiling; empty to turn it off.",
)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "predict", "explore", "report", "sweep", "attack"],
    "train: train (or resume) and evaluate, then write the report; eval: a checkpoint's test "
    "metrics, or its report on the labelled folder --images_dir; predict: the class of each of "
    "--images; explore: the dataset's shapes, class counts and plots; report: redraw the report "
    "of the finished run in --workdir; sweep: train each point of the config file's get_sweep() "
    "into --workdir/<point>/seed_<seed>/ and rank them; attack: test accuracy under FGSM and PGD "
    "at each of --eps, with a report in --workdir/attack/.",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a workdir whose checkpoints were trained with a different config.",
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "best", "eval/predict: 'best' (by test accuracy), 'latest', or a step number."
)
_IMAGES = flags.DEFINE_list("images", [], "predict: comma-separated image files.")
_IMAGES_DIR = flags.DEFINE_string(
    "images_dir", None, "eval: a folder with a subfolder of images per class (0/, 1/, ...); the "
    "report goes to --workdir/eval/<folder name>/.")
_CALIBRATED = flags.DEFINE_bool(
    "calibrated", False, "eval/predict: divide the logits by the temperature fitted on the run's "
    "validation split (config.validation_fraction > 0).")
_EPS = flags.DEFINE_list(
    "eps", ["0", "0.05", "0.1", "0.15", "0.2", "0.25", "0.3"],
    "attack: L-infinity budgets, in pixel units after dividing by 255.")
_PGD_STEPS = flags.DEFINE_integer(
    "pgd_steps", 10, "attack: PGD's steps, the first being FGSM's (at most 1000).", lower_bound=1,
    upper_bound=1000)
_ATTACK_EXAMPLES = flags.DEFINE_integer(
    "attack_examples", None, "attack: only the first this many test images.", lower_bound=1)
_SWEEP_SHARD = flags.DEFINE_string(
    "sweep_shard", None, "sweep: train only share i of n of its runs, as i/n (0 <= i < n), for "
    "schedulers that start n copies of one command (a Kubernetes indexed job, a shell loop); in "
    "a SLURM array (sbatch --array=0-<n-1>) each task takes its share by itself.")
# The modes each of these flags is for.
_MODE_FLAGS = [
    (_CHECKPOINT, ("eval", "predict", "attack")), (_IMAGES, ("predict",)),
    (_IMAGES_DIR, ("eval",)), (_CALIBRATED, ("eval", "predict")), (_EPS, ("attack",)),
    (_PGD_STEPS, ("attack",)), (_ATTACK_EXAMPLES, ("attack",)), (_SWEEP_SHARD, ("sweep",)),
]
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join the other processes through jax.distributed.initialize; on Cloud "
    "TPU, SLURM and Open MPI it finds them itself, elsewhere give the three flags below.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same for every process (--multihost)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes (--multihost).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 first (--multihost).")
_MULTIHOST_TIMEOUT = flags.DEFINE_integer(
    "multihost_timeout", 300, "Seconds to wait for every process to join (--multihost).", lower_bound=1
)


def _config_file_line(error: BaseException) -> str | None:
  """`path:line` in the config file where `error` was raised, if the file (or code it called)
  raised it while config_flags loaded it; None for absl's and ml_collections' own errors."""
  frames = traceback.extract_tb(error.__traceback__)
  loader = [i for i, frame in enumerate(frames) if frame.name == "parse"
            and frame.filename.endswith(os.path.join("config_flags", "config_flags.py"))]
  libraries = tuple({sysconfig.get_paths()[name] for name in ("stdlib", "purelib", "platlib")})
  for frame in frames[loader[0] + 1:] if loader else []:  # The first frame that is no library's.
    if not frame.filename.startswith((*libraries, "<")):
      relative = os.path.relpath(frame.filename)
      return f"{frame.filename if relative.startswith('..') else relative}:{frame.lineno}"
  return None


def _one_line(error: BaseException) -> str:
  """The gist of an exception from absl, ml_collections or a config file, on one line."""
  root = error
  while (root.__cause__ or root.__context__) is not None:
    root = root.__cause__ or root.__context__
  where = _config_file_line(root)
  if where:  # Its first line: a config file's error can span many.
    locked = re.search(r'Key "(\w+)" does not exist and cannot be added', str(root))
    first = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    gist = (f"unknown config field {locked[1]!r}" if locked else
            f"{type(root).__name__}{': ' if first else ''}{first}")
    return f"the config file raised {gist} (at {where})"
  if isinstance(root, SyntaxError):
    return f"the config file is not Python: {root.msg} ({root.filename}, line {root.lineno})"
  text = str(error).strip()
  while text[:1] in ("'", '"'):  # ml_collections nests the repr of a KeyError in its message.
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      break
  lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
  if "attribute 'get_config'" in text:
    return "the config file defines no get_config(arg=None)"
  if isinstance(error, (AttributeError, KeyError)):
    return f"unknown config field {' '.join(lines)}"
  return lines[-1]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, loading the config file and checking its fields, with any mistake told in
  one line: a file that fails to load, raises, exits, or returns anything but a whole config."""
  logging.set_verbosity(logging.ERROR)  # config_flags warns of a get_config returning None.
  try:
    remaining = flags.FLAGS(argv)
    config = _CONFIG.value
    if type(config).__name__ == "_ErrorConfig":  # A file that failed to load raises when read.
      config.keys()
  except SystemExit as e:  # --help exits so too; a config file must not.
    if not _config_file_line(e):
      raise
    sys.exit(f"mnist_jax: bad flags: the config file called sys.exit({e.code!r}) (at "
             f"{_config_file_line(e)}); get_config returns an ml_collections.ConfigDict")
  except Exception as e:  # A config file can fail in any way; each is the user's to fix.
    sys.exit(f"mnist_jax: bad flags: {_one_line(e)}")
  if len(remaining) > 1:
    sys.exit(f"mnist_jax: unexpected arguments: {' '.join(remaining[1:])}")
  if flags.FLAGS["config"].present:
    from mnist_jax import configs  # pylint: disable=import-outside-toplevel

    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    if not isinstance(config, ml_collections.ConfigDict):
      sys.exit(f"mnist_jax: bad flags: get_config of {filename} returned "
               f"{type(config).__name__ if config is not None else 'None'}, not an "
               "ml_collections.ConfigDict; start it from mnist_jax.configs.defaults()")
    try:
      configs.check_new(config)
    except configs.ConfigError as e:
      sys.exit(f"mnist_jax: {e}")
  return remaining


def _train() -> None:
  from mnist_jax import train  # pylint: disable=import-outside-toplevel
  from mnist_jax.report import training  # pylint: disable=import-outside-toplevel
  from mnist_jax.run import checkpoints  # pylint: disable=import-outside-toplevel
  from mnist_jax.tools import shares, sweep  # pylint: disable=import-outside-toplevel

  resume = f"resume with: python -m mnist_jax.main {shlex.join(sys.argv[1:])}"
  try:
    if _MODE.value == "sweep":
      filename = config_flags.get_config_filename(flags.FLAGS["config"])
      if _SWEEP_SHARD.value is not None:
        share = shares.parse_share(_SWEEP_SHARD.value)
      else:  # Inside a SLURM array, the task's own share; elsewhere the whole sweep.
        share = shares.array_share(*(os.environ.get(f"SLURM_ARRAY_TASK_{name}")
                                    for name in ("ID", "COUNT", "MIN", "MAX", "STEP")))
      sweep.run_sweep(_CONFIG.value, _WORKDIR.value, sweep.load_sweep(filename), title=filename,
                      allow_config_change=_ALLOW_CONFIG_CHANGE.value, share=share)
    else:
      state, _ = train.train_and_evaluate(
          _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
      )
      training.after_training(_CONFIG.value, _WORKDIR.value, state)
  except checkpoints.Stopped as e:
    print(f"mnist_jax: {e}; {resume}", file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:
    print(f"mnist_jax: interrupted; the last checkpoint is kept; {resume}", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


def _eval() -> None:
  from mnist_jax import pipelines  # pylint: disable=import-outside-toplevel
  from mnist_jax.studies import predict  # pylint: disable=import-outside-toplevel

  # A labelled folder's images are framed by workers, forked before JAX starts (run/workers.py).
  with workers.forked((os.cpu_count() or 1) if _IMAGES_DIR.value else 0) as pool:
    model = predict.load(_WORKDIR.value, _CHECKPOINT.value)
    # Fitted first: a run without a validation split is refused before any other work.
    temperature = predict.validation_temperature(model) if _CALIBRATED.value else None
    if _IMAGES_DIR.value:
      _eval_folder(model, temperature, pool)
      return
  metrics = pipelines.evaluate_test_split(model.config, model.state)
  show = lambda values: repr(values.item()) if values.ndim == 0 else str(values.tolist())  # Seeds.
  print(f"checkpoint {model.step} (epoch {model.meta['epoch']})  test_loss {show(metrics['loss'])}  "
        f"test_accuracy {show(metrics['accuracy'])}  test_examples {int(metrics['count'].max())}")
  if temperature is not None:
    (nll, ece), (scaled_nll, scaled_ece) = predict.calibration_on_test_split(
        model, [1.0, temperature[0]])
    print(f"temperature {temperature[0]:.4f} (fitted on {temperature[1]})  test_nll {nll:.4f} -> "
          f"{scaled_nll:.4f}  test_ece {ece:.4f} -> {scaled_ece:.4f}")


def _eval_folder(model: Any, temperature: tuple[float, str] | None, pool: Any) -> None:
  from mnist_jax.report import studies  # pylint: disable=import-outside-toplevel  # matplotlib.
  from mnist_jax.studies import folders  # pylint: disable=import-outside-toplevel

  evaluation = folders.evaluate_folder(model, _IMAGES_DIR.value, temperature, pool)
  report = studies.write_folder_report(_WORKDIR.value, model, evaluation)
  result = evaluation.results
  seeds = result["accuracy_per_seed"]
  per_seed = f" (per seed: {', '.join(f'{a:.4f}' for a in seeds)})" if len(seeds) > 1 else ""
  calibrated = f"  temperature {result['temperature']:.4f}" if temperature else ""
  print(f"checkpoint {model.step}  {result['images']} images  accuracy {result['accuracy']:.4f}"
        f"{per_seed}  nll {result['nll']:.4f}  ece {result['ece']:.4f}{calibrated}  "
        f"{result['images_per_s_predicting']:.0f} images/s\nreport: {report}")


def _attack() -> None:
  from mnist_jax.report import studies  # pylint: disable=import-outside-toplevel
  from mnist_jax.studies import attacks, predict  # pylint: disable=import-outside-toplevel

  try:
    eps = [float(e) for e in _EPS.value]
  except ValueError:
    sys.exit(f"mnist_jax: --eps must be numbers, got {','.join(_EPS.value)}")
  if not eps:
    sys.exit("mnist_jax: --eps needs at least one value, e.g. --eps=0,0.1,0.2")
  if not all(0.0 <= e <= 1.0 for e in eps):
    sys.exit(f"mnist_jax: --eps must be in [0, 1] (pixels / 255), got {','.join(_EPS.value)}")
  model = predict.load(_WORKDIR.value, _CHECKPOINT.value)
  result = attacks.attack_test_split(model, eps, _PGD_STEPS.value, _ATTACK_EXAMPLES.value)
  report = studies.write_attack_report(
      _WORKDIR.value, result, predict.dataset_trained_on(model.meta).class_names, model.step)
  print(f"checkpoint {model.step}  clean accuracy {result.clean_accuracy:.4f}")
  for e, fgsm, pgd in zip(result.eps, result.fgsm_accuracy, result.pgd_accuracy):
    print(f"eps {e:<5g}  fgsm {fgsm:.4f}  pgd {pgd:.4f}")
  print(f"report: {report}")


def _predict() -> int:
  """Prints `path  digit  probability` per image; a file that fails is one line on stderr."""
  if not _IMAGES.value:
    sys.exit("mnist_jax: --images is required with --mode=predict, e.g. --images=a.png,b.jpg")
  from mnist_jax.studies import digits, predict  # pylint: disable=import-outside-toplevel

  with predict.framing_files(_WORKDIR.value, _IMAGES.value) as framed:
    model = predict.load(_WORKDIR.value, _CHECKPOINT.value)
    class_names = predict.dataset_trained_on(model.meta).class_names
    temperature = predict.validation_temperature(model)[0] if _CALIBRATED.value else 1.0
    failed = 0
    for i, path in enumerate(_IMAGES.value):
      try:
        probs = predict.probabilities(model, [framed(model, i)], preprocess=False,
                                      temperature=temperature)[0]
      except digits.ImageError as e:
        print(f"mnist_jax: {path}: {e}", file=sys.stderr, flush=True)
        failed += 1
        continue
      print(f"{path}  {class_names[probs.argmax()]}  {probs.max():.4f}", flush=True)
  return 1 if failed else 0


def _explore() -> None:
  from mnist_jax.report import explore  # pylint: disable=import-outside-toplevel

  explore.explore(_CONFIG.value, _WORKDIR.value)


def _report() -> None:
  from mnist_jax.report import training  # pylint: disable=import-outside-toplevel

  training.report_workdir(_WORKDIR.value)


_MODES = {"train": _train, "sweep": _train, "eval": _eval, "predict": _predict,
          "attack": _attack, "explore": _explore, "report": _report}


def main(argv: list[str], whole_process: bool = False) -> None:
  """The command. With `whole_process` (`python -m mnist_jax.main`, not a test's call), work that
  needs no JAX goes to forked worker processes (run/workers.py: a mode that draws starts those of
  drawing.py; predict and folder evaluation frame their images in some), and what is imported so
  far is left out of the garbage collector's passes."""
  del argv  # _parse_flags refused any.
  logging.set_verbosity(logging.ERROR)
  parallel.set_xla_flags()
  if _JAX_CACHE_DIR.value:
    parallel.use_compilation_cache(_JAX_CACHE_DIR.value)
  if _MODE.value in ("train", "explore", "sweep") and _CONFIG.value is None:
    sys.exit("mnist_jax: --config is required, e.g. --config=experiments/seed_mlp.py")
  if not _WORKDIR.value:
    sys.exit("mnist_jax: --workdir is required, e.g. --workdir=runs/seed_mlp")
  for flag, modes in _MODE_FLAGS:  # Given to another mode, it would be ignored.
    if flag.present and _MODE.value not in modes:
      sys.exit(f"mnist_jax: --{flag.name} is for --mode={' or '.join(modes)}, not "
               f"--mode={_MODE.value}")
  if _IMAGES_DIR.present and not _IMAGES_DIR.value.strip():
    sys.exit("mnist_jax: --images_dir is empty; give a folder with a subfolder of images per "
             "class, or leave the flag out to evaluate the test split")
  cluster = (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID, _MULTIHOST_TIMEOUT)
  if not _MULTIHOST.value and any(flag.present for flag in cluster):
    sys.exit(f"mnist_jax: --{next(f for f in cluster if f.present).name} needs --multihost")
  try:
    if _MULTIHOST.value:
      parallel.initialize_distributed(*(flag.value for flag in cluster))
    if whole_process:
      # What is imported so far (JAX) lives as long as the process: the collector, here and in
      # the workers forked below, need not walk it again on each full pass.
      gc.freeze()
    draws = _MODE.value in ("train", "sweep", "report", "explore", "attack") or _IMAGES_DIR.present
    with (workers.allowed() if whole_process and not _MULTIHOST.value
          else contextlib.nullcontext()), (drawing.workers() if draws else contextlib.nullcontext()):
      status = _MODES[_MODE.value]()
  except errors.UserError as e:
    sys.exit(f"mnist_jax: {e}")
  except OSError as e:  # The workdir or another path: read-only, full, gone.
    sys.exit(f"mnist_jax: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
  if status:
    sys.exit(status)


if __name__ == "__main__":
  quiet.quiet_library_errors()
  with interrupts.no_teardown():
    app.run(functools.partial(main, whole_process=True), flags_parser=_parse_flags)
