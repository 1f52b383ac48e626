"""Finding the digit in a photo of a page as a person would (studies/ink.py via `mnist_like`)."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import REPO
from mnist_jax.studies import digits
from mnist_jax.tools import photos

COUNT = 20


def _correlation(a, b):
  a, b = (np.asarray(x, np.float64).ravel() for x in (a, b))
  a, b = a - a.mean(), b - b.mean()
  return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _rendered(digit_HW, condition, seed):
  image_HW = photos.render(digit_HW, condition, seed)
  if condition == "jpeg_q10":
    buffer = io.BytesIO()
    Image.fromarray(image_HW).save(buffer, "JPEG", quality=10)
    image_HW = np.asarray(Image.open(buffer))
  return image_HW


@pytest.mark.parametrize("condition", [c for c in photos.CONDITIONS if c != "plain"])
def test_a_digit_under_hard_light_frames_and_edges_is_framed_as_on_plain_paper(mnist_test,
                                                                                condition):
  """Each hard rendering gives the 28x28 digit the plain one gives (before: a filled square, or
  an outline of the shadow, for light, shadows, texture, frames and page edges)."""
  correlations = []
  for i in range(COUNT):
    digit_HW = mnist_test.images_NHWC[i, ..., 0]
    plain = digits.mnist_like(_rendered(digit_HW, "plain", i))
    correlations.append(_correlation(plain, digits.mnist_like(_rendered(digit_HW, condition, i))))
  # Thick strokes and 28 pixels change the digit itself, the others only its surroundings.
  assert np.mean(correlations) >= (0.85 if condition in ("marker", "low_resolution") else 0.93)
  assert min(correlations) >= 0.7, correlations


def _two_on_grey(border=0, ink=40.0, paper=170.0):
  """A dark "2" on grey paper, 120x120, with a black border `border` pixels wide."""
  image = Image.new("L", (120, 120), int(paper))
  draw = ImageDraw.Draw(image)
  draw.arc((35, 20, 85, 70), 180, 40, fill=int(ink), width=7)
  draw.line((82, 55, 38, 98), fill=int(ink), width=7)
  draw.line((38, 98, 88, 98), fill=int(ink), width=7)
  image_HW = np.asarray(image, np.float32).copy()
  if border:
    image_HW[:border], image_HW[-border:] = 0.0, 0.0
    image_HW[:, :border], image_HW[:, -border:] = 0.0, 0.0
  return image_HW


@pytest.mark.parametrize("border", [1, 2, 4])
def test_a_black_border_is_not_ink_and_the_paper_sets_the_polarity(border):
  """The issue's example: a dark 2 on grey paper with a 1-pixel black border (before: the border
  made the paper ink, and the model saw a filled square)."""
  plain = digits.mnist_like(_two_on_grey())
  framed = digits.mnist_like(_two_on_grey(border))
  assert _correlation(plain, framed) > 0.99
  assert np.mean(framed > 0) < 0.4  # Not a filled square.
  light_on_dark = digits.mnist_like(255.0 - _two_on_grey(border))  # Chalk on a board.
  assert _correlation(plain, light_on_dark) > 0.99


def test_specks_a_drawn_box_and_a_ruled_line_through_the_page_are_not_the_digit():
  plain = digits.mnist_like(_two_on_grey())
  marked = _two_on_grey()
  marked[5:8, 100:103] = marked[110:112, 10:12] = 40.0  # Specks.
  assert _correlation(plain, digits.mnist_like(marked)) > 0.99
  boxed = _two_on_grey()
  boxed[8:10, 8:112] = boxed[110:112, 8:112] = boxed[8:112, 8:10] = boxed[8:112, 110:112] = 30.0
  assert _correlation(plain, digits.mnist_like(boxed)) > 0.99
  ruled = _two_on_grey()
  ruled[:, 60] = 30.0  # Crosses the digit: erased where it crosses the page, the digit kept.
  assert _correlation(plain, digits.mnist_like(ruled)) > 0.75  # Stubs of it move the 2 a pixel.


def test_a_digit_in_pieces_keeps_its_pieces_and_a_tight_crop_keeps_the_digit():
  """A 5 whose bar is lifted off the stem is one digit; a digit cut by the image's border, with
  nothing else on the page, is still the digit."""
  image = Image.new("L", (100, 100), 230)
  draw = ImageDraw.Draw(image)
  draw.line((40, 22, 72, 22), fill=20, width=6)  # The bar, a gap of a few pixels from the stem.
  draw.line((36, 28, 34, 50), fill=20, width=6)
  draw.arc((30, 42, 70, 82), 270, 160, fill=20, width=6)
  five = np.asarray(image, np.float32)
  framed = digits.mnist_like(five)
  rows = np.flatnonzero(framed.any(1))
  assert rows[-1] - rows[0] + 1 >= 19  # The bar and the bowl, 20 pixels high together.
  assert framed[rows[0]:rows[0] + 3].sum() > 0.1 * framed.sum() / 7  # The bar is there.
  tight = _two_on_grey()[17:102, 31:92]  # Cropped to the digit's strokes.
  assert _correlation(digits.mnist_like(_two_on_grey()), digits.mnist_like(tight)) > 0.95


@pytest.mark.parametrize("page", ["blank", "framed", "light_falling", "shadow", "texture", "table"])
def test_a_page_without_a_digit_is_refused_not_guessed(page):
  rng = np.random.default_rng(0)
  blank = np.ones((160, 160), np.float32)
  image_HW = {
      "blank": lambda: photos.CONDITIONS["plain"][1](blank, rng),
      "framed": lambda: photos.CONDITIONS["frame_4px"][1](blank, rng),
      "light_falling": lambda: photos.CONDITIONS["light_falling"][1](blank, rng),
      "shadow": lambda: photos.CONDITIONS["shadow"][1](blank, rng),
      "texture": lambda: photos.CONDITIONS["texture"][1](blank, rng),
      "table": lambda: photos.CONDITIONS["page_edge"][1](blank, rng),
  }[page]()
  with pytest.raises(digits.ImageError, match="^no digit found: "):
    digits.mnist_like(np.clip(image_HW, 0, 255))


@pytest.mark.slow
def test_the_renderings_command_writes_each_condition_and_one_table(two_epoch_run, tmp_path):
  out = tmp_path / "photos"
  result = subprocess.run(
      [sys.executable, "-m", "mnist_jax.tools.photos", f"--workdir={two_epoch_run}",
       "--examples=3", f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr
  saved = json.loads((out / "results.json").read_text())
  assert list(saved) == list(photos.CONDITIONS)
  for condition, scores in saved.items():
    assert scores["images"] == len(list((out / condition).glob("*/*"))) == 3
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["refused"] + scores["other_skipped"] <= 3
  table = (out / "results.md").read_text()
  assert table.startswith("| condition | accuracy | vs plain | refused (no digit) |")
  assert table in result.stdout and len(table.splitlines()) == 2 + len(photos.CONDITIONS)
