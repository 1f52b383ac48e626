"""`python -m mnist_jax.bench`: the benchmark of tools/bench.py, under its original command."""

from absl import app

from mnist_jax.run import interrupts
from mnist_jax.tools import bench

if __name__ == "__main__":
  interrupts.exit_on_interrupt("mnist_jax.bench")
  with interrupts.no_teardown():
    app.run(bench.main)
