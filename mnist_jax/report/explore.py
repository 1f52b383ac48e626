"""`--mode=explore`: the notebook's first look at a dataset, as text and PNGs in the workdir.

Prints the split shapes and the examples per class, and draws the label histogram, the first 25
training images, the pixel values before and after normalization, and one image with a colorbar.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from mnist_jax import data
from mnist_jax.report import drawing
from mnist_jax.run import rundir

EXPLORED_SPLITS = ("train", "test")
EXPLORE_FILE = "explore.md"


def pixel_value_counts(images_NHWC: np.ndarray) -> np.ndarray:
  """How many pixels hold each uint8 value 0..255."""
  flat = images_NHWC.reshape(-1)
  # In chunks: np.bincount widens its input to int64, which for a whole split is slow.
  chunks = range(0, len(flat), 1 << 20)
  return sum(np.bincount(flat[i : i + (1 << 20)], minlength=256) for i in chunks)


def shape_lines(splits: dict[str, data.Split]) -> list[str]:
  return [
      f"{name:<6} images {split.images_NHWC.shape} {split.images_NHWC.dtype}  "
      f"labels {split.labels_N.shape} {split.labels_N.dtype}"
      for name, split in splits.items()
  ]


def count_table(counts_by_split: dict[str, np.ndarray], class_names: tuple[str, ...]) -> list[str]:
  """One line per class with its examples and share in each split, then the totals."""
  named = class_names != tuple(str(i) for i in range(len(class_names)))
  width = max(len(name) for name in class_names) if named else 0
  header = f"{'class':>5}  {'name':<{width}}" if named else f"{'class':>5}"
  header += "".join(f"  {split:>7}  {'%':>6}" for split in counts_by_split)
  lines = [header]
  rows = [(str(i), name) for i, name in enumerate(class_names)] + [("total", "")]
  for row, (label, name) in enumerate(rows):
    line = f"{label:>5}  {name:<{width}}" if named else f"{label:>5}"
    for counts_C in counts_by_split.values():
      count = counts_C.sum() if label == "total" else counts_C[row]
      line += f"  {count:>7}  {100 * count / counts_C.sum():>6.2f}"
    lines.append(line)
  return lines


def explore(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Prints shapes and class counts of `config.dataset`; writes the figures and `explore.md`.

  Returns the seconds each figure took to draw and save.
  """
  info = data.dataset_info(config.dataset, config.data_dir)
  splits = {name: data.load_split(config.dataset, name, config.data_dir)
            for name in EXPLORED_SPLITS}
  counts = {name: np.bincount(s.labels_N, minlength=info.num_classes) for name, s in splits.items()}
  train = splits["train"]
  pixel_counts_V = pixel_value_counts(train.images_NHWC)
  mean, std = config.pixel_mean, config.pixel_std
  normalized_values_V = data.normalize(np.arange(256, dtype=np.float32), mean, std)
  first_image = train.images_NHWC[0]
  Plot = drawing.Plot
  figures = {
      "label_histogram": Plot("label_histogram", counts, info.class_names,
                              f"Examples per class in {info.name}"),
      "first_train_images": Plot(
          "image_grid", train.images_NHWC[:25],
          [info.class_names[label] for label in train.labels_N[:25]],
          f"The first 25 training images of {info.name} and their labels"),
      "pixel_histograms": Plot(
          "pixel_histograms", pixel_counts_V, normalized_values_V,
          "x / 255" if (mean, std) == (0, 1) else f"(x / 255 - {mean:g}) / {std:g}"),
      "image_colorbar": Plot(
          "image_with_colorbar", first_image,
          data.normalize(first_image.astype(np.float32), mean, std),
          f"Training image 0 (label {info.class_names[train.labels_N[0]]})"),
  }
  text = [*shape_lines(splits), "", *count_table(counts, info.class_names)]
  print("\n".join(text))
  seconds = drawing.write_pngs(figures, os.path.join(workdir, rundir.PLOTS))
  for name, duration in seconds.items():
    print(f"wrote {os.path.join(workdir, rundir.PLOTS, name)}.png in {duration:.2f}s")
  images = "\n\n".join(f"![{name}]({rundir.PLOTS}/{name}.png)" for name in figures)
  rundir.write_text(os.path.join(workdir, EXPLORE_FILE),
                    f"# {info.name}\n\n```\n" + "\n".join(text) + f"\n```\n\n{images}\n")
  return seconds
