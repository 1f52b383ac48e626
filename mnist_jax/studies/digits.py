"""Any digit image as the model's dataset draws its own: reading a file, and framing the digit.

  image_HW = digits.load_image("photo.jpg")        # grayscale float32, upright
  digit_28x28 = digits.mnist_like(image_HW)        # uint8, as MNIST frames its digits

MNIST digits are white on black, scaled to fit a 20x20 box (keeping their aspect ratio) and
placed in 28x28 with their centre of mass at the centre. `mnist_like` does the same to a photo,
scan or drawing of one digit on paper, found as a person would see it (`ink.py`: uneven light,
shadows, frames, page edges and specks are not the digit; where there is none it says so); for a
model of Fashion-MNIST, as that dataset frames its photos (`FRAMINGS`).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_jax import data, errors
from mnist_jax.studies import ink

MNIST_SIZE = 28
# Images above this are refused unread; decoded, 25 MP of RGBA take 100 MB.
MAX_PIXELS = 25_000_000
# Larger sides are reduced before the digit is found, keeping memory small for photos.
WORKING_SIDE = 2048
# A smaller side cannot hold a legible digit.
MIN_SIDE = 8
DIGIT_BOX = 20


@dataclasses.dataclass(frozen=True)
class Framing:
  """How a dataset places an object in its 28x28 images: scaled to fit a `box`x`box` square, then
  its centre of mass (`by_mass`) or the centre of that box put at the image's centre; `strokes`:
  drawn in strokes (a digit, found as `ink.digit_ink` finds it), or a filled object."""

  box: int
  by_mass: bool
  strokes: bool


# As the datasets' authors describe their preparation: MNIST (LeCun et al.) by mass in 20x20,
# Fashion-MNIST (Xiao et al., 2017) the longest side to 28 pixels, centred.
FRAMINGS = {"mnist": Framing(DIGIT_BOX, by_mass=True, strokes=True),
            "fashion_mnist": Framing(MNIST_SIZE, by_mass=False, strokes=False)}

# Pixels brighter than this fraction of the strongest stroke bound the digit (ignores faint noise).
_INK_THRESHOLD = 0.2
_MIN_CONTRAST = ink.MIN_CONTRAST


class ImageError(errors.UserError):
  """An image file or array that cannot be predicted, with a message that says why."""


def load_image(path: str) -> np.ndarray:
  """A file's pixels as grayscale float32 `[H, W]` in 0..255, upright as its EXIF orientation says.

  Transparency is flattened onto white (onto black under light ink); 16-bit and float images are
  scaled to 0..255; sides above `WORKING_SIDE` are reduced by a whole factor (the digit ends up
  20x20 anyway). Images of more than `MAX_PIXELS` are refused before their pixels are decoded.
  """
  try:
    with warnings.catch_warnings():  # Pillow warns from 89 MP on; the limit below is lower.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(path)
    with image:
      if image.width * image.height > MAX_PIXELS:
        raise ImageError(f"{image.width}x{image.height} pixels is above the limit of "
                         f"{MAX_PIXELS / 1e6:g} megapixels; scale it down first")
      if max(image.size) > WORKING_SIDE:  # A JPEG decodes at 1/2, 1/4 or 1/8 scale for this.
        image.draft("L", tuple(side * WORKING_SIDE // max(image.size) for side in image.size))
      image.load()
      gray = _gray(image, -(-max(image.size) // WORKING_SIDE))
      gray.info["exif"] = image.info.get("exif", b"")  # `_gray` made a new image.
      return np.asarray(ImageOps.exif_transpose(gray), np.float32)
  except FileNotFoundError:
    raise ImageError("no such file") from None
  except PermissionError:
    raise ImageError("permission denied") from None
  except IsADirectoryError:
    raise ImageError("is a directory, not an image") from None
  except UnidentifiedImageError:
    raise ImageError("not an image file that Pillow can read") from None
  except Image.DecompressionBombError:
    raise ImageError(f"above the limit of {MAX_PIXELS / 1e6:g} megapixels; scale it down first") from None
  except (OSError, ValueError, SyntaxError) as e:  # Truncated or damaged image data.
    raise ImageError(f"cannot be read as an image ({e})") from None


def framed_file(path: str, dataset: str = "mnist") -> np.ndarray:
  """The image file at `path` as `dataset` draws its images: `mnist_like(load_image(path))`."""
  return mnist_like(load_image(path), dataset)


def _gray(image: Image.Image, factor: int) -> Image.Image:
  """One channel, 0..255, sides divided by `factor`: "L" from 8-bit images, "F" from 16-bit and
  float ones (as scanners write). Transparency is flattened onto white, or onto black where what
  is visible is light (white ink on a transparent background): either way the ink stands out."""
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = (image if image.mode == "RGBA" else image.convert("RGBA")).reduce(factor)
    alpha = np.asarray(rgba.getchannel("A"), np.float32)
    light = np.sum(np.asarray(rgba.convert("L"), np.float32) * alpha) > 127.5 * np.sum(alpha)
    background = (0, 0, 0, 255) if light else (255, 255, 255, 255)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba).convert("L")
  if not image.mode.startswith(("I", "F")):
    return image.convert("L").reduce(factor)
  pixels = np.array((image if image.mode == "F" else image.convert("F")).reduce(factor))
  if image.mode.startswith("I") and pixels.max() > 255:  # 16 bits, or 12 in a 16-bit file.
    pixels *= 255 / pixels.max()
  elif image.mode == "F" and pixels.max() <= 1:
    pixels *= 255
  return Image.fromarray(pixels.clip(0, 255), "F")


def _to_gray(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
    # ITU-R 601 luma, as Pillow's convert("L"); an alpha channel is ignored for arrays.
    image = image[..., 0] if image.shape[-1] == 1 else image[..., :3] @ np.float32([.299, .587, .114])
  if image.ndim != 2 or min(image.shape) < 1:
    raise ImageError(f"an image must be [H, W] or [H, W, 1|3|4], got shape {image.shape}")
  if min(image.shape) < MIN_SIDE:
    raise ImageError(f"{image.shape[1]}x{image.shape[0]} pixels is too small to hold a digit "
                     f"(at least {MIN_SIDE}x{MIN_SIDE})")
  return image


def mnist_like(image: np.ndarray, dataset: str = "mnist") -> np.ndarray:
  """One digit (or object) image of any size (`[H, W]` or `[H, W, C]`, 0..255) as `dataset` draws
  its images: uint8 [28, 28].

  A digit is found as a person sees it (`ink.digit_ink`): the paper's light is evened out, the
  paper's side (light or dark) sets the polarity, and of the marks on it the digit is the main
  one or ones; frames, borders, page edges and specks are left out. A Fashion-MNIST object is
  what differs from the median of the border. The ink is stretched to 0..255, cropped, resized
  to fit the dataset's box (20x20 for MNIST) and pasted with its centre of mass (MNIST) or its
  centre (Fashion-MNIST) at the centre of 28x28.

  Raises:
    ImageError: no digit in the image, or a dataset whose framing is not in `FRAMINGS`.
  """
  if dataset not in FRAMINGS:
    raise ImageError(f"images are framed as {' or '.join(FRAMINGS)} frame theirs, and this model "
                     f"is of {dataset!r}; give images already framed as its own (preprocess=False)")
  framing = FRAMINGS[dataset]
  gray_HW = _to_gray(image)
  if framing.strokes:
    try:
      ink_HW = ink.digit_ink(gray_HW)
    except ink.NoDigit as e:
      raise ImageError(f"no digit found: {e}") from None
  else:
    ink_HW = _object_ink(gray_HW)
  rows = np.flatnonzero((ink_HW > _INK_THRESHOLD * 255).any(axis=1))
  cols = np.flatnonzero((ink_HW > _INK_THRESHOLD * 255).any(axis=0))
  crop = ink_HW[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  scale = framing.box / max(crop.shape)
  height, width = (max(1, round(side * scale)) for side in crop.shape)
  digit = np.asarray(
      Image.fromarray(crop.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
  ).clip(0.0, 255.0)
  centre_y, centre_x = (height - 1) / 2, (width - 1) / 2
  if framing.by_mass:
    total = digit.sum() or 1.0
    centre_y = (digit.sum(axis=1) * np.arange(height)).sum() / total
    centre_x = (digit.sum(axis=0) * np.arange(width)).sum() / total
  middle = (MNIST_SIZE - 1) / 2
  top = min(max(round(middle - centre_y), 0), MNIST_SIZE - height)
  left = min(max(round(middle - centre_x), 0), MNIST_SIZE - width)
  canvas = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
  canvas[top:top + height, left:left + width] = digit
  return np.round(canvas).astype(np.uint8)


def _object_ink(gray_HW: np.ndarray) -> np.ndarray:
  """What differs from the border's median, light, 0..255: a photographed object on a plain
  background (filled, unlike a digit's strokes)."""
  border = np.concatenate([gray_HW[0], gray_HW[-1], gray_HW[:, 0], gray_HW[:, -1]])
  background = float(np.median(border))
  if background > 127.5:
    gray_HW, background = 255.0 - gray_HW, 255.0 - background
  ink_HW = np.clip(gray_HW - background, 0.0, None)
  if ink_HW.max() < _MIN_CONTRAST:
    raise ImageError("no digit found: the image is almost uniform")
  return ink_HW * (255.0 / ink_HW.max())


def check_takes_28x28_grayscale(info: data.DatasetInfo, use: str) -> None:
  """`ImageError` unless the model's dataset is of 28x28 grayscale images, as `use` needs."""
  if info.image_shape != (MNIST_SIZE, MNIST_SIZE, 1):
    raise ImageError(f"{use} needs a 28x28 grayscale model; this one takes {info.image_shape}")
