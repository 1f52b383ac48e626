"""The benchmark harness runs every loop and prints its table (timings are never asserted)."""

import re
import subprocess
import sys

import pytest


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
  for loop in ("jax_device", "keras"):
    accuracy = float(rows[loop][5].rstrip("%"))
    assert 80.0 < accuracy <= 100.0, rows[loop]
  # PyTorch is optional: a row with its figures where it is installed, a note where it is not.
  assert "not installed" in rows["torch"][1] or float(rows["torch"][5].rstrip("%")) > 80.0
  assert "GFLOP/s" in result.stdout and "x that floor" in result.stdout
  assert "x the epoch's own matmuls run alone at batch 500" in result.stdout
  (wall,) = re.findall(r"^command wall: `python -m mnist_jax.main` took ([\d.]+) s: training "
                       r"([\d.]+) s, compiling ([\d.]+) s, and ([\d.]+) s besides", result.stdout,
                       re.MULTILINE)
  wall_s, train_s, compile_s, other_s = map(float, wall)
  assert wall_s > train_s > 0 and compile_s >= 0 and other_s > 0  # Start-up is never free.
