"""Library noise kept off the terminal: what orbax and asyncio log or print about a failure that
this project reports itself, in one line (see checkpoints.py)."""

from __future__ import annotations

import logging as std_logging
import sys
from typing import Any

from absl import logging


def quiet_library_errors() -> None:
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
