"""Test digits as people photograph them: hard renderings of the MNIST test split, scored.

  python -m mnist_jax.tools.photos --workdir=runs/seed_mlp                  # 200 digits each
  python -m mnist_jax.tools.photos --workdir=runs/seed_mlp --examples=1000

Each of the first `--examples` test digits is drawn as dark ink on light paper (a 160-pixel page,
the 28x28 image scaled to 112 pixels) under each of `CONDITIONS`: uneven light, a shadow,
vignetting, paper texture, ruled and squared paper, black frames, a page edge on a dark table, a
scan, low resolution, thick marker strokes, heavy JPEG. Each condition is written as a labelled
folder (`<out>/<condition>/<label>/<i>.png`) and scored as `--mode=eval --images_dir` scores one
(`folders.load_folder`, then the model); the table (`<out>/results.md`, `results.json`) gives each
condition's accuracy, counting the images refused as holding no digit as wrong, and how many
were refused. Like `main.py`, this command owns its flags; the renderings are the same on every
run (seeded).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from typing import Callable

import numpy as np
from absl import app, flags, logging
from PIL import Image
from scipy import ndimage

PAGE = 160
DIGIT = 112  # The 28x28 test image, scaled 4x: the digit's 20-pixel box becomes about 80.
PAPER, INK = 1.0, 0.12  # Reflectances.


def _page(digit_HW: np.ndarray, rng: np.random.Generator, thick: bool = False) -> np.ndarray:
  """Reflectance [PAGE, PAGE] in 0..1: the digit's ink on white paper, a little off centre."""
  ink = Image.fromarray(digit_HW.astype(np.float32) / 255.0, "F")
  ink_HW = np.asarray(ink.resize((DIGIT, DIGIT), Image.Resampling.BICUBIC)).clip(0.0, 1.0)
  if thick:  # A marker: strokes about twice as wide.
    ink_HW = ndimage.grey_dilation(ink_HW, footprint=_disk(4))
  page_HW = np.zeros((PAGE, PAGE), np.float32)
  top, left = ((PAGE - DIGIT) // 2 + rng.integers(-10, 11, 2))
  page_HW[top:top + DIGIT, left:left + DIGIT] = ink_HW
  return PAPER - (PAPER - INK) * page_HW


def _disk(radius: int) -> np.ndarray:
  y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  return x * x + y * y <= radius * radius


def _plain(reflectance_HW, rng):
  del rng
  return 225.0 * reflectance_HW


def _light_falling(reflectance_HW, rng):
  del rng
  return np.linspace(235.0, 110.0, PAGE)[None, :] * reflectance_HW


def _shadow(reflectance_HW, rng):
  del rng
  shade_W = np.where(np.arange(PAGE) < 0.6 * PAGE, 0.45, 1.0)
  return 230.0 * ndimage.gaussian_filter1d(shade_W, 1.5)[None, :] * reflectance_HW


def _vignette(reflectance_HW, rng):
  del rng
  y, x = np.mgrid[:PAGE, :PAGE] - (PAGE - 1) / 2
  return 235.0 * (1 - 0.6 * (x * x + y * y) / (PAGE * PAGE / 2)) * reflectance_HW


def _ruled(spacing, across):
  def render(reflectance_HW, rng):
    image_HW = _plain(reflectance_HW, rng)
    image_HW[spacing // 2::spacing] = np.minimum(image_HW[spacing // 2::spacing], 160.0)
    if across:  # Squared paper.
      image_HW[:, spacing // 2::spacing] = np.minimum(image_HW[:, spacing // 2::spacing], 160.0)
    return image_HW
  return render


def _texture(reflectance_HW, rng):
  fibres_HW = ndimage.gaussian_filter(rng.normal(size=reflectance_HW.shape), 4.0)
  fibres_HW *= 0.08 / fibres_HW.std()
  return 200.0 * reflectance_HW * (1 + fibres_HW) + rng.normal(0.0, 8.0, reflectance_HW.shape)


def _frame(width):
  def render(reflectance_HW, rng):
    image_HW = _plain(reflectance_HW, rng)
    image_HW[:width], image_HW[-width:] = 10.0, 10.0
    image_HW[:, :width], image_HW[:, -width:] = 10.0, 10.0
    return image_HW
  return render


def _page_edge(reflectance_HW, rng):
  """The page photographed on a dark table, turned a little: the table along two sides."""
  page = Image.fromarray(_plain(reflectance_HW, rng).astype(np.float32), "F")
  page = page.rotate(float(rng.uniform(-5.0, 5.0)), Image.Resampling.BILINEAR, fillcolor=35.0)
  table = Image.new("F", (PAGE, PAGE), 35.0)
  table.paste(page, (int(rng.integers(12, 24)), -int(rng.integers(12, 24))))
  return np.asarray(table)


def _scan(reflectance_HW, rng):
  blurred_HW = ndimage.gaussian_filter(_plain(reflectance_HW, rng), 1.2)
  return blurred_HW + rng.normal(0.0, 5.0, blurred_HW.shape)


def _low_resolution(reflectance_HW, rng):
  page = Image.fromarray(_plain(reflectance_HW, rng).astype(np.float32), "F")
  return np.asarray(page.resize((28, 28), Image.Resampling.BOX))


CONDITIONS: dict[str, tuple[str, Callable[..., np.ndarray], bool]] = {
    # name: (what it is, how it is lit and taken, thick strokes)
    "plain": ("even light, 225 on the paper", _plain, False),
    "light_falling": ("light falling from 235 to 110 across the page", _light_falling, False),
    "shadow": ("a shadow (45% of the light) over the left 60%", _shadow, False),
    "vignette": ("light falling from the centre to 95 in the corners", _vignette, False),
    "texture": ("paper texture and grain", _texture, False),
    "ruled": ("ruled paper, a line every 20 pixels", _ruled(20, across=False), False),
    "squared": ("squared paper, 16-pixel squares", _ruled(16, across=True), False),
    "frame_1px": ("a 1-pixel black frame around the page", _frame(1), False),
    "frame_4px": ("a 4-pixel black frame around the page", _frame(4), False),
    "page_edge": ("the page turned on a dark table, the table along two sides", _page_edge, False),
    "scan": ("a scan: blurred (sigma 1.2 px) and noisy", _scan, False),
    "low_resolution": ("the page at 28x28 pixels", _low_resolution, False),
    "marker": ("thick marker strokes", _plain, True),
    "jpeg_q10": ("JPEG at quality 10", _plain, False),
}


def render(digit_HW: np.ndarray, condition: str, seed: int) -> np.ndarray:
  """A 28x28 test digit drawn on paper under `condition`: uint8 [H, W]."""
  rng = np.random.default_rng(seed)
  _, light, thick = CONDITIONS[condition]
  return np.round(light(_page(digit_HW, rng, thick), rng)).clip(0, 255).astype(np.uint8)


def write_conditions(out: str, images_NHW: np.ndarray, labels_N: np.ndarray) -> dict[str, str]:
  """Every condition as a labelled folder under `out`; returns each condition's folder."""
  folders = {}
  for condition in CONDITIONS:
    folder = folders[condition] = os.path.join(out, condition)
    shutil.rmtree(folder, ignore_errors=True)  # A rerun replaces a condition, whole.
    for i, (digit_HW, label) in enumerate(zip(images_NHW, labels_N)):
      os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
      image = Image.fromarray(render(digit_HW, condition, seed=i))
      if condition == "jpeg_q10":
        image.save(os.path.join(folder, str(label), f"{i}.jpg"), quality=10)
      else:
        image.save(os.path.join(folder, str(label), f"{i}.png"))
  return folders


def score(model, folder: str, pool=None) -> dict[str, float | int]:
  """A labelled folder scored as `--mode=eval --images_dir` scores it (`pool`: workers that frame
  its images); refusals count as wrong."""
  from mnist_jax.studies import folders, predict  # pylint: disable=import-outside-toplevel

  total = sum(len(files) for _, _, files in os.walk(folder))
  with contextlib.redirect_stderr(io.StringIO()):  # One warning line per refused image.
    try:
      images_NHW, labels_N, _, skipped = folders.load_folder(
          folder, predict.dataset_trained_on(model.meta), pool)
    except folders.StudyError:
      return {"images": total, "accuracy": 0.0, "refused": total, "other_skipped": 0}
  log_probs_NC, _ = predict.log_probabilities_and_logits(model, images_NHW[..., None])
  refused = sum("no digit found" in entry for entry in skipped)
  return {"images": total, "accuracy": float(np.sum(log_probs_NC.argmax(1) == labels_N)) / total,
          "refused": refused, "other_skipped": len(skipped) - refused}


def table(results: dict[str, dict[str, float | int]]) -> str:
  """The results as a Markdown table."""
  plain = results["plain"]["accuracy"]
  rows = ["| condition | accuracy | vs plain | refused (no digit) |", "|---|---|---|---|"]
  for condition, result in results.items():
    rows.append(f"| {condition} ({CONDITIONS[condition][0]}) | {100 * result['accuracy']:.1f}% | "
                f"{100 * (result['accuracy'] - plain):+.1f} | {result['refused']} |")
  return "\n".join(rows) + "\n"


def main(argv: list[str]) -> None:
  del argv
  from mnist_jax import errors  # pylint: disable=import-outside-toplevel

  logging.set_verbosity(logging.ERROR)  # As main.py: orbax's progress lines are not for people.

  try:
    _main()
  except errors.UserError as e:
    sys.exit(f"mnist_jax: {e}")


def _main() -> None:
  from mnist_jax import data  # pylint: disable=import-outside-toplevel
  from mnist_jax.run import rundir, workers  # pylint: disable=import-outside-toplevel
  from mnist_jax.studies import predict  # pylint: disable=import-outside-toplevel

  values = flags.FLAGS
  if not values.workdir:
    sys.exit("mnist_jax: --workdir is required: a trained run's directory")
  # Workers that frame the renderings, forked before JAX starts (run/workers.py).
  with workers.forked(os.cpu_count() or 1) as pool:
    model = predict.load(values.workdir, values.checkpoint)
    if model.config.dataset != "mnist":
      sys.exit(f"mnist_jax: the renderings are of MNIST digits; this run is of "
               f"{model.config.dataset}")
    test = data.load_split("mnist", "test", model.config.data_dir)
    count = min(values.examples, len(test))
    out = values.out or os.path.join(values.workdir, "photos")
    folders = write_conditions(out, test.images_NHWC[:count, ..., 0], test.labels_N[:count])
    results = {}
    for condition, folder in folders.items():
      results[condition] = score(model, folder, pool)
      print(f"{condition:15s} accuracy {results[condition]['accuracy']:.4f}  "
            f"refused {results[condition]['refused']}", flush=True)
  rundir.write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2) + "\n")
  rundir.write_text(os.path.join(out, "results.md"), table(results))
  print(table(results), end="")


def _define_flags() -> None:
  # Only when run as a command: main.py, which tests import beside this module, has --workdir too.
  flags.DEFINE_string("workdir", None, "A trained run's directory.")
  flags.DEFINE_integer("examples", 200, "The first this many test digits, rendered under each "
                       "condition.", lower_bound=1, upper_bound=10_000)
  flags.DEFINE_string("out", None, "Where the renderings and the table go (default: "
                      "<workdir>/photos).")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest', or a step number.")


if __name__ == "__main__":
  from mnist_jax.run import workers  # pylint: disable=ungrouped-imports

  _define_flags()
  with workers.allowed():  # A process of its own, whose JAX has not started.
    app.run(main)
