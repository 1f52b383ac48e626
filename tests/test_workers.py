"""Forked workers: only where a command allows them, and none outlives an error of the block."""

import subprocess
import sys
import time

from conftest import REPO, process_alive
from mnist_jax.run import workers

# A process of its own: a fork of pytest's process, where JAX has started, could deadlock.
_SCRIPT = """
import sys, time
from mnist_jax.run import workers
with workers.allowed(), workers.forked(2) as pool:
  [pool.submit(time.sleep, 60) for _ in range(2)]
  print(" ".join(str(pid) for pid in pool._processes), flush=True)
  time.sleep(0.5)  # The workers are asleep in their work.
  raise SystemExit("an error")
"""


def test_there_are_no_workers_unless_allowed():
  with workers.forked(2) as pool:
    assert pool is None


def test_an_error_in_the_block_ends_the_workers_without_waiting_for_their_work():
  start = time.monotonic()
  result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  assert time.monotonic() - start < 30  # Not the 60 s the work would take.
  assert (result.returncode, result.stderr) == (1, "an error\n")
  pids = [int(pid) for pid in result.stdout.split()]
  assert len(pids) == 2 and not any(process_alive(pid) for pid in pids)
