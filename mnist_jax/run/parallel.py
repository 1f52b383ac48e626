"""Where arrays live: a device mesh with a `data` axis, shardings for data and state, and hosts.

Every run, on one CPU or on a multi-host slice, builds the same `jax.sharding.Mesh` of shape
`(data, model)` over all devices of all processes. Batches and the device-resident splits are
sharded along `data`; the train state is replicated. The `model` axis has size 1 for now: sharding
params along it changes `state_sharding` and nothing else.

Under `jax.distributed` every process runs the same program on the same global arrays. Each process
places only its own devices' rows of every array (`jax.make_array_from_process_local_data`), and
all draw the same epoch permutations from the same keys.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mnist_jax import errors

DATA_AXIS = "data"
MODEL_AXIS = "model"


class ParallelError(errors.UserError):
  """The devices or processes cannot run this config, with a message that says what to change."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> None:
  """Joins this process to the others through `jax.distributed.initialize`.

  Arguments left as None are detected by JAX where it knows the cluster (Cloud TPU, SLURM, Open
  MPI). CPU processes exchange collectives through gloo, whose chatter on stdout is dropped.
  Must run before any other JAX call.
  Where not every process has joined after `timeout_s`, exits with one line (JAX itself would
  abort with a C++ stack trace, which no Python code can catch).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = coordinator_address or "the coordinator the cluster names"
  print(f"joining {num_processes or 'all'} processes at {where} (up to {timeout_s} s)", flush=True)
  joined = threading.Event()

  def give_up() -> None:
    if not joined.wait(timeout_s):
      print(f"mnist_jax: not every process joined at {where} within {timeout_s} s "
            f"(--multihost_timeout); start them all with the same --coordinator_address and "
            f"--num_processes, each with its own --process_id", file=sys.stderr, flush=True)
      os._exit(1)  # pylint: disable=protected-access  # The main thread is blocked in C++.

  threading.Thread(target=give_up, daemon=True).start()
  _drop_gloo_lines()
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s + 60,  # After ours.
    )
  except (ValueError, TypeError, RuntimeError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = ""
    if None in (coordinator_address, num_processes, process_id):
      hint = "; outside Cloud TPU, SLURM and Open MPI give the coordinator address, the number "
      hint += "of processes and this process's id"
    raise ParallelError(f"jax.distributed.initialize failed ({first_line}){hint}") from e
  finally:
    joined.set()


# gloo's "[Gloo] Rank <i> is connected to <n> peer ranks. Expected number of connected peer ranks
# is : <n>" line, in the pieces its `std::cout <<` writes: these words, and numbers.
_GLOO_BEGIN = b"[Gloo] Rank "
_GLOO_WORDS = (_GLOO_BEGIN, b" is connected to ", b" peer ranks. ",
               b"Expected number of connected peer ranks is : ")
_DIGITS = b"0123456789"
_GLOO_PIECES = b"(?:" + b"|".join(map(re.escape, _GLOO_WORDS)) + rb"|\d)*"
_GLOO_LINE = re.compile(_GLOO_PIECES)
_GLOO_PARTIAL = re.compile(_GLOO_PIECES + b"(?:" + b"|".join(
    re.escape(words[:end]) for words in _GLOO_WORDS for end in range(1, len(words))) + b")?")


class GlooFilter:
  """Takes gloo's lines out of a byte stream, chunk by chunk: `feed(chunk)` and `end()` return
  what is left to pass on.

  gloo writes its line piece by piece, and the threads connecting a process's devices write at
  once: one line of the stream can hold pieces of several of gloo's lines, and their newlines
  can come later, on lines of their own. So a line made of gloo's pieces alone is gloo's, and
  so is an empty or digits-only line while some of gloo's lines still lack their newline. A
  partial line that could be gloo's waits for its end; any other passes on at once.
  """

  def __init__(self):
    self._pending = b""
    self._open = 0  # gloo's lines begun whose newline has not come yet

  def _is_gloo(self, line: bytes) -> bool:
    if not _GLOO_LINE.fullmatch(line):
      return False
    if line.strip(_DIGITS):  # Some of gloo's words: its line, and maybe the start of others.
      self._open = max(0, self._open + line.count(_GLOO_BEGIN) - 1)
      return True
    if self._open:  # The newline, maybe after a number, of a line begun earlier.
      self._open -= 1
      return True
    return False

  def _may_be_gloo(self, partial: bytes) -> bool:
    return bool(_GLOO_PARTIAL.fullmatch(partial)) and bool(self._open or partial.strip(_DIGITS))

  def feed(self, chunk: bytes) -> bytes:
    *lines, self._pending = (self._pending + chunk).split(b"\n")
    kept = b"".join(line + b"\n" for line in lines if not self._is_gloo(line))
    if self._pending and not self._may_be_gloo(self._pending):
      kept, self._pending = kept + self._pending, b""
    return kept

  def end(self) -> bytes:
    rest, self._pending = self._pending, b""
    return b"" if self._may_be_gloo(rest) else rest


def _drop_gloo_lines() -> None:
  """Keeps gloo's "[Gloo] Rank <i> is connected to <n> peer ranks" lines off the terminal.

  Its C++ writes them straight to the stdout file descriptor for each group of devices it
  connects, at the first collective of that group, and no setting turns them off. So file
  descriptor 1 becomes a pipe, and a thread passes on what `GlooFilter` leaves as it comes; at exit
  the real stdout is put back and the thread passes on what is left. stderr is not touched.
  """
  read_fd, write_fd = os.pipe()
  stdout_fd = os.dup(1)
  sys.stdout.flush()
  os.dup2(write_fd, 1)
  os.close(write_fd)

  def forward() -> None:
    gloo = GlooFilter()
    while chunk := os.read(read_fd, 65536):
      if kept := gloo.feed(chunk):
        os.write(stdout_fd, kept)
    if rest := gloo.end():
      os.write(stdout_fd, rest)
    os.close(read_fd)

  thread = threading.Thread(target=forward, name="mnist_jax stdout", daemon=True)
  thread.start()

  def restore() -> None:
    sys.stdout.flush()
    os.dup2(stdout_fd, 1)  # Closes the pipe's last write end: the thread reads to its end.
    thread.join(timeout=10)

  atexit.register(restore)


# Flags `set_xla_flags` adds unless `XLA_FLAGS` names them already; each reaches one backend.
DEFAULT_XLA_FLAGS = {
    # 512-bit vector code on CPUs with AVX-512 (by default XLA:CPU emits 256-bit), for a faster
    # epoch there (docs/2026-11-30-results.md, "Speed").
    "xla_cpu_prefer_vector_width": "512",
    # The same sums in every process. Without it XLA:GPU may pick other kernels (autotuning) or
    # orders (atomics) in each process: on an H200 two runs of one config differed in the loss's
    # fourth decimal, and a resumed run drifted from one never stopped. It costs epoch time
    # (docs/2026-11-30-results.md, "GPU: one H200").
    "xla_gpu_deterministic_ops": "true",
}


COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "mnist_jax", "jax")


def use_compilation_cache(directory: str) -> None:
  """Keeps every compiled program in `directory`: a later process that compiles the same program
  (same JAX, flags and devices) loads it instead, the same bits. Where `directory` cannot be
  written (a read-only HOME), one warning line instead of JAX's, and every program compiles."""
  try:
    os.makedirs(directory, exist_ok=True)
    writable = os.access(directory, os.W_OK)
  except OSError:
    writable = False
  if not writable:
    print(f"mnist_jax: warning: the compilation cache {directory} cannot be written; programs "
          f"compile in every run (give --jax_cache_dir a writable folder, or '' for none)",
          file=sys.stderr)
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  # Every program is cached, however quickly it compiles: ours fall below JAX's default threshold.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def set_xla_flags() -> None:
  """Adds `DEFAULT_XLA_FLAGS` to `XLA_FLAGS`, except those the user set there already.

  Must run before JAX starts its backends; processes started later inherit the flags.
  """
  xla_flags = os.environ.get("XLA_FLAGS", "")
  added = [f"--{name}={value}" for name, value in DEFAULT_XLA_FLAGS.items()
           if f"--{name}=" not in xla_flags]
  os.environ["XLA_FLAGS"] = " ".join([xla_flags, *added]).strip()


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """All devices (of every process) on a `(data, model)` mesh, `model` of size 1."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(
      (len(devices), 1),
      (DATA_AXIS, MODEL_AXIS),
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
      devices=devices,
  )


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) dimension split along `data`, the rest whole on each device."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device."""
  return NamedSharding(mesh, P())


def state_sharding(mesh: Mesh, state: Any) -> Any:
  """Shardings for every leaf of the train state: all replicated (pure data parallelism)."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def data_shards(mesh: Mesh) -> int:
  """Into how many parts a batch is split."""
  return mesh.shape[DATA_AXIS]


def check_batch_sizes(config: Any, fields: Sequence[str]) -> None:
  """Refuses global batch sizes, `config.<field>` for each of `fields`, that do not split evenly
  along the `data` axis of all devices. Before any data is read: it needs none."""
  shards = data_shards(create_mesh())
  for field in fields:
    batch_size = config[field]
    if batch_size % shards == 0:
      continue
    lower = batch_size // shards * shards
    upper = lower + shards
    suggestions = " or ".join(str(size) for size in (lower, upper) if size > 0)
    raise ParallelError(
        f"config.{field} {batch_size} does not divide among the {shards} devices; use a multiple "
        f"of {shards}, such as {suggestions}"
    )


def put_examples(arrays: Any, mesh: Mesh, multiple: int | None = None) -> Any:
  """Host arrays (the same on every process) -> global arrays sharded along `data`.

  Each array is padded with zeros to a multiple of `multiple` rows (default: the number of `data`
  shards; else a multiple of it, such as the batch size); each process transfers only the rows of
  its own devices.
  """
  sharding = data_sharding(mesh)
  multiple = multiple or data_shards(mesh)
  assert multiple % data_shards(mesh) == 0, (multiple, mesh)

  def put(array: np.ndarray) -> jax.Array:
    padding = -array.shape[0] % multiple
    if padding:
      array = np.pad(array, [(0, padding)] + [(0, 0)] * (array.ndim - 1))
    return jax.make_array_from_process_local_data(sharding, array, array.shape)

  return jax.tree.map(put, arrays)


def put_batch(batch: Any, mesh: Mesh) -> Any:
  """A global host batch (the same on every process) -> arrays sharded along `data`."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x, x.shape), batch
  )


def is_main_process() -> bool:
  """Whether this process writes files and prints: the first, or the only one."""
  return jax.process_index() == 0


def any_process(flags: Sequence[bool]) -> list[bool]:
  """Whether each of `flags` holds on any process; every process must ask at the same point."""
  if jax.process_count() == 1:
    return list(flags)
  gathered = multihost_utils.process_allgather(np.array(flags, np.int32))
  return [bool(flag) for flag in np.max(gathered.reshape(-1, len(flags)), axis=0)]


def main_process_first(fn: Callable[..., Any], *args: Any) -> Any:
  """`fn(*args)` on the first process, then on all others.

  For work that two processes must not do at once, such as preparing a dataset in a directory
  that all hosts share.
  """
  if jax.process_count() == 1:
    return fn(*args)
  result = fn(*args) if is_main_process() else None
  _wait_for_all(f"mnist_jax {fn.__name__}")
  return result if is_main_process() else fn(*args)


_BARRIERS = itertools.count()


def _wait_for_all(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process gets here, up to `timeout_s`.

  Through jax.distributed's coordination service, as orbax's barriers do, not a collective: gloo
  gives up on a process that has not come after 30 s, and the work that the others wait for here
  (preparing a dataset on a loaded machine) can take longer.
  """
  from jax._src import distributed  # pylint: disable=import-outside-toplevel  # No public barrier.

  distributed.global_state.client.wait_at_barrier(f"{name} {next(_BARRIERS)}", timeout_s * 1000)


def local_copy(tree: Any) -> Any:
  """A replicated pytree as arrays on this process's first device, for host-side work."""
  return jax.tree.map(
      lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree
  )
