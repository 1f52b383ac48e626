"""Checks that a checkpoint read back is the one that was saved, and says in one line why not.

What `checkpoints.py` saves with each step, and checks here before anything is used:

  meta     its fields and types; each epoch record of its history (by the caller's check, as
           metrics.py describes a record); `meta_sha256`, a digest of its other fields
  config   a JSON object matching `config_sha256`
  identity the step a directory is named after is the step its history ends at, and the step
           its state was saved at: a directory renamed or swapped by hand is not that step
  arrays   the index of the state's arrays (an OCDBT b-tree, each node with its own checksum)
           read whole; the saved arrays' paths, shapes and dtypes those of the state to restore
           into; after restoring, every array against `sha256`, its digest

Every failure raises `Damaged`, whose message (and `describe`'s, for any error a damaged
checkpoint makes a library raise) is one line to print in a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath

from mnist_jax.run import parallel

_LINE = 200  # The most characters of a library's message that a warning repeats.


class Damaged(Exception):
  """What a checkpoint holds is not what was saved (the message says what differs)."""


def digests(tree: Any) -> dict[str, str]:
  """SHA-256 of each array of a replicated pytree, over its dtype, shape and bytes, by path."""
  result = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(parallel.local_copy(tree)):
    array = np.ascontiguousarray(leaf)
    head = f"{array.dtype.str}{array.shape}".encode()
    result[_name(path)] = hashlib.sha256(head + array.tobytes()).hexdigest()
  return result


def json_digest(value: Any) -> str:
  """SHA-256 of a JSON value, independent of key order."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def sealed(meta: dict[str, Any]) -> dict[str, Any]:
  """`meta` with `meta_sha256`, the digest of its other fields, as `check_items` expects it."""
  return {**meta, "meta_sha256": json_digest(meta)}


def _name(path: Any) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _whole(value: Any, low: int = 1) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _need(ok: bool, what: str) -> None:
  if not ok:
    raise Damaged(f"meta item: {what}")


def _check_meta(meta: Any, check_record: Callable[[Any], Any]) -> None:
  """`Damaged` unless the meta item has the fields and types `checkpoints.py` writes."""
  _need(isinstance(meta, dict), "not a JSON object")
  for field in ("epoch", "steps_per_epoch"):
    _need(_whole(meta.get(field)), f"{field} is not a positive whole number")
  dataset = meta.get("dataset")
  _need(isinstance(dataset, dict) and isinstance(dataset.get("name"), str)
        and isinstance(dataset.get("image_shape"), list) and len(dataset["image_shape"]) == 3
        and all(_whole(side) for side in dataset["image_shape"])
        and _whole(dataset.get("num_classes"), 2) and isinstance(dataset.get("class_names"), list)
        and len(dataset["class_names"]) == dataset["num_classes"]
        and all(isinstance(name, str) for name in dataset["class_names"]), "dataset is damaged")
  history = meta.get("history")
  _need(isinstance(history, list) and history, "history is not a non-empty list")
  for record in history:
    try:
      check_record(record)
    except ValueError as e:
      raise Damaged(f"meta item: history is damaged ({e})") from None
  _need(history[-1]["epoch"] == meta["epoch"], "history does not end at its epoch")
  sha256 = meta.get("sha256", {})
  _need(isinstance(sha256, dict) and all(isinstance(v, str) for v in sha256.values()),
        "sha256 is not a table of digests")


def check_items(step: int, meta: Any, config: Any, check_record: Callable[[Any], Any]) -> None:
  """`Damaged` unless the meta and config items read from directory `step` are whole, match
  their digests, and are of that step (see the module's docstring)."""
  _check_meta(meta, check_record)
  if "meta_sha256" in meta and meta["meta_sha256"] != json_digest(
      {key: value for key, value in meta.items() if key != "meta_sha256"}):
    raise Damaged("meta item differs from its saved digest")
  if not isinstance(config, dict):
    raise Damaged("config item: not a JSON object")
  if "config_sha256" in meta and meta["config_sha256"] != json_digest(config):
    raise Damaged("config item differs from its saved digest")
  saved_step = meta["history"][-1]["step"]
  if saved_step != step:
    raise Damaged(f"it holds step {saved_step} (epoch {meta['epoch']}), not step {step}")


def check_array_store(state_dir: str) -> None:
  """`Damaged` where the index of the arrays in `state_dir` (an OCDBT b-tree, each node with its
  own checksum) does not read back whole. Read here in one call, from disk; left to orbax, a node
  that fails some of its many concurrent reads and not others (those served from its cache)
  leaves their errors to be printed when the process exits."""
  if not os.path.exists(os.path.join(state_dir, "manifest.ocdbt")):
    return  # Not stored as OCDBT, orbax's default: its own checks alone.
  import tensorstore as ts  # pylint: disable=import-outside-toplevel  # See checkpoints.py.
  try:
    store = {"driver": "ocdbt", "base": {"driver": "file", "path": state_dir + "/"}}  # As orbax.
    ts.KvStore.open(store).result().list().result()
  except ValueError as e:  # tensorstore's error for unreadable and corrupt data alike.
    file = re.search(r'local file "([^"]+)"', str(e))
    where = f" in {os.path.relpath(file[1], os.path.dirname(state_dir))}" if file else ""
    node = re.search(r"Error decoding b-tree node: (.*)", _first_line(e))
    what = ("fails its checksum" if "checksum" in str(e) else
            f"is damaged ({_cut(node[1])})" if node else f"cannot be read ({describe(e)})")
    raise Damaged(f"the index of its arrays {what}{where}") from None


def check_fits(state_dir: str, template: Any) -> None:
  """`Damaged` unless the arrays saved in `state_dir` have the paths, shapes and dtypes of
  `template`'s. Checked from orbax's metadata before a restore: a restore into arrays of other
  shapes fails halfway, and leaves orbax's unfinished reads to print their errors later."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  # See checkpoints.py.
  saved = {_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
           for path, leaf in jax.tree_util.tree_leaves_with_path(
               ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)))}
  wanted = {_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for path, leaf in jax.tree_util.tree_leaves_with_path(template)}
  params_first = lambda path: (not path.startswith("params/"), path)
  only_saved = sorted(saved.keys() - wanted.keys(), key=params_first)
  only_wanted = sorted(wanted.keys() - saved.keys(), key=params_first)
  if only_saved or only_wanted:
    raise Damaged(
        f"its arrays do not fit the state to restore: {len(only_saved)} saved arrays are not in "
        f"it (e.g. {(only_saved or ['none'])[0]}), {len(only_wanted)} of its arrays are not "
        f"saved (e.g. {(only_wanted or ['none'])[0]})")
  for path in sorted(saved, key=params_first):
    if saved[path] != wanted[path]:
      (saved_shape, saved_dtype), (shape, dtype) = saved[path], wanted[path]
      raise Damaged(f"its arrays do not fit the state to restore: {path} is "
                    f"{saved_dtype}{list(saved_shape)} there, {dtype}{list(shape)} here")


def verify(step: int, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
  """`Damaged` unless restored `arrays` are of `step` and match the digests saved with them."""
  saved_step = np.asarray(parallel.local_copy(arrays["step"]))
  if not np.all(saved_step == step):
    raise Damaged(f"its state is at step {saved_step.max()}, not step {step}")
  saved = meta.get("sha256")
  if saved is None:  # Saved before checkpoints had digests: nothing to check against.
    return
  actual = digests(arrays)
  wrong = sorted(path for path in saved.keys() | actual.keys()
                 if saved.get(path) != actual.get(path))
  if wrong:
    raise Damaged(f"{len(wrong)} array(s) differ from their saved digests: {', '.join(wrong[:3])}")


def steps_with_damaged_metrics(directory: str) -> list[int]:
  """Steps of the checkpoint `directory` whose orbax metrics item is not
  `{"selection": <number>, ...}` (orbax's retention would fail on them)."""
  damaged = []
  names = os.listdir(directory) if os.path.isdir(directory) else []
  for step in sorted(int(name) for name in names if name.isdigit()):
    try:
      with open(os.path.join(directory, str(step), "metrics", "metrics"), encoding="utf-8") as f:
        selection = json.load(f)["selection"]
    except (OSError, ValueError, TypeError, KeyError):
      selection = None
    if not isinstance(selection, float | int) or isinstance(selection, bool):
      damaged.append(step)
  return damaged


def describe(error: BaseException) -> str:
  """One line for why a checkpoint cannot be used: `Damaged`'s message, else the gist of what a
  library raised: the cause orbax wraps in "Encountered error while reading array index ... See
  full TensorStore details: <bound method ...>", the array a TensorStore error names, and a long
  first line cut at a word."""
  if isinstance(error, Damaged):
    return str(error)
  while "See full TensorStore details" in str(error) and error.__cause__ is not None:
    error = error.__cause__
  text = _first_line(error)
  if "See full TensorStore details" in text:
    text = text[:text.index("See full TensorStore details")].rstrip(" .")
  key = re.search(r'Error reading "([^"/]+)/[^"]*" in OCDBT database at local file "[^"]*": (.*)',
                  text)
  if key:  # tensorstore names an array by its path with dots ("params.Dense_0.kernel/0.0").
    return f"array {key[1].replace('.', '/')} cannot be read ({_cut(key[2])})"
  text = re.sub(r'local file "([^"]*)"', lambda file: f'"{os.path.basename(file[1])}"', text)
  return f"{type(error).__name__}: {_cut(text)}"


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return re.sub(r"\s*\[source locations=.*", "", lines[0] if lines else "")


def _cut(text: str) -> str:
  if len(text) <= _LINE:
    return text
  end = text.rfind(" ", 0, _LINE - 4)
  return text[:end if end > 0 else _LINE - 4].rstrip(" ,;:") + " ..."


def os_reason(error: Exception) -> str:
  """The operating system's words for an orbax error that wraps one ("No space left on
  device"), else the error's gist."""
  code = re.search(r"os_error_code='(\d+)'", str(error))
  if code:
    return os.strerror(int(code.group(1)))
  return error.strerror if isinstance(error, OSError) and error.strerror else describe(error)
