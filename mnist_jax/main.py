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
import logging as std_logging
import os
import shlex
import signal
import sys
from typing import Any


def _interrupted(signum: int, frame: Any) -> None:
  del frame
  print("mnist_jax: interrupted", file=sys.stderr, flush=True)
  raise SystemExit(128 + signum)


if __name__ == "__main__":
  # Ctrl-C ends the command with one line, from here on: the imports below take a second.
  # Training stops at the end of an epoch instead (checkpoints.py), and restores this after.
  signal.signal(signal.SIGINT, _interrupted)

from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from mnist_jax import errors  # pylint: disable=wrong-import-position
from mnist_jax.run import parallel  # pylint: disable=wrong-import-position

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
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", 10, "attack: PGD's steps, the first being FGSM's.",
                                  lower_bound=1)
_ATTACK_EXAMPLES = flags.DEFINE_integer(
    "attack_examples", None, "attack: only the first this many test images.", lower_bound=1)
# The modes each of these flags is for.
_MODE_FLAGS = [
    (_CHECKPOINT, ("eval", "predict", "attack")), (_IMAGES, ("predict",)),
    (_IMAGES_DIR, ("eval",)), (_CALIBRATED, ("eval", "predict")), (_EPS, ("attack",)),
    (_PGD_STEPS, ("attack",)), (_ATTACK_EXAMPLES, ("attack",)),
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


def _one_line(error: Exception) -> str:
  """The gist of an exception from absl or ml_collections, on one line."""
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
  """absl's parsing, and loading the config file, with any mistake told in one line."""
  try:
    remaining = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # A file that failed to load raises only when it is first read.
  except Exception as e:  # A config file can fail in any way; each is the user's to fix.
    sys.exit(f"mnist_jax: bad flags: {_one_line(e)}")
  if len(remaining) > 1:
    sys.exit(f"mnist_jax: unexpected arguments: {' '.join(remaining[1:])}")
  return remaining


def _train() -> None:
  from mnist_jax import train  # pylint: disable=import-outside-toplevel
  from mnist_jax.report import training  # pylint: disable=import-outside-toplevel
  from mnist_jax.run import checkpoints  # pylint: disable=import-outside-toplevel
  from mnist_jax.tools import sweep  # pylint: disable=import-outside-toplevel

  resume = f"resume with: python -m mnist_jax.main {shlex.join(sys.argv[1:])}"
  try:
    if _MODE.value == "sweep":
      filename = config_flags.get_config_filename(flags.FLAGS["config"])
      sweep.run_sweep(_CONFIG.value, _WORKDIR.value, sweep.load_sweep(filename), title=filename,
                      allow_config_change=_ALLOW_CONFIG_CHANGE.value)
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
  from mnist_jax import data, pipelines  # pylint: disable=import-outside-toplevel
  from mnist_jax.studies import calibration, folders, predict  # pylint: disable=import-outside-toplevel

  model = predict.load(_WORKDIR.value, _CHECKPOINT.value)
  # Fitted first: a run without a validation split is refused before any other work.
  temperature, fitted_on = folders.fit_temperature(model) if _CALIBRATED.value else (1.0, "")
  if _IMAGES_DIR.value:
    result = folders.evaluate_folder(model, _IMAGES_DIR.value, _WORKDIR.value,
                                     (temperature, fitted_on) if _CALIBRATED.value else None)
    seeds = result["accuracy_per_seed"]
    per_seed = f" (per seed: {', '.join(f'{a:.4f}' for a in seeds)})" if len(seeds) > 1 else ""
    calibrated = f"  temperature {result['temperature']:.4f}" if _CALIBRATED.value else ""
    print(f"checkpoint {model.step}  {result['images']} images  accuracy {result['accuracy']:.4f}"
          f"{per_seed}  nll {result['nll']:.4f}  ece {result['ece']:.4f}{calibrated}  "
          f"{result['images_per_s_predicting']:.0f} images/s\nreport: {result['report']}")
    return
  metrics = pipelines.evaluate_test_split(model.config, model.state)
  show = lambda values: repr(values.item()) if values.ndim == 0 else str(values.tolist())  # Seeds.
  print(f"checkpoint {model.step} (epoch {model.meta['epoch']})  test_loss {show(metrics['loss'])}  "
        f"test_accuracy {show(metrics['accuracy'])}  test_examples {int(metrics['count'].max())}")
  if _CALIBRATED.value:
    test = data.load_split(model.config.dataset, "test", model.config.data_dir)
    log_probs_NC, _ = folders.log_probabilities(model, test.images_NHWC)
    scores = [(calibration.negative_log_likelihood(log_probs_NC, test.labels_N, t),
               calibration.expected_calibration_error(
                   calibration.probabilities(log_probs_NC, t), test.labels_N))
              for t in (1.0, temperature)]
    print(f"temperature {temperature:.4f} (fitted on {fitted_on})  test_nll {scores[0][0]:.4f} -> "
          f"{scores[1][0]:.4f}  test_ece {scores[0][1]:.4f} -> {scores[1][1]:.4f}")


def _attack() -> None:
  from mnist_jax.studies import folders, predict  # pylint: disable=import-outside-toplevel

  try:
    eps = [float(e) for e in _EPS.value]
  except ValueError:
    sys.exit(f"mnist_jax: --eps must be numbers, got {','.join(_EPS.value)}")
  if not eps:
    sys.exit("mnist_jax: --eps needs at least one value, e.g. --eps=0,0.1,0.2")
  if not all(0.0 <= e <= 1.0 for e in eps):
    sys.exit(f"mnist_jax: --eps must be in [0, 1] (pixels / 255), got {','.join(_EPS.value)}")
  model = predict.load(_WORKDIR.value, _CHECKPOINT.value)
  result = folders.attack(model, _WORKDIR.value, eps, _PGD_STEPS.value, _ATTACK_EXAMPLES.value)
  print(f"checkpoint {model.step}  clean accuracy {result.clean_accuracy:.4f}")
  for e, fgsm, pgd in zip(result.eps, result.fgsm_accuracy, result.pgd_accuracy):
    print(f"eps {e:<5g}  fgsm {fgsm:.4f}  pgd {pgd:.4f}")
  print(f"report: {os.path.join(_WORKDIR.value, folders.ATTACK_DIR, 'report.md')}")


def _predict() -> int:
  """Prints `path  digit  probability` per image; a file that fails is one line on stderr."""
  if not _IMAGES.value:
    sys.exit("mnist_jax: --images is required with --mode=predict, e.g. --images=a.png,b.jpg")
  from mnist_jax.studies import digits, predict  # pylint: disable=import-outside-toplevel

  model = predict.load(_WORKDIR.value, _CHECKPOINT.value)
  class_names = predict.dataset_info(model.meta).class_names
  temperature = 1.0
  if _CALIBRATED.value:
    from mnist_jax.studies import folders  # pylint: disable=import-outside-toplevel

    temperature = folders.fit_temperature(model)[0]
  failed = 0
  for path in _IMAGES.value:
    try:
      probs = predict.probabilities(model, [digits.load_image(path)], temperature=temperature)[0]
    except digits.ImageError as e:
      print(f"mnist_jax: {path}: {e}", file=sys.stderr, flush=True)
      failed += 1
      continue
    print(f"{path}  {class_names[probs.argmax()]}  {probs.max():.4f}", flush=True)
  return 1 if failed else 0


def _quiet_library_errors() -> None:
  """Keeps orbax's own reports of a failure it raises off the terminal; what it raises becomes
  one line (see checkpoints.py). Without this a full disk or a damaged checkpoint prints
  hundreds of lines of tracebacks: orbax logs each error it raises, its unfinished asyncio tasks
  log theirs, and its coroutines left unfinished and callbacks that arrive after the event loop
  closed print one each."""
  logging.get_absl_logger().addFilter(lambda record: "/orbax/" not in record.pathname)
  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)  # No asyncio of our own.
  hook = sys.unraisablehook

  def unraisable(info: Any) -> None:
    closed_loop = (isinstance(info.exc_value, RuntimeError)
                   and str(info.exc_value) == "Event loop is closed")
    orbax_coroutine = "/orbax/" in getattr(getattr(info.object, "cr_code", None), "co_filename", "")
    if not (closed_loop or orbax_coroutine):
      hook(info)

  sys.unraisablehook = unraisable


def main(argv: list[str]) -> None:
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
    if _MODE.value in ("train", "sweep"):
      _train()
    elif _MODE.value == "eval":
      _eval()
    elif _MODE.value == "predict":
      sys.exit(_predict())
    elif _MODE.value == "attack":
      _attack()
    elif _MODE.value == "explore":
      from mnist_jax.report import explore  # pylint: disable=import-outside-toplevel

      explore.explore(_CONFIG.value, _WORKDIR.value)
    else:
      from mnist_jax.report import training  # pylint: disable=import-outside-toplevel

      training.report_workdir(_WORKDIR.value)
  except errors.UserError as e:
    sys.exit(f"mnist_jax: {e}")
  except OSError as e:  # The workdir or another path: read-only, full, gone.
    sys.exit(f"mnist_jax: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))


if __name__ == "__main__":
  _quiet_library_errors()
  app.run(main, flags_parser=_parse_flags)
