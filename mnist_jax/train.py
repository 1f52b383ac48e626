"""The training loop: `train_and_evaluate` trains a config into a workdir, resuming where it stopped.

Each epoch trains through the config's input pipeline (pipelines.py), evaluates every held-out
split, prints one line, logs TensorBoard scalars, rewrites `metrics.jsonl` and saves a checkpoint
when due. Reports are drawn after the loop, by whoever called it (main.py, sweep.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mnist_jax import configs, data, errors, metrics, optimizers, pipelines, steps
from mnist_jax.run import checkpoints, parallel, rundir, summaries


class TrainingError(errors.UserError):
  """Training cannot go on (for example the loss stopped being finite)."""


def stopped_early(history: list[dict[str, Any]], metric: str, patience: int) -> bool:
  """Whether `metric` has not improved on its best for the last `patience` epochs (0: never)."""
  if not patience or len(history) <= patience:
    return False
  values = [record[metric] for record in history]
  return len(values) - 1 - values.index(max(values)) >= patience


def run_splits(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Split name -> tfds split string: train, test and, with a validation fraction, val; a
  validation split too small to rank checkpoints is refused (`configs.check_validation_split`)."""
  num_train = data.num_examples(config.dataset, "train", config.data_dir)
  configs.check_validation_split(config, num_train)
  train, val = data.holdout_splits(num_train, config.validation_fraction)
  return {"train": train, **({"val": val} if val else {}), "test": "test"}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> tuple[steps.TrainState, dict[str, Any]]:
  """Trains `config` for `config.num_epochs`, evaluating the held-out splits after each epoch.

  With `config.validation_fraction`, the end of the training split is held out and evaluated
  too, and `config.early_stopping_patience` epochs without a better validation accuracy stop the
  run. Writes `config.json`, `metrics.jsonl` and `final_metrics.json` to `workdir` (rundir.py),
  prints one line per epoch, and returns the final state (sharded as trained) and metrics.
  Checkpoints go to `workdir/checkpoints/`; a workdir that has them resumes from the latest (see
  checkpoints.py). Under `jax.distributed` every process trains, saves its part of each
  checkpoint and returns; only the first writes the other files and prints.
  """
  configs.validate(config)
  parallel.check_batch_sizes(config, ("batch_size", "eval_batch_size"))  # Before the workdir.
  info = parallel.main_process_first(data.dataset_info, config.dataset, config.data_dir)
  splits = run_splits(config)
  num_train = data.num_examples(config.dataset, splits["train"], config.data_dir)
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:  # Refused before the workdir is made.
    raise configs.ConfigError(
        f"config.batch_size {config.batch_size} is larger than the {num_train} training examples"
    )
  with checkpoints.TrainingCheckpoints(
      workdir, config, selection_metric=metrics.selection_metric(config),
      check_record=metrics.check_record,
      config_changes=lambda saved: configs.config_changes(saved, config),
      allow_config_change=allow_config_change,
  ) as ckpts:
    return _train(config, workdir, ckpts, info, splits, steps_per_epoch)


def _train(
    config: ml_collections.ConfigDict, workdir: str, ckpts: checkpoints.TrainingCheckpoints,
    info: data.DatasetInfo, splits: dict[str, str], steps_per_epoch: int,
) -> tuple[steps.TrainState, dict[str, Any]]:
  start = time.perf_counter()
  initialize = steps.compile_initial_state(config, info, steps_per_epoch)
  init_compile_s = time.perf_counter() - start
  state, epoch_rngs = initialize()
  pipeline = pipelines.create_pipeline(config, state, splits)
  state = jax.device_put(state, pipeline.state_sharding)
  state, history = ckpts.resume(
      state, {"steps_per_epoch": steps_per_epoch, "dataset": dataclasses.asdict(info)}
  )
  schedule = optimizers.learning_rate_schedule(config, steps_per_epoch)
  selection = metrics.selection_metric(config)
  writes = parallel.is_main_process()
  if writes:
    rundir.write_config(workdir, config)
    rundir.write_history(workdir, history)  # After a resume, the epochs up to its checkpoint.
    writer = summaries.Writer(os.path.join(workdir, rundir.TENSORBOARD))

  record: dict[str, Any] = history[-1] if history else {}
  train_time_s = sum(past["epoch_time_s"] for past in history)
  epoch = record.get("epoch", 0)
  while epoch < config.num_epochs and not stopped_early(
      history, selection, config.early_stopping_patience):
    epoch += 1
    start = time.perf_counter()
    state, train_metrics = pipeline.train_epoch(state, epoch_rngs[epoch])
    record = {"epoch": epoch, "step": int(state.step),
              **metrics.split_record("train", jax.device_get(train_metrics))}
    epoch_time_s = time.perf_counter() - start
    train_time_s += epoch_time_s
    losses = record.get("train_loss_per_seed", [record["train_loss"]])
    if not all(math.isfinite(loss) for loss in losses):
      raise TrainingError(
          f"the training loss became {record['train_loss']} in epoch {epoch}; "
          f"lower config.learning_rate (now {config.learning_rate})"
      )
    for name in [name for name in splits if name != "train"]:
      values = jax.device_get(pipeline.evaluate(state, name))
      record.update(metrics.split_record(name, values))
      record[f"{name}_examples"] = int(np.max(values["count"]))
    record.update({
        "epoch_time_s": epoch_time_s,
        "examples_per_s": config.num_seeds * steps_per_epoch * config.batch_size / epoch_time_s,
        # The last step's rate; an int32 as `state.step` is, without a program to run it.
        "learning_rate": optimizers.learning_rate_at(schedule, np.int32(record["step"] - 1)),
    })
    history.append(record)
    if writes:
      rundir.write_history(workdir, history)
      print(metrics.epoch_line(record, config.num_epochs), flush=True)
      writer.scalars(record["step"], metrics.scalars(record))
    last = stopped_early(history, selection, config.early_stopping_patience)
    ckpts.end_of_epoch(state, history, last=last)  # Every process saves its part.

  compile_times_s = {"init": init_compile_s, **pipeline.compile_times_s}
  final = {**record, "train_time_s": train_time_s,
           "compile_time_s": sum(compile_times_s.values()),
           "compile_times_s": compile_times_s,
           "stopped_early": epoch < config.num_epochs}
  if writes:
    writer.close()
    rundir.write_final(workdir, final)
    if final["stopped_early"]:
      print(f"stopped early: {selection} has not improved for "
            f"{config.early_stopping_patience} epochs", flush=True)
  return state, final
