"""Pure train and eval steps, the epoch loops of both input pipelines, and `train_and_evaluate`."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from mnist_jax import augment, checkpoints, data, models, parallel, progress, reports, summaries

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class ConfigError(Exception):
  """A config value that cannot work, with a message that says which and why."""


class TrainingError(Exception):
  """Training cannot go on (for example the loss stopped being finite)."""


class TrainState(train_state.TrainState):
  """Flax's train state plus this model's dropout key, folded with the step at each step."""

  dropout_rng: jax.Array


# ---------------------------------------------------------------------------------------------
# Building the state.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Refuses values that cannot train, each with one line that names the field."""
  if config.batch_size <= 0:
    raise ConfigError(f"config.batch_size must be positive, got {config.batch_size}")
  if config.eval_batch_size <= 0:
    raise ConfigError(f"config.eval_batch_size must be positive, got {config.eval_batch_size}")
  if config.num_epochs < 0:
    raise ConfigError(f"config.num_epochs must be >= 0, got {config.num_epochs}")
  if config.learning_rate <= 0:
    raise ConfigError(f"config.learning_rate must be positive, got {config.learning_rate}")
  if config.input_pipeline not in ("device", "stream"):
    raise ConfigError(
        f"config.input_pipeline must be 'device' or 'stream', got {config.input_pipeline!r}"
    )
  if config.model not in models.MODELS:
    raise ConfigError(f"config.model must be one of {sorted(models.MODELS)}, got {config.model!r}")
  if config.optimizer not in _OPTIMIZERS:
    raise ConfigError(
        f"config.optimizer must be one of {sorted(_OPTIMIZERS)}, got {config.optimizer!r}"
    )
  if config.lr_schedule not in ("constant", "cosine"):
    raise ConfigError(
        f"config.lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}"
    )
  if config.num_seeds < 1:
    raise ConfigError(f"config.num_seeds must be >= 1, got {config.num_seeds}")
  if config.num_seeds > 1 and config.input_pipeline != "device":
    raise ConfigError("config.num_seeds > 1 needs input_pipeline='device' (one data order a seed)")
  if not 0 <= config.validation_fraction < 1:
    raise ConfigError(
        f"config.validation_fraction must be in [0, 1), got {config.validation_fraction}")
  if config.early_stopping_patience < 0:
    raise ConfigError(
        f"config.early_stopping_patience must be >= 0, got {config.early_stopping_patience}")
  if config.pixel_std <= 0:
    raise ConfigError(f"config.pixel_std must be positive, got {config.pixel_std}")
  _validate_augmentation(config)


def _validate_augmentation(config: ml_collections.ConfigDict) -> None:
  for name in ("augment_shift", "augment_rotate_degrees", "augment_scale"):
    if config[name] < 0:
      raise ConfigError(f"config.{name} must be >= 0, got {config[name]}")
  if config.augment_scale >= 1:
    raise ConfigError(f"config.augment_scale must be below 1, got {config.augment_scale}")
  if augment.Augmentation.from_config(config).enabled and config.input_pipeline != "device":
    raise ConfigError("config.augment_* needs input_pipeline='device' (augmentation runs there)")


_OPTIMIZERS = {
    "adam": lambda lr, config: optax.adam(lr),
    "adamw": lambda lr, config: optax.adamw(lr, weight_decay=config.weight_decay),
    "sgd": lambda lr, config: optax.sgd(lr, momentum=config.momentum or None, nesterov=True),
}


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.ScalarOrSchedule:
  """`config.learning_rate` under `config.lr_schedule` over the whole run."""
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(
        config.learning_rate, decay_steps=max(1, config.num_epochs * steps_per_epoch)
    )
  return config.learning_rate


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer` with `config.lr_schedule` over the whole run."""
  return _OPTIMIZERS[config.optimizer](learning_rate_schedule(config, steps_per_epoch), config)


def create_train_state(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    rng: jax.Array,
    steps_per_epoch: int,
) -> TrainState:
  """Initializes the model named by `config.model` and its optimizer."""
  try:
    model = models.create_model(config.model, info.num_classes, **config.model_args)
  except (TypeError, AttributeError) as e:
    raise ConfigError(f"config.model_args do not fit model {config.model!r}: {e}") from e
  params_rng, dropout_rng = jax.random.split(rng)
  try:
    variables = model.init(params_rng, jnp.zeros((1, *info.image_shape)), train=False)
  except AttributeError as e:
    raise ConfigError(f"config.model_args: {e}") from e
  return TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      tx=create_optimizer(config, steps_per_epoch),
      dropout_rng=dropout_rng,
  )


# ---------------------------------------------------------------------------------------------
# Pure steps.


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
  """One Adam (or other optax) step on a batch of normalized images and integer labels."""
  dropout_rng = jax.random.fold_in(state.dropout_rng, state.step)

  def loss_fn(params):
    logits_BC = state.apply_fn(
        {"params": params}, batch["image"], train=True, rngs={"dropout": dropout_rng}
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["label"]).mean()
    return loss, logits_BC

  (loss, logits_BC), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  accuracy = jnp.mean(jnp.argmax(logits_BC, -1) == batch["label"])
  return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": accuracy}


def eval_step(state: TrainState, batch: Batch) -> Metrics:
  """Sums of loss and correct predictions over the examples where `batch["mask"]` is true."""
  logits_BC = state.apply_fn({"params": state.params}, batch["image"], train=False)
  losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["label"])
  correct_B = jnp.argmax(logits_BC, -1) == batch["label"]
  mask_B = batch["mask"]
  return {
      "loss": jnp.sum(jnp.where(mask_B, losses_B, 0.0)),
      "correct": jnp.sum(correct_B & mask_B),
      "count": jnp.sum(mask_B),
  }


def summarize_eval(sums: Metrics) -> Metrics:
  """Mean loss and accuracy from the sums of `eval_step`."""
  return {
      "loss": sums["loss"] / sums["count"],
      "accuracy": sums["correct"] / sums["count"],
      "count": sums["count"],
  }


# ---------------------------------------------------------------------------------------------
# The device pipeline: the whole split on the accelerator, an epoch as one compiled scan.

AUGMENT_PURPOSE = 1  # Folded into the epoch key for augmentation; the key itself orders the data.


def epoch_order(epoch_rng: jax.Array, num_examples: int) -> np.ndarray:
  """The order in which an epoch visits the examples: a permutation drawn from the epoch's key.

  NumPy shuffles 60,000 indices on the host in under a millisecond. `jax.random.permutation`
  sorts twice on the device, which XLA:CPU does slowly: 13% of a seed-MLP epoch on two cores.
  With one key a seed (`epoch_rng` of shape `[S, 2]`), one permutation a seed, `[S, N]`.
  """
  keys = np.asarray(epoch_rng)
  if keys.ndim == 2:
    return np.stack([epoch_order(key, num_examples) for key in keys])
  return np.random.default_rng(keys).permutation(num_examples).astype(np.int32)


def train_epoch(
    state: TrainState,
    images_NHWC: jax.Array,
    labels_N: jax.Array,
    order_N: jax.Array,
    epoch_rng: jax.Array,
    *,
    batch_size: int,
    mean: float,
    std: float,
    batch_sharding: jax.sharding.Sharding | None = None,
    augmentation: augment.Augmentation = augment.Augmentation(),
) -> tuple[TrainState, Metrics]:
  """One epoch over device-resident uint8 images, in the order `order_N`, as a `lax.scan`.

  Step `s` trains on the examples `order_N[s * batch_size : (s + 1) * batch_size]`; the last
  `len(order_N) % batch_size` are left out, so every step has the same shape (a new permutation
  from `epoch_order` each epoch means every example is seen). Rows of the arrays that `order_N`
  does not name, such as padding that makes them divide among devices, are never drawn. With
  `batch_sharding`, each gathered batch is laid out that way (split along the mesh's `data`
  axis). An enabled `augmentation` transforms each batch's pixels before normalization, with step
  `s`'s key `fold_in(fold_in(epoch_rng, AUGMENT_PURPOSE), s)`: a function of (seed, epoch, step).
  """
  steps = order_N.shape[0] // batch_size
  order_SB = order_N[: steps * batch_size].reshape(steps, batch_size)
  augment_rng = jax.random.fold_in(epoch_rng, AUGMENT_PURPOSE)

  def step(state, scanned):
    step_index, indices_B = scanned
    images_BHWC = images_NHWC[indices_B].astype(jnp.float32)
    if augmentation.enabled:
      images_BHWC = augmentation(images_BHWC, jax.random.fold_in(augment_rng, step_index))
    batch = {"image": data.normalize(images_BHWC, mean, std), "label": labels_N[indices_B]}
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return train_step(state, batch)

  state, metrics_S = jax.lax.scan(step, state, (jnp.arange(steps), order_SB))
  return state, jax.tree.map(jnp.mean, metrics_S)


def evaluate(
    state: TrainState,
    images_NHWC: jax.Array,
    labels_N: jax.Array,
    *,
    batch_size: int,
    mean: float,
    std: float,
    num_examples: int | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> Metrics:
  """Loss and accuracy over every example, padded to whole batches and masked, as a `lax.scan`.

  Rows past `num_examples` are padding and count for nothing; `batch_sharding` as in `train_epoch`.
  With the rows split into `D` contiguous blocks, one per device along `data`, batch `s` takes the
  `s`-th `batch_size / D` rows of every block, so each device feeds its share of every batch from
  its own memory (the sums do not depend on order). With one device, batches are consecutive rows.
  """
  num_examples = images_NHWC.shape[0] if num_examples is None else num_examples
  steps = -(-num_examples // batch_size)
  padding = steps * batch_size - images_NHWC.shape[0]
  per_shard = batch_size if batch_sharding is None else batch_sharding.shard_shape((batch_size,))[0]

  def batches(x_N):
    x_N = jnp.pad(x_N, [(0, padding)] + [(0, 0)] * (x_N.ndim - 1))
    x_DSb = x_N.reshape(batch_size // per_shard, steps, per_shard, *x_N.shape[1:])
    return jnp.swapaxes(x_DSb, 0, 1).reshape(steps, batch_size, *x_N.shape[1:])

  images_SB, labels_SB = batches(images_NHWC), batches(labels_N)
  mask_SB = batches(jnp.arange(images_NHWC.shape[0]) < num_examples)

  def step(sums, batch):
    images, labels, mask = batch
    batch = {
        "image": data.normalize(images.astype(jnp.float32), mean, std),
        "label": labels,
        "mask": mask,
    }
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return jax.tree.map(jnp.add, sums, eval_step(state, batch)), None

  zeros = {"loss": jnp.float32(0), "correct": jnp.int32(0), "count": jnp.int32(0)}
  sums, _ = jax.lax.scan(step, zeros, (images_SB, labels_SB, mask_SB))
  return summarize_eval(sums)


# ---------------------------------------------------------------------------------------------
# The stream pipeline: tf.data batches fed to the same jitted step.


def train_epoch_stream(
    train_step_fn,
    state: TrainState,
    batches: Iterable[Batch],
    on_step: Callable[[int, TrainState], None] | None = None,
) -> tuple[TrainState, Metrics]:
  """One epoch of host batches through a jitted `train_step`; metrics stay on the device.

  `on_step(steps_done, state)`, where given, follows every step (see `progress.EpochProgress`).
  """
  totals, steps = None, 0
  for batch in batches:
    state, metrics = train_step_fn(state, batch)
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    steps += 1
    if on_step is not None:
      on_step(steps, state)
  if totals is None:
    raise ConfigError("the training split has fewer examples than config.batch_size")
  return state, jax.tree.map(lambda total: total / steps, totals)


def evaluate_stream(eval_step_fn, state: TrainState, batches: Iterable[Batch]) -> Metrics:
  """Loss and accuracy over padded and masked host batches, through a jitted `eval_step`."""
  sums = None
  for batch in batches:
    batch_sums = eval_step_fn(state, batch)
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
  return summarize_eval(sums)


# ---------------------------------------------------------------------------------------------
# The loop.


def _epoch_rng(data_rng: jax.Array, epoch: int) -> jax.Array:
  return jax.random.fold_in(data_rng, epoch)


def _stream_seed(epoch_rng: jax.Array) -> int:
  """A tf.data shuffle seed drawn from the epoch's key, so both pipelines derive order alike."""
  return int(jax.random.bits(epoch_rng, dtype=jnp.uint32) >> 1)


def seed_axes(state: TrainState) -> TrainState:
  """`vmap` axes of a state that holds one model per seed: all leaves but the shared step."""
  return state.replace(step=None, params=0, opt_state=0, dropout_rng=0)


def _first_seed(state: TrainState) -> TrainState:
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  return state.replace(params=first(state.params), opt_state=first(state.opt_state),
                       dropout_rng=state.dropout_rng[0])


def seed_rngs(config: ml_collections.ConfigDict) -> jax.Array:
  """The root key of each seed: model `i` of a run is the model a run with seed `seed + i` trains."""
  seeds = jnp.arange(config.seed, config.seed + config.num_seeds)
  return jax.vmap(jax.random.PRNGKey)(seeds) if config.num_seeds > 1 else jax.random.PRNGKey(
      config.seed)


def initial_state(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, steps_per_epoch: int
) -> tuple[TrainState, np.ndarray]:
  """The state a run starts from, one model per seed, and every epoch's keys for the data order.

  `epoch_rngs[e]` is epoch `e`'s key (`[num_seeds, 2]` with several seeds), for `e` up to
  `config.num_epochs`. Computed as one compiled program, with the same bits as op by op, where each
  initializer and key derivation compiles apart (27 programs for the seed MLP; 0.5-0.7 s of the
  seed command on two CPU cores without the compilation cache, 0.1-0.3 s with it).
  """

  @jax.jit
  def initialize():
    rngs = seed_rngs(config)
    epochs = jnp.arange(config.num_epochs + 1)
    if config.num_seeds == 1:
      init_rng, data_rng = jax.random.split(rngs)
      return (create_train_state(config, info, init_rng, steps_per_epoch),
              jax.vmap(_epoch_rng, (None, 0))(data_rng, epochs))
    init_rngs, data_rngs = jnp.swapaxes(jax.vmap(jax.random.split)(rngs), 0, 1)
    state = jax.vmap(lambda rng: create_train_state(config, info, rng, steps_per_epoch))(init_rngs)
    epoch_rngs = jax.vmap(jax.vmap(_epoch_rng, (0, None)), (None, 0))(data_rngs, epochs)
    return state.replace(step=state.step[0]), epoch_rngs  # One step count, as `seed_axes` says.

  state, epoch_rngs = initialize()
  return state, np.asarray(epoch_rngs)


def _record_metrics(prefix: str, metrics: Metrics) -> dict[str, Any]:
  """`{prefix}_loss` and `{prefix}_accuracy`: with several seeds their mean, std and values."""
  record = {}
  for name in ("loss", "accuracy"):
    values = np.asarray(jax.device_get(metrics[name]))
    record[f"{prefix}_{name}"] = float(values.mean())
    if values.ndim:
      record[f"{prefix}_{name}_std"] = float(values.std())
      record[f"{prefix}_{name}_per_seed"] = values.tolist()
  return record


def stopped_early(history: list[dict[str, Any]], metric: str, patience: int) -> bool:
  """Whether `metric` has not improved on its best for the last `patience` epochs (0: never)."""
  if not patience or len(history) <= patience:
    return False
  values = [record[metric] for record in history]
  return len(values) - 1 - values.index(max(values)) >= patience


class _Run:
  """Compiled epoch and eval functions of one pipeline, with the data they read.

  Batches and resident splits are sharded along the mesh's `data` axis over all devices of all
  processes, the state as `parallel.state_sharding` says (replicated). With `config.num_seeds`
  above 1 the state holds one model per seed and every function is `vmap`ped over them, the data
  shared.
  """

  def __init__(self, config: ml_collections.ConfigDict, state: TrainState,
               splits: dict[str, str]):
    self.config = config
    # "train", "test" and, with a validation fraction, "val": tfds splits; "test" alone to evaluate.
    self.splits = splits
    self.mesh = mesh = parallel.create_mesh()
    parallel.check_batch_size("config.batch_size", config.batch_size, mesh)
    parallel.check_batch_size("config.eval_batch_size", config.eval_batch_size, mesh)
    self.state_sharding = state_sh = parallel.state_sharding(mesh, state)
    batch_sh, replicated_sh = parallel.data_sharding(mesh), parallel.replicated(mesh)
    # Seconds to compile each split's program. The stream pipeline compiles at its first step,
    # inside epoch 1.
    self.compile_times_s: dict[str, float] = {}
    if config.input_pipeline == "stream":
      self._train_step = jax.jit(train_step, donate_argnums=0, in_shardings=(state_sh, batch_sh),
                                 out_shardings=(state_sh, replicated_sh))
      self._eval_step = jax.jit(eval_step, in_shardings=(state_sh, batch_sh),
                                out_shardings=replicated_sh)
      if "train" in splits:
        self.num_train = data.num_examples(config.dataset, splits["train"], config.data_dir)
      return

    norm = dict(mean=config.pixel_mean, std=config.pixel_std, batch_sharding=batch_sh)
    vmapped = lambda fn, in_axes, out_axes: (
        jax.vmap(fn, in_axes, out_axes) if config.num_seeds > 1 else fn)
    axes = seed_axes(state)
    self.arrays, self._compiled = {}, {}
    for name, split in splits.items():
      examples = data.load_split(config.dataset, split, config.data_dir)
      is_train = name == "train"
      self.arrays[name] = parallel.put_examples(
          (examples.images_NHWC, examples.labels_N), mesh,
          multiple=None if is_train else config.eval_batch_size,
      )
      start = time.perf_counter()
      if is_train:
        self.num_train = len(examples)
        fn = vmapped(functools.partial(train_epoch, batch_size=config.batch_size, **norm,
                                       augmentation=augment.Augmentation.from_config(config)),
                     (axes, None, None, 0, 0), (axes, 0))
        jitted = jax.jit(fn, donate_argnums=0,
                         in_shardings=(state_sh, batch_sh, batch_sh) + (replicated_sh,) * 2,
                         out_shardings=(state_sh, replicated_sh))
        epoch_rng = jax.eval_shape(lambda: seed_rngs(config))  # Shapes alone: nothing runs.
        order = jax.ShapeDtypeStruct((*epoch_rng.shape[:-1], len(examples)), jnp.int32)
        lowered = jitted.lower(state, *self.arrays[name], order, epoch_rng)
      else:
        fn = vmapped(functools.partial(evaluate, batch_size=config.eval_batch_size,
                                       num_examples=len(examples), **norm),
                     (axes, None, None), 0)
        jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh, batch_sh),
                         out_shardings=replicated_sh)
        lowered = jitted.lower(state, *self.arrays[name])
      self._compiled[name] = lowered.compile()
      self.compile_times_s[name] = time.perf_counter() - start

  def train_epoch(self, state: TrainState, epoch_rng: np.ndarray) -> tuple[TrainState, Metrics]:
    if self.config.input_pipeline == "device":
      order = epoch_order(epoch_rng, self.num_train)
      return self._compiled["train"](state, *self.arrays["train"], order, epoch_rng)
    batches = data.stream_batches(
        self.config.dataset, self.splits["train"], batch_size=self.config.batch_size,
        mean=self.config.pixel_mean, std=self.config.pixel_std,
        shuffle_seed=_stream_seed(epoch_rng), data_dir=self.config.data_dir,
    )
    on_step = progress.EpochProgress(self.num_train // self.config.batch_size,
                                     self.config.batch_size)
    return train_epoch_stream(self._train_step, state, self._sharded(batches), on_step)

  def evaluate(self, state: TrainState, name: str = "test") -> Metrics:
    """Loss, accuracy and count on the split called `name` ("test" or "val")."""
    if self.config.input_pipeline == "device":
      return self._compiled[name](state, *self.arrays[name])
    batches = data.stream_batches(
        self.config.dataset, self.splits[name], batch_size=self.config.eval_batch_size,
        mean=self.config.pixel_mean, std=self.config.pixel_std, data_dir=self.config.data_dir,
    )
    return evaluate_stream(self._eval_step, state, self._sharded(batches))

  def _sharded(self, batches: Iterable[Batch]) -> Iterable[Batch]:
    return (parallel.put_batch(batch, self.mesh) for batch in batches)


def _splits(config: ml_collections.ConfigDict) -> dict[str, str]:
  num_train = data.num_examples(config.dataset, "train", config.data_dir)
  train, val = data.holdout_splits(num_train, config.validation_fraction)
  return {"train": train, "test": "test", **({"val": val} if val else {})}


def evaluate_test_split(
    config: ml_collections.ConfigDict, state: TrainState
) -> dict[str, np.ndarray]:
  """Test loss, accuracy and count of `state`, computed as `train_and_evaluate` reports them:
  scalars, or one value per seed where `config.num_seeds` > 1."""
  # The test split alone: no training data loaded, no epoch program compiled.
  return jax.device_get(_Run(config, state, {"test": "test"}).evaluate(state))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains `config` for `config.num_epochs`, evaluating on the test split after each epoch.

  With `config.validation_fraction`, the end of the training split is held out and evaluated
  too, and `config.early_stopping_patience` epochs without a better validation accuracy stop the
  run. Writes `config.json`, `metrics.jsonl` (one object per epoch) and `final_metrics.json` to
  `workdir`, prints one line per epoch, and returns the final metrics. Checkpoints go to
  `workdir/checkpoints/`; a workdir that has them resumes from the latest (see checkpoints.py).
  Under `jax.distributed` every process trains, saves its part of each checkpoint and returns
  the metrics; only the first writes the other files and prints.
  """
  validate_config(config)
  with checkpoints.TrainingCheckpoints(
      workdir, config, allow_config_change=allow_config_change
  ) as ckpts:
    return _train_and_evaluate(config, workdir, ckpts)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, ckpts: checkpoints.TrainingCheckpoints
) -> dict[str, Any]:
  info = parallel.main_process_first(data.dataset_info, config.dataset, config.data_dir)
  splits = _splits(config)
  num_train = data.num_examples(config.dataset, splits["train"], config.data_dir)
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(
        f"config.batch_size {config.batch_size} is larger than the {num_train} training examples"
    )
  state, epoch_rngs = initial_state(config, info, steps_per_epoch)
  run = _Run(config, state, splits)
  state = jax.device_put(state, run.state_sharding)
  state, history = ckpts.resume(
      state, {"steps_per_epoch": steps_per_epoch, "dataset": dataclasses.asdict(info)}
  )
  learning_rate = learning_rate_schedule(config, steps_per_epoch)
  writes = parallel.is_main_process()
  metric = checkpoints.selection_metric(config)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if writes:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) + "\n")
    with open(metrics_path, "w") as f:  # After a resume, the epochs up to its checkpoint.
      f.writelines(json.dumps(record) + "\n" for record in history)
    writer = summaries.Writer(os.path.join(workdir, "tensorboard"))

  record: dict[str, Any] = history[-1] if history else {}
  train_time_s = sum(past["epoch_time_s"] for past in history)
  epoch = record.get("epoch", 0)
  while epoch < config.num_epochs and not stopped_early(
      history, metric, config.early_stopping_patience):
    epoch += 1
    start = time.perf_counter()
    state, train_metrics = run.train_epoch(state, epoch_rngs[epoch])
    train_record = _record_metrics("train", train_metrics)
    epoch_time_s = time.perf_counter() - start
    train_time_s += epoch_time_s
    losses = train_record.get("train_loss_per_seed", [train_record["train_loss"]])
    if not all(math.isfinite(loss) for loss in losses):
      raise TrainingError(
          f"the training loss became {train_record['train_loss']} in epoch {epoch}; "
          f"lower config.learning_rate (now {config.learning_rate})"
      )
    record = {"epoch": epoch, "step": int(state.step), **train_record}
    for name in [name for name in ("val", "test") if name in run.splits]:
      metrics = run.evaluate(state, name)
      record.update(_record_metrics(name, metrics))
      record[f"{name}_examples"] = int(np.max(jax.device_get(metrics["count"])))
    record.update({
        "epoch_time_s": epoch_time_s,
        "examples_per_s": config.num_seeds * steps_per_epoch * config.batch_size / epoch_time_s,
        # The rate of the epoch's last step.
        "learning_rate": float(
            learning_rate(state.step - 1) if callable(learning_rate) else learning_rate
        ),
    })
    history.append(record)
    if writes:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      print(_epoch_line(record, config), flush=True)
      writer.write_epoch(record)
    last = stopped_early(history, metric, config.early_stopping_patience)
    ckpts.end_of_epoch(state, history, last=last)  # Every process saves its part.

  final = {**record, "train_time_s": train_time_s,
           "compile_time_s": sum(run.compile_times_s.values()),
           "compile_times_s": run.compile_times_s,
           "stopped_early": epoch < config.num_epochs}
  if not writes:
    return final
  if final["stopped_early"]:
    print(f"stopped early: {metric} has not improved for {config.early_stopping_patience} epochs",
          flush=True)
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(final, f, indent=2)
  try:
    first_model = _first_seed(state) if config.num_seeds > 1 else state
    reports.after_training(config, workdir, parallel.local_copy(first_model), writer)
  except Exception as e:  # A report only looks at the run; the metrics are already saved.
    print(f"mnist_jax: warning: no training report ({type(e).__name__}: {e}); metrics are in "
          f"{workdir}", file=sys.stderr)
  return final


def _epoch_line(record: dict[str, Any], config: ml_collections.ConfigDict) -> str:
  """`epoch 3/10  train_loss 0.0712  ...  0.31s`; with several seeds, means +- std."""
  parts = [f"epoch {record['epoch']}/{config.num_epochs}"]
  for prefix, short in (("train", "train"), ("val", "val"), ("test", "test")):
    for name, abbreviation in (("loss", "loss"), ("accuracy", "acc")):
      key = f"{prefix}_{name}"
      if key in record:
        spread = f"+-{record[key + '_std']:.4f}" if key + "_std" in record else ""
        parts.append(f"{short}_{abbreviation} {record[key]:.4f}{spread}")
  parts.append(f"{record['epoch_time_s']:.2f}s")
  return "  ".join(parts)
