"""`python -m mnist_jax.bench`: the benchmark of tools/bench.py, under its original command."""

from absl import app

from mnist_jax.tools import bench

if __name__ == "__main__":
  app.run(bench.main)
