"""Figures of a dataset and of a trained model's predictions, from plain numpy arrays.

Each function returns a `matplotlib.figure.Figure` built without pyplot: nothing global is touched,
no display is needed (PNG is drawn by Agg), and a figure is freed like any object once saved.
Reports name them in a `drawing.Plot`, which drawing.py draws into a file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import collections, colors, patches, ticker
from matplotlib.figure import Figure


def _long(names: Sequence[str]) -> bool:
  return max(len(name) for name in names) > 2


def _rotate_if_long(ax, names: Sequence[str]) -> None:
  if _long(names):
    ax.tick_params(axis="x", labelrotation=45)
    for label in ax.get_xticklabels():
      label.set_horizontalalignment("right")


def label_histogram(
    counts_by_split: dict[str, np.ndarray], class_names: Sequence[str], title: str
) -> Figure:
  """One bar chart per split, side by side, with the count written on each bar."""
  fig = Figure(figsize=(6 * len(counts_by_split), 4.5), layout="constrained")
  axes = fig.subplots(1, len(counts_by_split), squeeze=False)[0]
  for ax, (split, counts_C) in zip(axes, counts_by_split.items()):
    bars = ax.bar(np.arange(len(counts_C)), counts_C, color="tab:blue")
    ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_xticks(np.arange(len(counts_C)), class_names)
    _rotate_if_long(ax, class_names)
    ax.set_title(f"{split}: {int(np.sum(counts_C))} examples")
    ax.set_xlabel("class")
    ax.set_ylabel("examples")
    ax.margins(y=0.12)
  fig.suptitle(title)
  return fig


def image_grid(
    images_NHWC: np.ndarray,
    captions: Sequence[str],
    title: str,
    caption_colors: Sequence[str] | None = None,
    ncols: int = 5,
) -> Figure:
  """Images in rows of `ncols`, each framed and with its caption (coloured where given) above it.

  The images are laid into one mosaic drawn by a single `imshow`: a quarter of the time that 25
  separate axes take. Grey images are drawn dark on white, as the notebook draws them.
  """
  num_images, height, width, channels = images_NHWC.shape
  nrows = max(1, -(-num_images // ncols))
  band, gap = height // 2, width // 6  # Room for a two-line caption above each image; a margin.
  cell_h, cell_w = height + band, width + gap
  grey = channels == 1
  # White: 0 on the `binary` colour map of grey images, 255 for colour images.
  mosaic = np.full((nrows * cell_h + gap // 2, ncols * cell_w, channels), 0 if grey else 255,
                   np.uint8)
  inch_per_pixel = 1.7 / cell_w
  fig = Figure(figsize=(mosaic.shape[1] * inch_per_pixel, mosaic.shape[0] * inch_per_pixel + 0.4))
  ax = fig.add_axes((0, 0, 1, 1 - 0.4 / fig.get_figheight()))
  caption_colors = caption_colors or ["black"] * num_images
  frames = []
  for k, (image_HWC, caption, color) in enumerate(zip(images_NHWC, captions, caption_colors)):
    top, left = (k // ncols) * cell_h + band, (k % ncols) * cell_w + gap // 2
    mosaic[top : top + height, left : left + width] = image_HWC
    frames.append(patches.Rectangle((left - 0.5, top - 0.5), width, height))
    ax.text(left + width / 2, top - 1.5, caption, ha="center", va="bottom", fontsize=10,
            color=color)
  ax.add_collection(collections.PatchCollection(frames, facecolor="none", edgecolor="0.6",
                                                linewidth=0.8))
  if num_images == 0:
    ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes)
  ax.imshow(mosaic[..., 0] if grey else mosaic, cmap="binary" if grey else None,
            vmin=0, vmax=255, interpolation="nearest")
  ax.axis("off")
  fig.suptitle(title)
  return fig


def pixel_histograms(counts_V: np.ndarray, normalized_values_V: np.ndarray, scale: str) -> Figure:
  """How often each of the 256 pixel values occurs, as stored and after `scale` (a formula)."""
  fig = Figure(figsize=(11, 4), layout="constrained")
  raw_ax, normalized_ax = fig.subplots(1, 2)
  seen = counts_V > 0
  for ax, values_V, name in (
      (raw_ax, np.arange(len(counts_V), dtype=np.float32), "before (uint8 as stored)"),
      (normalized_ax, normalized_values_V, f"after ({scale})"),
  ):
    half_step = (values_V[1] - values_V[0]) / 2
    # One filled outline instead of 256 bars: the same picture, far cheaper to draw.
    ax.stairs(counts_V, np.append(values_V - half_step, values_V[-1] + half_step), fill=True)
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(ticker.NullLocator())  # Decades suffice; minor ticks are costly.
    ax.set_xlabel("pixel value")
    ax.set_ylabel("pixels (log scale)")
    ax.set_title(f"{name}: min {values_V[seen].min():.4g}, max {values_V[seen].max():.4g}")
  raw_ax.text(0.98, 0.95, f"{counts_V[0] / counts_V.sum():.1%} of pixels are 0",
              transform=raw_ax.transAxes, ha="right", va="top")
  fig.suptitle("Pixel values before and after normalization (training split)")
  return fig


def image_with_colorbar(
    image_HWC: np.ndarray, normalized_HWC: np.ndarray, caption: str
) -> Figure:
  """One image as stored and as the model sees it, each with a colorbar of its pixel values."""
  fig = Figure(figsize=(9, 4), layout="constrained")
  for ax, values_HWC, name in zip(
      fig.subplots(1, 2), (image_HWC, normalized_HWC), ("as stored (uint8)", "normalized")
  ):
    # The first channel only, so that one colorbar reads off every pixel.
    mappable = ax.imshow(values_HWC[..., 0], cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(name)
    fig.colorbar(mappable, ax=ax, label="pixel value")
  fig.suptitle(caption)
  return fig


def learning_curves(history: dict[str, np.ndarray], splits: Sequence[str]) -> Figure:
  """Loss and accuracy of each of `splits` against the epoch, from `metrics.jsonl`'s columns
  (`<split>_loss`, `<split>_accuracy`); the title gives the last split's final values."""
  # Fixed margins: the labels are numbers and fixed words, so the layout engine's passes over
  # every text would buy nothing.
  fig = Figure(figsize=(11, 4))
  fig.subplots_adjust(left=0.07, right=0.985, bottom=0.13, top=0.83, wspace=0.24)
  epochs = history["epoch"]
  styles = {"train": "o-", "val": "^:", "test": "s--"}
  for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
    for split in splits:
      ax.plot(epochs, history[f"{split}_{metric}"], styles.get(split, "d-."), label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
    ax.set_title(f"{metric}: last {splits[-1]} {history[f'{splits[-1]}_{metric}'][-1]:.4f}")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("Learning curves")
  return fig


def confusion_matrix(
    counts_CC: np.ndarray,
    recall_C: np.ndarray,
    precision_C: np.ndarray,
    class_names: Sequence[str],
    title: str,
) -> Figure:
  """Counts (rows: true class, columns: predicted), with recall per row and precision per column.

  Cells are coloured by their share of the row on a log scale, so that rare confusions stand out
  next to the diagonal.
  """
  num_classes = len(class_names)
  size = max(6.0, 0.55 * num_classes + 2)
  width, height = size + 1.2, size + 0.4
  if _long(class_names):
    fig = Figure(figsize=(width, height), layout="constrained")
    margins = {}
  else:  # Short names (digits) fit fixed margins; the layout engine's passes would buy nothing.
    fig = Figure(figsize=(width, height))
    margins = dict(left=0.85 / width, right=1 - 0.1 / width, bottom=0.55 / height,
                   top=1 - 0.45 / height, wspace=0.03, hspace=0.05)
  grid = fig.add_gridspec(2, 2, width_ratios=[num_classes, 1.4], height_ratios=[num_classes, 0.8],
                          **margins)
  ax = fig.add_subplot(grid[0, 0])
  recall_ax = fig.add_subplot(grid[0, 1], sharey=ax)
  precision_ax = fig.add_subplot(grid[1, 0], sharex=ax)
  share_CC = counts_CC / np.maximum(counts_CC.sum(axis=1, keepdims=True), 1)
  ax.imshow(share_CC, cmap="Blues", norm=colors.LogNorm(1e-4, 1, clip=True), aspect="auto")
  recall_ax.imshow(recall_C[:, None], cmap="RdYlGn", vmin=0.8, vmax=1, aspect="auto")
  precision_ax.imshow(precision_C[None, :], cmap="RdYlGn", vmin=0.8, vmax=1, aspect="auto")
  if num_classes <= 20:
    for (i, j), count in np.ndenumerate(counts_CC):
      ax.text(j, i, str(count), ha="center", va="center", fontsize=9, in_layout=False,
              color="white" if share_CC[i, j] > 0.3 else ("lightgrey" if count == 0 else "black"))
    for i, value in enumerate(recall_C):
      recall_ax.text(0, i, f"{value:.1%}", ha="center", va="center", fontsize=8, in_layout=False)
    for j, value in enumerate(precision_C):
      precision_ax.text(j, 0, f"{value:.1%}", ha="center", va="center", fontsize=8,
                        in_layout=False)
  ticks = np.arange(num_classes)
  ax.set_yticks(ticks, class_names)
  ax.set_ylabel("true class")
  ax.tick_params(labelbottom=False)
  recall_ax.set_xticks([0], ["recall"])
  recall_ax.tick_params(labelleft=False)
  precision_ax.set_xticks(ticks, class_names)
  _rotate_if_long(precision_ax, class_names)
  precision_ax.set_yticks([0], ["precision"])
  precision_ax.set_xlabel("predicted class")
  fig.suptitle(title)
  return fig


def reliability_diagram(edges_B1: np.ndarray, accuracy_B: np.ndarray, confidence_B: np.ndarray,
                        counts_B: np.ndarray, title: str) -> Figure:
  """Accuracy per confidence bin against the diagonal of perfect calibration, and how many
  examples each bin holds (log scale) beneath."""
  fig = Figure(figsize=(5.5, 6.5))  # Fixed margins, as learning_curves has.
  fig.subplots_adjust(left=0.14, right=0.96, bottom=0.08, top=0.92, hspace=0.08)
  ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
  centres, width = (edges_B1[:-1] + edges_B1[1:]) / 2, np.diff(edges_B1)
  filled = counts_B > 0
  ax.bar(centres[filled], accuracy_B[filled], width[filled], color="tab:blue", edgecolor="white",
         label="accuracy")
  ax.bar(centres[filled], (confidence_B - accuracy_B)[filled], width[filled],
         bottom=accuracy_B[filled], color="tab:red", alpha=0.3, label="gap to confidence")
  ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", label="perfect calibration")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.legend(loc="upper left")
  count_ax.bar(centres, counts_B, width, color="0.6", edgecolor="white", log=True)
  # Decades suffice, as in pixel_histograms, whose minor ticks are costly to draw.
  count_ax.yaxis.set_minor_locator(ticker.NullLocator())
  count_ax.set_xlabel("confidence (top class probability)")
  count_ax.set_ylabel("examples")
  count_ax.set_xlim(0, 1)
  fig.suptitle(title)
  return fig


def robustness_curves(eps: Sequence[float], accuracies: dict[str, Sequence[float]],
                      title: str) -> Figure:
  """Accuracy against the attack's L-infinity budget, one line per attack."""
  fig = Figure(figsize=(6, 4.5), layout="constrained")
  ax = fig.subplots()
  for name, values in accuracies.items():
    ax.plot(eps, values, marker="o", label=name)
  ax.set_xlabel("eps (pixels / 255)")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.suptitle(title)
  return fig
