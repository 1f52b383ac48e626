"""The benchmark harness runs every loop and prints its table (timings are never asserted)."""

import re
import subprocess
import sys

import pytest

from mnist_jax.run import sources


@pytest.mark.slow
def test_quick_benchmark_from_another_directory_prints_a_row_per_loop(tmp_path):
  # Started outside the repository, it still finds its default config, experiments/seed_mlp.py.
  result = subprocess.run(
      [sys.executable, "-m", "mnist_jax.tools.bench", "--quick", "--config.batch_size=500",
       "--loops=jax_device,command,keras,torch"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
  )
  assert result.returncode == 0, result.stderr
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in result.stdout.splitlines()
          if line.startswith("| ") and not line.startswith("| loop")}
  assert set(rows) == {"jax_device", "keras", "torch"}
  assert 80.0 < float(rows["jax_device"][5].rstrip("%")) <= 100.0, rows["jax_device"]
  # Keras and PyTorch are optional: a row with their figures where they are installed, else a note.
  if sources.have_tensorflow():
    assert 80.0 < float(rows["keras"][5].rstrip("%")) <= 100.0, rows["keras"]
  else:
    assert rows["keras"][1] == "needs TensorFlow: pip install -e '.[tf]'", rows["keras"]
  assert "not installed" in rows["torch"][1] or float(rows["torch"][5].rstrip("%")) > 80.0
  assert "GFLOP/s" in result.stdout and "x that floor" in result.stdout
  assert "x the epoch's own matmuls run alone at batch 500" in result.stdout
  (wall,) = re.findall(r"^command wall: `python -m mnist_jax.main` took ([\d.]+) s: training "
                       r"([\d.]+) s, compiling ([\d.]+) s, and ([\d.]+) s besides", result.stdout,
                       re.MULTILINE)
  wall_s, train_s, compile_s, other_s = map(float, wall)
  assert wall_s > train_s > 0 and compile_s >= 0 and other_s > 0  # Start-up is never free.


_TFDATA_EPOCHS = """
import numpy as np
from mnist_jax.tools import bench_others
def labels(seed):
  return np.concatenate([labels for _, labels in bench_others.tfdata_batches("mnist", "test", 4096, seed)])
first, again, other = labels(1), labels(1), labels(2)
print(len(first), (first == again).all(), (first == other).all(), np.bincount(first).sum())
"""


@pytest.mark.tf
def test_the_tfdata_row_reads_seeded_shuffled_batches_of_tfds_mnist():
  # Its own process: this module's flags would clash with main.py's in the test process.
  result = subprocess.run([sys.executable, "-c", _TFDATA_EPOCHS], capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr
  # 10,000 // 4096 batches, the partial one dropped; the same seed, the same order.
  assert result.stdout.split() == ["8192", "True", "False", "8192"]
