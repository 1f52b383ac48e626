"""Learning rate x batch size for the seed MLP (784-128-10, Adam, 10 epochs), 3 seeds per point.

  python -m mnist_jax.main --mode=sweep --config=experiments/lr_batch_sweep.py \
      --workdir=runs/lr_batch_sweep

Trains 9 points x 3 seeds into `runs/lr_batch_sweep/<point>/seed_<seed>/` and ranks the points in
`runs/lr_batch_sweep/sweep_summary.md` (and `.csv`). Running the command again skips finished
seeds and resumes unfinished ones. Points are ranked by validation accuracy on the last 10% of
the training split. The best point: the README's results table; the whole ranking:
docs/2026-11-30-results.md ("Sweeps").

`experiments/lr_batch_sweep.py:smoke`: 2 learning rates x 2 batch sizes x 2 seeds, one epoch each.
"""

import itertools

import ml_collections

from mnist_jax import configs

_GRIDS = {
    None: dict(learning_rate=(3e-4, 1e-3, 3e-3), batch_size=(32, 128, 512), seed=(0, 1, 2)),
    "smoke": dict(learning_rate=(1e-3, 3e-3), batch_size=(128, 512), seed=(0, 1)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = configs.sibling(__file__, "seed_mlp", arg)
  config.validation_fraction = 0.1  # Points are ranked on train[54000:]; the test set only reports.
  return config


def get_sweep(arg: str | None = None) -> list[dict]:
  """Every combination of the grid's values, one dict of config overrides each."""
  if arg not in _GRIDS:
    raise ValueError(f"unknown variant {arg!r} of lr_batch_sweep; use 'smoke' or none")
  grid = _GRIDS[arg]
  return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
