"""The two input pipelines, one interface: `train_epoch(state, epoch_rng)` and `evaluate(state, split)`.

`DevicePipeline` holds every split on the accelerator as uint8 and runs an epoch as one compiled
`lax.scan` (steps.py); `StreamPipeline` feeds tf.data batches, one by one, to the same jitted
step, for data that does not fit on the device. Both shard batches along the mesh's `data` axis
over all devices of all processes, the state as `parallel.state_sharding` says (replicated). With
`config.num_seeds` above 1 the state holds one model per seed and the device pipeline's programs
are `vmap`ped over them, the data shared.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_jax import augment, configs, data, parallel, progress, steps
from mnist_jax.steps import Batch, Metrics, TrainState


class _Pipeline:
  """What both pipelines share: the mesh, the shardings, the splits and their sizes."""

  def __init__(self, config: ml_collections.ConfigDict, state: TrainState, splits: dict[str, str]):
    self.config = config
    # "train", "test" and, with a validation fraction, "val": tfds split strings.
    self.splits = splits
    self.mesh = parallel.create_mesh()
    parallel.check_batch_size("config.batch_size", config.batch_size, self.mesh)
    parallel.check_batch_size("config.eval_batch_size", config.eval_batch_size, self.mesh)
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
  """tf.data batches of each split, through a jitted step; compiled at the first batch."""

  def __init__(self, config: ml_collections.ConfigDict, state: TrainState, splits: dict[str, str]):
    super().__init__(config, state, splits)
    self._train_step = jax.jit(steps.train_step, donate_argnums=0,
                               in_shardings=(self.state_sharding, self.batch_sharding),
                               out_shardings=(self.state_sharding, self.replicated))
    self._eval_step = jax.jit(steps.eval_step,
                              in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=self.replicated)
    if "train" in splits:
      self.num_train = data.num_examples(config.dataset, splits["train"], config.data_dir)

  def train_epoch(self, state: TrainState, epoch_rng: np.ndarray) -> tuple[TrainState, Metrics]:
    on_step = progress.EpochProgress(self.num_train // self.config.batch_size,
                                     self.config.batch_size)
    batches = self._batches("train", self.config.batch_size, shuffle_seed=_stream_seed(epoch_rng))
    return train_epoch_stream(self._train_step, state, batches, on_step)

  def evaluate(self, state: TrainState, name: str = "test") -> Metrics:
    return evaluate_stream(self._eval_step, state, self._batches(name, self.config.eval_batch_size))

  def _batches(self, name: str, batch_size: int, shuffle_seed: int | None = None
               ) -> Iterable[Batch]:
    batches = data.stream_batches(
        self.config.dataset, self.splits[name], batch_size=batch_size,
        mean=self.config.pixel_mean, std=self.config.pixel_std, shuffle_seed=shuffle_seed,
        data_dir=self.config.data_dir,
    )
    return (parallel.put_batch(batch, self.mesh) for batch in batches)


def _stream_seed(epoch_rng: np.ndarray) -> int:
  """A tf.data shuffle seed drawn from the epoch's key, so both pipelines derive order alike."""
  return int(jax.random.bits(epoch_rng, dtype=jnp.uint32) >> 1)


def train_epoch_stream(
    train_step_fn: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    state: TrainState,
    batches: Iterable[Batch],
    on_step: Callable[[int, TrainState], None] | None = None,
) -> tuple[TrainState, Metrics]:
  """One epoch of host batches through a jitted `train_step`; metrics stay on the device.

  `on_step(steps_done, state)`, where given, follows every step (see `progress.EpochProgress`).
  """
  totals, num_steps = None, 0
  for batch in batches:
    state, metrics = train_step_fn(state, batch)
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    num_steps += 1
    if on_step is not None:
      on_step(num_steps, state)
  if totals is None:
    raise configs.ConfigError("the training split has fewer examples than config.batch_size")
  return state, jax.tree.map(lambda total: total / num_steps, totals)


def evaluate_stream(
    eval_step_fn: Callable[[TrainState, Batch], Metrics], state: TrainState,
    batches: Iterable[Batch],
) -> Metrics:
  """Loss and accuracy over padded and masked host batches, through a jitted `eval_step`."""
  sums = None
  for batch in batches:
    batch_sums = eval_step_fn(state, batch)
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
  return steps.summarize_eval(sums)


def create(config: ml_collections.ConfigDict, state: TrainState, splits: dict[str, str]
           ) -> DevicePipeline | StreamPipeline:
  """The pipeline `config.input_pipeline` names, over `splits` (name -> tfds split string)."""
  pipeline = DevicePipeline if config.input_pipeline == "device" else StreamPipeline
  return pipeline(config, state, splits)


def evaluate_test_split(config: ml_collections.ConfigDict, state: TrainState
                        ) -> dict[str, np.ndarray]:
  """Test loss, accuracy and count of `state`, as training reports them: scalars, or one value
  per seed where `config.num_seeds` > 1. Loads the test split alone and compiles its program only."""
  return jax.device_get(create(config, state, {"test": "test"}).evaluate(state))
