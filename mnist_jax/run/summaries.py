"""TensorBoard event files under `<workdir>/tensorboard/`, written without TensorFlow.

Events are the summaries `tf.summary.scalar` and `tf.summary.image` write (tensors tagged for
TensorBoard's scalars and images plugins), built from TensorBoard's own protos, so a run imports no
TensorFlow for them. Each is written as one TFRecord (`_record`), the bytes TensorBoard's own
writer writes, but with a compiled checksum: that writer computes CRC-32C in pure Python, slow
for a report's PNGs. Each write is flushed at once. A write that fails says so on stderr once and
turns the writer off; the run goes on (`metrics.jsonl` is the full record).
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import struct
import sys
import time

import google_crc32c
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata

_FILE_NUMBERS = itertools.count()


def _masked_crc32c(data: bytes) -> int:
  """The checksum of a TFRecord frame: CRC-32C, rotated and offset (TFRecord's "masking")."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
  """`data` framed as one TFRecord: its length, the length's checksum, itself, its checksum."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc32c(length)) + data
          + struct.pack("<I", _masked_crc32c(data)))


def _tensor(values: float | list[bytes]) -> tensor_pb2.TensorProto:
  """A float32 scalar, or a vector of byte strings, as `tensor_util.make_tensor_proto` makes
  them; that module would import TensorBoard's TensorFlow stub, the larger part of its import."""
  if isinstance(values, list):
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(
        size=len(values))])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape,
                                  string_val=values)
  return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                                tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                float_val=[values])


class Writer:
  """Scalars and images for one log directory; one note on stderr where events cannot be written."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._records = None

    def open_file():
      os.makedirs(logdir, exist_ok=True)
      name = (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}."
              f"{next(_FILE_NUMBERS)}")  # Unique, as TensorBoard reads every file in the directory.
      self._records = open(os.path.join(logdir, name), "xb")  # pylint: disable=consider-using-with

    self._guarded(open_file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def __enter__(self) -> Writer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    if self._records is not None:
      self._guarded(self._records.close)
      self._records = None

  def _guarded(self, write) -> None:
    try:
      write()
    except Exception as e:  # Any failure to log must leave the training untouched.
      self._records = None
      print(f"mnist_jax: warning: TensorBoard events stop here ({type(e).__name__}: {e})",
            file=sys.stderr)

  def _write(self, event: event_pb2.Event) -> None:
    if self._records is None:
      return

    def write():
      self._records.write(_record(event.SerializeToString()))
      self._records.flush()

    self._guarded(write)

  def _summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                summary=summary_pb2.Summary(value=values)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """Each value under its tag (`metrics.scalars` names an epoch's), at `step`."""
    metadata = scalar_metadata.create_summary_metadata(display_name=None, description=None)
    self._summary(step, [
        summary_pb2.Summary.Value(
            tag=tag, metadata=metadata, tensor=_tensor(float(np.float32(value))))
        for tag, value in values.items()
    ])

  def pngs(self, step: int, paths: dict[str, str]) -> None:
    """Each PNG file under its tag, its bytes as they are (TensorBoard shows PNGs as they come)."""
    metadata = image_metadata.create_summary_metadata(display_name=None, description=None)
    values = []
    for tag, path in paths.items():
      with open(path, "rb") as f:
        png = f.read()
      with Image.open(io.BytesIO(png)) as image:  # Reads the header only.
        width, height = image.size
      contents = [str(width).encode(), str(height).encode(), png]
      values.append(summary_pb2.Summary.Value(
          tag=tag, metadata=metadata, tensor=_tensor(contents)))
    self._summary(step, values)
