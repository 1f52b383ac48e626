"""The two input pipelines, one interface: `train_epoch(state, epoch_rng)` and `evaluate(state, split)`.

`DevicePipeline` holds every split on the accelerator as uint8 and runs an epoch as one compiled
`lax.scan` (steps.py); `StreamPipeline` holds them in host memory and hands the device chunks of
whole batches, one compiled scan over each, for data that does not fit on the device. Both
visit the examples in the same order and train the same model. Both shard batches along the
mesh's `data` axis over all devices of all processes, the state as `parallel.state_sharding` says
(replicated). With `config.num_seeds` above 1 the state holds one model per seed and the device
pipeline's programs are `vmap`ped over them, the data shared.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_jax import augment, configs, data, steps
from mnist_jax.run import parallel, progress
from mnist_jax.steps import Metrics, TrainState


class _Pipeline:
  """What both pipelines share: the mesh, the shardings, the splits and their sizes."""

  def __init__(self, config: ml_collections.ConfigDict, state: TrainState, splits: dict[str, str]):
    self.config = config
    # "train", "test" and, with a validation fraction, "val": tfds split strings.
    self.splits = splits
    self.mesh = parallel.create_mesh()  # The batch sizes divide among its devices (see callers).
    self.state_sharding = parallel.state_sharding(self.mesh, state)
    self.batch_sharding = parallel.data_sharding(self.mesh)
    self.replicated = parallel.replicated(self.mesh)
    # Seconds to compile each split's program (the stream pipeline's compile inside epoch 1).
    self.compile_times_s: dict[str, float] = {}
    self.num_train = 0


class DevicePipeline(_Pipeline):
  """Every split on the device; each split's program compiled ahead of the first epoch."""

  def __init__(self, config: ml_collections.ConfigDict, state: TrainState, splits: dict[str, str]):
    super().__init__(config, state, splits)
    norm = dict(mean=config.pixel_mean, std=config.pixel_std, batch_sharding=self.batch_sharding)
    vmapped = lambda fn, in_axes, out_axes: (
        jax.vmap(fn, in_axes, out_axes) if config.num_seeds > 1 else fn)
    axes = steps.seed_axes(state)
    state_sh, batch_sh, replicated_sh = self.state_sharding, self.batch_sharding, self.replicated
    self.arrays, self._compiled = {}, {}
    for name, split in splits.items():
      examples = data.load_split(config.dataset, split, config.data_dir)
      is_train = name == "train"
      self.arrays[name] = parallel.put_examples(
          (examples.images_NHWC, examples.labels_N), self.mesh,
          multiple=None if is_train else config.eval_batch_size,
      )
      start = time.perf_counter()
      if is_train:
        self.num_train = len(examples)
        fn = vmapped(functools.partial(steps.train_epoch, batch_size=config.batch_size, **norm,
                                       augmentation=augment.Augmentation.from_config(config)),
                     (axes, None, None, 0, 0), (axes, 0))
        jitted = jax.jit(fn, donate_argnums=0,
                         in_shardings=(state_sh, batch_sh, batch_sh) + (replicated_sh,) * 2,
                         out_shardings=(state_sh, replicated_sh))
        epoch_rng = jax.eval_shape(lambda: steps.seed_rngs(config))  # Shapes alone: nothing runs.
        order = jax.ShapeDtypeStruct((*epoch_rng.shape[:-1], len(examples)), jnp.int32)
        lowered = jitted.lower(state, *self.arrays[name], order, epoch_rng)
      else:
        fn = vmapped(functools.partial(steps.evaluate, batch_size=config.eval_batch_size,
                                       num_examples=len(examples), **norm),
                     (axes, None, None), 0)
        jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh, batch_sh),
                         out_shardings=replicated_sh)
        lowered = jitted.lower(state, *self.arrays[name])
      self._compiled[name] = lowered.compile()
      self.compile_times_s[name] = time.perf_counter() - start

  def train_epoch(self, state: TrainState, epoch_rng: np.ndarray) -> tuple[TrainState, Metrics]:
    order = steps.epoch_order(epoch_rng, self.num_train)
    return self._compiled["train"](state, *self.arrays["train"], order, epoch_rng)

  def evaluate(self, state: TrainState, name: str = "test") -> Metrics:
    """Loss, accuracy and count on the split called `name` ("test" or "val")."""
    return self._compiled[name](state, *self.arrays[name])


class StreamPipeline(_Pipeline):
  """Each split held in host memory, as `data.load_split` decodes it from tfds once and keeps it;
  the device gets it in chunks of whole batches, one compiled call of `steps.train_steps` (or
  `steps.evaluate_sums`) per chunk of about `CHUNK_EXAMPLES` examples, uint8 across the copy.

  For data that fits the host but not the device. The order of an epoch is the device
  pipeline's (`steps.epoch_order`), and so are the steps' keys, so both train the same model.
  JAX dispatches each call without waiting for it, so the host gathers the next chunk while the
  device trains on the last one. Compiled at the first chunk (and again for a shorter last one).
  """

  def __init__(self, config: ml_collections.ConfigDict, state: TrainState, splits: dict[str, str]):
    super().__init__(config, state, splits)
    self.host = {name: data.load_split(config.dataset, split, config.data_dir)
                 for name, split in splits.items()}
    if "train" in splits:
      self.num_train = len(self.host["train"])
    norm = dict(mean=config.pixel_mean, std=config.pixel_std, batch_sharding=self.batch_sharding)
    self._train_chunk = jax.jit(
        functools.partial(steps.train_steps, batch_size=config.batch_size, **norm,
                          augmentation=augment.Augmentation.from_config(config)),
        donate_argnums=0, out_shardings=(self.state_sharding, self.replicated))
    self._eval_chunk = functools.cache(lambda num_examples: jax.jit(functools.partial(
        steps.evaluate_sums, batch_size=config.eval_batch_size, num_examples=num_examples, **norm),
        out_shardings=self.replicated))

  def train_epoch(self, state: TrainState, epoch_rng: np.ndarray) -> tuple[TrainState, Metrics]:
    batch_size = self.config.batch_size
    num_steps = self.num_train // batch_size
    chunk_steps = max(1, CHUNK_EXAMPLES // batch_size)
    split = self.host["train"]
    order = steps.epoch_order(epoch_rng, self.num_train)
    on_step = progress.EpochProgress(num_steps, batch_size)
    metrics_by_chunk = []
    for first in range(0, num_steps, chunk_steps):
      rows = order[first * batch_size:min(first + chunk_steps, num_steps) * batch_size]
      images, labels = parallel.put_examples((split.images_NHWC[rows], split.labels_N[rows]),
                                             self.mesh)
      in_order = np.arange(len(rows), dtype=np.int32)  # The chunk is gathered in the epoch's order.
      state, metrics = self._train_chunk(state, images, labels, in_order, epoch_rng, np.int32(first))
      metrics_by_chunk.append(metrics)
      on_step(first + len(rows) // batch_size, state)
    if not metrics_by_chunk:
      raise configs.ConfigError("the training split has fewer examples than config.batch_size")
    return state, jax.tree.map(lambda *parts: jnp.mean(jnp.concatenate(parts)), *metrics_by_chunk)

  def evaluate(self, state: TrainState, name: str = "test") -> Metrics:
    split, batch_size = self.host[name], self.config.eval_batch_size
    chunk = max(1, CHUNK_EXAMPLES // batch_size) * batch_size
    sums = steps.EVAL_ZEROS
    for start in range(0, len(split), chunk):
      images, labels = parallel.put_examples(
          (split.images_NHWC[start:start + chunk], split.labels_N[start:start + chunk]), self.mesh,
          multiple=batch_size)
      sums = self._eval_chunk(min(chunk, len(split) - start))(state, images, labels, sums)
    return steps.summarize_eval(sums)


# Examples a stream-pipeline call hands the device: 6 MB of MNIST's uint8 images, about 1/7 of
# an epoch. Larger chunks cost device memory; smaller ones more calls and copies.
CHUNK_EXAMPLES = 8192


def create_pipeline(config: ml_collections.ConfigDict, state: TrainState, splits: dict[str, str]
                    ) -> DevicePipeline | StreamPipeline:
  """The pipeline `config.input_pipeline` names, over `splits` (name -> tfds split string)."""
  pipeline = DevicePipeline if config.input_pipeline == "device" else StreamPipeline
  return pipeline(config, state, splits)


def evaluate_test_split(config: ml_collections.ConfigDict, state: TrainState
                        ) -> dict[str, np.ndarray]:
  """Test loss, accuracy and count of `state`, as training reports them: scalars, or one value
  per seed where `config.num_seeds` > 1. Loads the test split alone and compiles its program only.

  Where the number of devices does not divide `config.eval_batch_size` (a run trained on other
  devices), the batch is rounded up to a multiple of that number: the metrics do not depend on it.
  """
  shards = parallel.data_shards(parallel.create_mesh())
  config = config.copy_and_resolve_references()
  config.eval_batch_size = -(-config.eval_batch_size // shards) * shards
  return jax.device_get(create_pipeline(config, state, {"test": "test"}).evaluate(state))
