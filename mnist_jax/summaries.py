"""TensorBoard event files, written with TensorFlow's summary API under `<workdir>/tensorboard/`.

TensorFlow is optional for training: without it, or once a write has failed, the writer says so on
stderr once and writes nothing more, and the run goes on (`metrics.jsonl` is the full record).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from mnist_jax import data

# TensorBoard tag -> field of an epoch's record in `metrics.jsonl`.
EPOCH_SCALARS = {
    "train/loss": "train_loss",
    "train/accuracy": "train_accuracy",
    "test/loss": "test_loss",
    "test/accuracy": "test_accuracy",
    "learning_rate": "learning_rate",
    "epoch_time_s": "epoch_time_s",
    "examples_per_s": "examples_per_s",
}


class Writer:
  """Scalars and images for one log directory; one note on stderr where events cannot be written."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._writer = None
    if not data.have_tensorflow():
      print(f"mnist_jax: note: TensorFlow is not installed, so no TensorBoard events in {logdir}",
            file=sys.stderr)
      return
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    self._tf = tf
    self._guarded(lambda: setattr(self, "_writer", tf.summary.create_file_writer(logdir)))

  def _guarded(self, write) -> None:
    try:
      write()
    except Exception as e:  # Any failure to log must leave the training untouched.
      self._writer = None
      print(f"mnist_jax: warning: TensorBoard events stop here ({type(e).__name__}: {e})",
            file=sys.stderr)

  def write_epoch(self, record: dict[str, Any]) -> None:
    """The `EPOCH_SCALARS` of one epoch's record, at its training step."""
    self.scalars(record["step"], {tag: record[field] for tag, field in EPOCH_SCALARS.items()})

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return

    def write():
      with self._writer.as_default(step=step):
        for tag, value in values.items():
          self._tf.summary.scalar(tag, value)
      self._writer.flush()

    self._guarded(write)

  def images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """Each `[H, W, C]` uint8 image (C = 1, 3 or 4) under its tag."""
    if self._writer is None:
      return

    def write():
      with self._writer.as_default(step=step):
        for tag, image_HWC in images.items():
          self._tf.summary.image(tag, image_HWC[None])
      self._writer.flush()

    self._guarded(write)
