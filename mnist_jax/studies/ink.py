"""Where a digit's ink is in a photo or scan of a page, as a person would see it.

  ink_HW = ink.digit_ink(gray_HW)   # float32, 0..255, zero away from the digit

The page's light is evened out: its paper level is estimated around the strokes (a grey closing
as wide as half the page, which follows gradients, shadows and page edges wider than that, and
fills every stroke narrower), and each pixel is divided by it. The paper is the majority: of dark
ink on light paper and light ink on dark paper, the reading whose ink covers fewer pixels wins,
whatever the border looks like. Of the marks that stand out, the ones along the image's border
(frames, page edges, a table around the page), thin lines across the whole page and boxes drawn
around the rest are not the digit; the digit is the heaviest remaining mark and the marks of
comparable weight next to it; specks are left out. Where nothing is left, `NoDigit` says why.

scipy is imported by the functions that use it: every command that trains imports this module (for
its report, through predict.py), and most never look at a photo.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mnist_jax import errors

# The longest side is resampled into this range before the digit is looked for: enough to keep
# the strokes of a 20-pixel digit apart, small enough for the filters to stay quick.
ANALYSIS_SIDES = (96, 256)
# Ink must stand out from the paper by this many grey levels somewhere.
MIN_CONTRAST = 32.0
# Ink below this fraction of the strongest is paper (MNIST's own faint edges are kept later).
_MARK_THRESHOLD = 0.2
# A mark lighter than this fraction of the digit's heaviest mark is a speck.
_SPECK = 0.08
# Marks this close to the digit's box (a fraction of its longer side) belong to it: a 5's bar.
_NEAR = 0.25


class NoDigit(errors.UserError):
  """No digit on the page, and why."""


def digit_ink(gray_HW: np.ndarray) -> np.ndarray:
  """The digit's ink in a grayscale image (float, 0..255 as stored): float32 in 0..255 at the
  analysis size (`ANALYSIS_SIDES`), 255 at the digit's strongest strokes, zero away from it."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel  # See the docstring.
  page_HW = _analysis_size(np.asarray(gray_HW, np.float32))
  side = max(page_HW.shape)
  page_HW = ndimage.gaussian_filter(page_HW, side / 200)  # Grain is not ink.
  if _light_ink(page_HW):
    page_HW = 255.0 - page_HW  # From here on, dark ink on light paper.
  paper_HW = ndimage.minimum_filter(ndimage.maximum_filter(page_HW, side // 2), side // 2)
  if np.max(paper_HW - page_HW) < MIN_CONTRAST:
    raise NoDigit("the image is almost uniform")
  ink_HW = np.clip((paper_HW - page_HW) / np.maximum(paper_HW, 1.0), 0.0, 1.0)
  noise = float(np.median(ink_HW))  # Most of the page is paper: its grain and texture.
  marks_HW = ink_HW > max(_MARK_THRESHOLD * np.percentile(ink_HW, 99.9), 3 * noise, 1e-3)
  marks_HW &= ~_lines_across(marks_HW, thickness=max(1, round(side / 25)))
  digit_HW = _main_marks(marks_HW, ink_HW, side)
  digit_HW = ndimage.binary_dilation(digit_HW, np.ones((3, 3), bool),
                                     iterations=max(1, round(side / 80)))
  ink_HW = np.where(digit_HW, np.clip(ink_HW - noise, 0.0, None), 0.0)
  if float(np.max((paper_HW - page_HW) * digit_HW)) < MIN_CONTRAST:
    raise NoDigit("its marks stand out from the paper by fewer than "
                  f"{MIN_CONTRAST:g} grey levels")
  strongest = np.percentile(ink_HW[digit_HW], 99)
  return (ink_HW * (255.0 / strongest)).clip(0.0, 255.0).astype(np.float32)


def _light_ink(page_HW: np.ndarray) -> bool:
  """Whether the marks are lighter than the paper: the paper is what most of each neighbourhood
  is (a median as wide as half the page, on a copy of 24 pixels), and the marks depart from it."""
  small_hw = _resized(page_HW, 24, Image.Resampling.BOX)
  reach = max(small_hw.shape) // 4
  windows_hwKK = np.lib.stride_tricks.sliding_window_view(
      np.pad(small_hw, reach, mode="symmetric"), (2 * reach + 1, 2 * reach + 1))
  departure_hw = small_hw - np.median(windows_hwKK, axis=(-2, -1))
  threshold = 0.25 * np.abs(departure_hw).max()
  lighter = departure_hw[departure_hw > threshold].sum()
  return bool(lighter > -departure_hw[departure_hw < -threshold].sum())


def _analysis_size(gray_HW: np.ndarray) -> np.ndarray:
  longest = max(gray_HW.shape)
  target = min(max(longest, ANALYSIS_SIDES[0]), ANALYSIS_SIDES[1])
  if target == longest:
    return gray_HW
  return _resized(gray_HW, target,
                  Image.Resampling.BOX if target < longest else Image.Resampling.BILINEAR)


def _resized(image_HW: np.ndarray, longest: int, resample: Image.Resampling) -> np.ndarray:
  height, width = (max(1, round(s * longest / max(image_HW.shape))) for s in image_HW.shape)
  return np.asarray(Image.fromarray(image_HW, "F").resize((width, height), resample))


def _lines_across(marks_HW: np.ndarray, thickness: int) -> np.ndarray:
  """Rows and columns of marks that cross nine tenths of the page in bands no thicker than
  `thickness`: frames and ruled lines, which may touch the digit."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel  # See the docstring.
  lines_HW = np.zeros_like(marks_HW)
  for axis in (0, 1):
    full = marks_HW.mean(axis=1 - axis) >= 0.9
    runs, count = ndimage.label(full)
    for run in range(1, count + 1):
      members = runs == run
      if members.sum() <= thickness:
        if axis == 0:
          lines_HW[members] = True
        else:
          lines_HW[:, members] = True
  return lines_HW


def _main_marks(marks_HW: np.ndarray, ink_HW: np.ndarray, side: int) -> np.ndarray:
  """The digit's marks: the heaviest one, not along the border or around the others, and those
  of comparable weight near it."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel  # See the docstring.
  labels_HW, count = ndimage.label(marks_HW, np.ones((3, 3), bool))
  if count == 0:
    raise NoDigit("nothing stands out from the paper")
  index = np.arange(1, count + 1)
  weight = np.asarray(ndimage.sum_labels(ink_HW, labels_HW, index))
  area = np.asarray(ndimage.sum_labels(marks_HW, labels_HW, index))
  boxes = ndimage.find_objects(labels_HW)
  height, width = marks_HW.shape
  band = max(2, round(side / 10))
  border_HW = np.ones_like(marks_HW)
  border_HW[band:-band, band:-band] = False
  in_border = np.asarray(ndimage.sum_labels(border_HW, labels_HW, index)) / area
  touches = np.array([b[0].start == 0 or b[1].start == 0 or b[0].stop == height
                      or b[1].stop == width for b in boxes])
  candidates = []
  for i, box in enumerate(boxes):
    long_side = _size(box)
    if touches[i] and (in_border[i] >= 0.8 or (long_side >= side / 2 and
                                               area[i] <= long_side * side / 25)):
      continue  # A frame, the page's edge or the table around it, or a line into the border.
    if _is_box(labels_HW[box] == i + 1, side):
      continue
    candidates.append(i)
  if not candidates:
    raise NoDigit("the only marks are along the border or across the page (a frame or a page edge)")
  # Beside a whole mark of a digit's size, what the border cuts is not the digit; beside a mark
  # the border cuts, one that runs along a side of it (a table around a page) is not.
  runs_along = _runs_along_border(labels_HW, count)
  inside = [i for i in candidates if not touches[i] and _size(boxes[i]) >= side / 8]
  if inside:
    candidates = [i for i in candidates if not touches[i]]
  elif any(not runs_along[i] for i in candidates):
    candidates = [i for i in candidates if not runs_along[i]]
  heaviest = max(candidates, key=lambda i: weight[i])
  chosen, (top, left, bottom, right) = {heaviest}, _corners(boxes[heaviest])
  if _size(boxes[heaviest]) < side / 32:
    raise NoDigit("the largest mark is a speck")
  grown = True
  while grown:
    grown = False
    reach = _NEAR * max(bottom - top, right - left)
    for i in candidates:
      if i in chosen or weight[i] < _SPECK * weight[heaviest]:
        continue
      t, l, b, r = _corners(boxes[i])
      if max(t - bottom, top - b, l - right, left - r) <= reach:
        chosen.add(i)
        top, left, bottom, right = min(top, t), min(left, l), max(bottom, b), max(right, r)
        grown = True
  return np.isin(labels_HW, [i + 1 for i in chosen])


def _runs_along_border(labels_HW: np.ndarray, count: int) -> np.ndarray:
  """For each mark, whether it covers half of a side of the image or more."""
  covered = np.zeros(count + 1)
  for edge in (labels_HW[0], labels_HW[-1], labels_HW[:, 0], labels_HW[:, -1]):
    covered = np.maximum(covered, np.bincount(edge, minlength=count + 1) / edge.size)
  return covered[1:] >= 0.5


def _size(box: tuple[slice, slice]) -> int:
  return max(box[0].stop - box[0].start, box[1].stop - box[1].start)


def _corners(box: tuple[slice, slice]) -> tuple[int, int, int, int]:
  return box[0].start, box[1].start, box[0].stop, box[1].stop


def _is_box(mark_hw: np.ndarray, side: int) -> bool:
  """A rectangle drawn around the rest: large, and nearly all of it along its own edges."""
  height, width = mark_hw.shape
  if min(height, width) < side / 2:
    return False
  band = max(2, round(0.08 * min(height, width)))
  edges_hw = np.ones_like(mark_hw)
  edges_hw[band:-band, band:-band] = False
  return bool(np.sum(mark_hw & edges_hw) >= 0.85 * np.sum(mark_hw))
