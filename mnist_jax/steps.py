"""Pure steps: the train state, one training and one evaluation step, an epoch as one `lax.scan`,
evaluation of a device-resident split, and the helpers that train several seeds as one program.

Nothing here reads files, prints or keeps state: each function is jit-able as it stands, and
`pipelines.py` and `train.py` decide where and how often it runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from mnist_jax import augment, configs, data, models, optimizers

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

AUGMENT_PURPOSE = 1  # Folded into the epoch key for augmentation; the key itself orders the data.


class TrainState(train_state.TrainState):
  """Flax's train state plus this model's dropout key, folded with the step at each step."""

  dropout_rng: jax.Array


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
    raise configs.ConfigError(f"config.model_args do not fit model {config.model!r}: {e}") from e
  params_rng, dropout_rng = jax.random.split(rng)
  try:
    variables = model.init(params_rng, jnp.zeros((1, *info.image_shape)), train=False)
  except AttributeError as e:
    raise configs.ConfigError(f"config.model_args: {e}") from e
  return TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      tx=optimizers.create_optimizer(config, steps_per_epoch),
      dropout_rng=dropout_rng,
  )


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


def epoch_order(epoch_rng: jax.Array, num_examples: int) -> np.ndarray:
  """The order in which an epoch visits the examples: a permutation drawn from the epoch's key.

  NumPy shuffles the indices on the host at little cost; `jax.random.permutation` sorts twice on
  the device, which XLA:CPU does slowly (docs/2026-11-30-results.md, "Speed").
  With one key a seed (`epoch_rng` of shape `[S, 2]`), one permutation a seed, `[S, N]`.
  """
  keys = np.asarray(epoch_rng)
  if keys.ndim == 2:
    return np.stack([epoch_order(key, num_examples) for key in keys])
  return np.random.default_rng(keys).permutation(num_examples).astype(np.int32)


def train_epoch(state: TrainState, images_NHWC: jax.Array, labels_N: jax.Array, order_N: jax.Array,
                epoch_rng: jax.Array, **kwargs) -> tuple[TrainState, Metrics]:
  """One epoch over device-resident uint8 images: `train_steps`, its metrics averaged."""
  state, metrics_S = train_steps(state, images_NHWC, labels_N, order_N, epoch_rng, **kwargs)
  return state, jax.tree.map(jnp.mean, metrics_S)


def train_steps(
    state: TrainState,
    images_NHWC: jax.Array,
    labels_N: jax.Array,
    order_N: jax.Array,
    epoch_rng: jax.Array,
    first_step: jax.Array | int = 0,
    *,
    batch_size: int,
    mean: float,
    std: float,
    batch_sharding: jax.sharding.Sharding | None = None,
    augmentation: augment.Augmentation = augment.Augmentation(),
) -> tuple[TrainState, Metrics]:
  """Steps over device-resident uint8 images, in the order `order_N`, as a `lax.scan`; the metrics
  of each step.

  Step `s` trains on the examples `order_N[s * batch_size : (s + 1) * batch_size]`; the last
  `len(order_N) % batch_size` are left out, so every step has the same shape (a new permutation
  from `epoch_order` each epoch means every example is seen). Rows of the arrays that `order_N`
  does not name, such as padding that makes them divide among devices, are never drawn. With
  `batch_sharding`, each gathered batch is laid out that way (split along the mesh's `data`
  axis). An enabled `augmentation` transforms each batch's pixels before normalization, with step
  `s`'s key `fold_in(fold_in(epoch_rng, AUGMENT_PURPOSE), first_step + s)`: a function of (seed,
  epoch, step), so an epoch run as several calls over parts of it (`first_step` the steps done
  before) draws the same keys as one call over all of it.
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

  return jax.lax.scan(step, state, (first_step + jnp.arange(steps), order_SB))


EVAL_ZEROS = {"loss": np.float32(0), "correct": np.int32(0), "count": np.int32(0)}


def evaluate(state: TrainState, images_NHWC: jax.Array, labels_N: jax.Array, **kwargs) -> Metrics:
  """Loss, accuracy and count over every example (see `evaluate_sums`)."""
  return summarize_eval(evaluate_sums(state, images_NHWC, labels_N, EVAL_ZEROS, **kwargs))


def evaluate_sums(
    state: TrainState,
    images_NHWC: jax.Array,
    labels_N: jax.Array,
    sums: Metrics,
    *,
    batch_size: int,
    mean: float,
    std: float,
    num_examples: int | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> Metrics:
  """`sums` plus the summed loss, correct and count of every example, padded to whole batches
  and masked, as a `lax.scan` (a split may be summed in parts, each call adding to the last).

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

  return jax.lax.scan(step, sums, (images_SB, labels_SB, mask_SB))[0]


# ---------------------------------------------------------------------------------------------
# Several seeds as one program.


def seed_axes(state: TrainState) -> TrainState:
  """`vmap` axes of a state that holds one model per seed: all leaves but the shared step."""
  return state.replace(step=None, params=0, opt_state=0, dropout_rng=0)


def first_seed(state: TrainState) -> TrainState:
  """The first model of a state that holds one per seed."""
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  return state.replace(params=first(state.params), opt_state=first(state.opt_state),
                       dropout_rng=state.dropout_rng[0])


def seed_rngs(config: ml_collections.ConfigDict) -> jax.Array:
  """The root key of each seed: model `i` of a run is the model a run with seed `seed + i` trains."""
  if config.num_seeds == 1:
    return jax.random.PRNGKey(config.seed)
  return jax.vmap(jax.random.PRNGKey)(jnp.arange(config.seed, config.seed + config.num_seeds))


@jax.jit
def _epoch_rng(data_rng: jax.Array, epoch: jax.Array) -> jax.Array:
  """Epoch `epoch`'s key for the data order: one program for any epoch and any run length."""
  fold = lambda rng: jax.random.fold_in(rng, epoch)
  return fold(data_rng) if data_rng.ndim == 1 else jax.vmap(fold)(data_rng)  # One a seed.


def compile_initial_state(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, steps_per_epoch: int
) -> Callable[[], tuple[TrainState, np.ndarray]]:
  """Compiles the programs of the state a run starts from; the function returned runs them.

  It returns one model per seed, and every epoch's key for the data order: `epoch_rngs[e]` is
  epoch `e`'s key (`[num_seeds, 2]` with several seeds), for `e` up to `config.num_epochs`. The
  state is computed as one program, with the same bits as op by op, where each initializer and key
  derivation would compile apart (27 programs for the seed MLP); it does not depend on
  `num_epochs`, so a run resumed with more epochs finds it compiled. Compiled ahead, as the
  pipelines' programs are, so that a caller can time the compiling apart.
  """
  lowered = jax.jit(functools.partial(_initialize, config, info, steps_per_epoch)).lower()
  initialize = lowered.compile()
  epoch_rng = _epoch_rng.lower(lowered.out_info[1], np.uint32(0)).compile()

  def run() -> tuple[TrainState, np.ndarray]:
    state, data_rng = initialize()
    epoch_rngs = [epoch_rng(data_rng, np.uint32(epoch)) for epoch in range(config.num_epochs + 1)]
    return state, np.stack(jax.device_get(epoch_rngs))

  return run


def state_shapes(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, steps_per_epoch: int
) -> TrainState:
  """The initial state as shapes and dtypes alone, to restore a checkpoint into: nothing is
  computed or compiled."""
  return jax.eval_shape(functools.partial(_initialize, config, info, steps_per_epoch))[0]


def _initialize(config: ml_collections.ConfigDict, info: data.DatasetInfo,
                steps_per_epoch: int) -> tuple[TrainState, jax.Array]:
  """The initial state and the key each epoch's key is folded from (one a seed)."""
  rngs = seed_rngs(config)
  if config.num_seeds == 1:
    init_rng, data_rng = jax.random.split(rngs)
    return create_train_state(config, info, init_rng, steps_per_epoch), data_rng
  init_rngs, data_rngs = jnp.swapaxes(jax.vmap(jax.random.split)(rngs), 0, 1)
  state = jax.vmap(lambda rng: create_train_state(config, info, rng, steps_per_epoch))(init_rngs)
  return state.replace(step=state.step[0]), data_rngs  # One step count, as `seed_axes` says.
