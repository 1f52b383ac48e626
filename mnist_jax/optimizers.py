"""The optimizers and learning-rate schedules a config can name, as optax builds them."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = {
    "adam": lambda lr, config: optax.adam(lr),
    "adamw": lambda lr, config: optax.adamw(lr, weight_decay=config.weight_decay),
    "sgd": lambda lr, config: optax.sgd(lr, momentum=config.momentum or None, nesterov=True),
}
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.ScalarOrSchedule:
  """`config.learning_rate` under `config.lr_schedule` over the whole run."""
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(
        config.learning_rate, decay_steps=max(1, config.num_epochs * steps_per_epoch)
    )
  return config.learning_rate


def learning_rate_at(schedule: optax.ScalarOrSchedule, step: int) -> float:
  """The rate a schedule gives at `step`."""
  return float(schedule(step) if callable(schedule) else schedule)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                     ) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer` with `config.lr_schedule` over the whole run."""
  return OPTIMIZERS[config.optimizer](learning_rate_schedule(config, steps_per_epoch), config)
