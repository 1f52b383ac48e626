"""`python tests/parallel_worker.py PARAMS_DIR MAIN_FLAGS...`: the command line, keeping the params.

Runs `mnist_jax.main` with MAIN_FLAGS and then writes the final params, as every device of this
process holds them, to `PARAMS_DIR/process<i>.npz` (keys `device<id>/<param path>`), so that tests
can compare runs on different device and process counts.
"""

import os
import sys
from unittest import mock

import jax
import numpy as np
from mnist_jax import main, train


def train_keeping_state(run_training, *args, **kwargs):
  """Calls `run_training(*args, **kwargs)`, which trains through `train.train_and_evaluate`;
  returns its result and the state that training ended with."""
  original = train.train_and_evaluate
  last = {}

  def recording(*train_args, **train_kwargs):
    last["state"], final = original(*train_args, **train_kwargs)
    return last["state"], final

  with mock.patch.object(train, "train_and_evaluate", recording):
    result = run_training(*args, **kwargs)
  return result, last["state"]


def local_params(state) -> dict[str, np.ndarray]:
  """Every addressable copy of every param, keyed `device<id>/<path>`."""
  arrays = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    for shard in leaf.addressable_shards:
      arrays[f"device{shard.device.id}/{jax.tree_util.keystr(path)}"] = np.asarray(shard.data)
  return arrays


def _main(argv):
  params_dir = argv.pop(1)
  main._parse_flags(argv)  # pylint: disable=protected-access
  _, state = train_keeping_state(main.main, argv[:1])
  os.makedirs(params_dir, exist_ok=True)
  np.savez(os.path.join(params_dir, f"process{jax.process_index()}.npz"), **local_params(state))


if __name__ == "__main__":
  _main(sys.argv)
