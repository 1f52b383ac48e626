"""The loops the benchmark compares this project with: Keras' `model.fit`, a PyTorch loop, and
tf.data alone, each on the arrays the notebook prepares (tools/bench.py runs each in a process of
its own)."""

from __future__ import annotations

import time
from typing import Any

NO_TENSORFLOW = "needs TensorFlow: pip install -e '.[tf]'"


def arrays():
  """Train and test splits of MNIST as float32 in [0, 1], as the notebook prepares them."""
  from mnist_jax import data  # pylint: disable=import-outside-toplevel

  train, test = data.load_split("mnist", "train"), data.load_split("mnist", "test")
  scale = lambda split: data.normalize(split.images_NHWC.astype("float32"), 0.0, 1.0)
  return scale(train), train.labels_N, scale(test), test.labels_N


def tfdata_only(config) -> dict[str, Any]:
  """tf.data alone, as a Keras or TensorFlow user would feed MNIST: shuffled, batched and
  normalized from tfds' prepared files, with no model."""
  from mnist_jax.run import sources  # pylint: disable=import-outside-toplevel

  if not sources.have_tensorflow():
    return {"skipped": NO_TENSORFLOW}
  epoch_times = []
  for epoch in range(config.num_epochs):
    start = time.perf_counter()
    for _ in tfdata_batches("mnist", "train", config.batch_size, shuffle_seed=epoch):
      pass
    epoch_times.append(time.perf_counter() - start)
  return {"train_s": sum(epoch_times), "epoch_times_s": epoch_times}


def tfdata_batches(name: str, split: str, batch_size: int, shuffle_seed: int,
                   data_dir: str | None = None):
  """One shuffled pass of tf.data over tfds' prepared `split`, as numpy `(images, labels)` batches
  in [0, 1], the last partial batch dropped. MNIST is prepared for tfds where it is not."""
  from mnist_jax import data  # pylint: disable=import-outside-toplevel
  from mnist_jax.run import sources  # pylint: disable=import-outside-toplevel

  tfds = sources.import_tfds(name)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  if sources.is_bundled(name):
    sources.prepare_tfds_mnist(data_dir)
  builder = sources.prepared_builder(name, data_dir)
  ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
  ds = ds.shuffle(60_000, seed=shuffle_seed, reshuffle_each_iteration=False)
  ds = ds.batch(batch_size, drop_remainder=True).map(
      lambda images, labels: (data.normalize(tf.cast(images, tf.float32), 0.0, 1.0), labels),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  with sources.read_errors(name, builder):
    yield from tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))


def keras(config) -> dict[str, Any]:
  from mnist_jax.run import sources  # pylint: disable=import-outside-toplevel

  if not sources.have_tensorflow():
    return {"skipped": NO_TENSORFLOW}
  sources.import_tfds("mnist")  # The same quiet TensorFlow start-up as the project's.
  import keras  # pylint: disable=import-outside-toplevel

  x_train, y_train, x_test, y_test = arrays()
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.Flatten(),
      *(keras.layers.Dense(width, activation="relu") for width in config.model_args.hidden_sizes),
      keras.layers.Dense(10),
  ])
  model.compile(
      optimizer=keras.optimizers.Adam(config.learning_rate),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["accuracy"],
  )
  epoch_times = []
  timer = keras.callbacks.LambdaCallback(
      on_epoch_begin=lambda epoch, logs: epoch_times.append(-time.perf_counter()),
      on_epoch_end=lambda epoch, logs: epoch_times.__setitem__(
          -1, epoch_times[-1] + time.perf_counter()),
  )
  start = time.perf_counter()
  model.fit(x_train, y_train, batch_size=config.batch_size, epochs=config.num_epochs, verbose=0,
            callbacks=[timer])
  train_s = time.perf_counter() - start
  _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
  return {"train_s": train_s, "epoch_times_s": epoch_times, "test_accuracy": accuracy}


def torch(config) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {"skipped": "PyTorch is not installed (pip install torch to include it)"}
  device = "cuda" if torch.cuda.is_available() else "cpu"  # As a PyTorch user would.
  x_train, y_train, x_test, y_test = (torch.from_numpy(a).to(device) for a in arrays())
  x_train, x_test = x_train.reshape(-1, 784), x_test.reshape(-1, 784)
  y_train, y_test = y_train.long(), y_test.long()
  torch.manual_seed(0)
  layers, width_in = [], 784
  for width in config.model_args.hidden_sizes:
    layers += [torch.nn.Linear(width_in, width), torch.nn.ReLU()]
    width_in = width
  model = torch.nn.Sequential(*layers, torch.nn.Linear(width_in, 10)).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
  loss_fn = torch.nn.CrossEntropyLoss()
  epoch_times = []
  for _ in range(config.num_epochs):
    start = time.perf_counter()
    order = torch.randperm(len(y_train), device=device)
    for first in range(0, len(order), config.batch_size):
      indices = order[first : first + config.batch_size]
      optimizer.zero_grad()
      loss_fn(model(x_train[indices]), y_train[indices]).backward()
      optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()  # CUDA runs behind Python: the epoch ends when its kernels do.
    epoch_times.append(time.perf_counter() - start)
  with torch.no_grad():
    accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
  return {"train_s": sum(epoch_times), "epoch_times_s": epoch_times, "test_accuracy": accuracy,
          "device": f"{device} (PyTorch {torch.__version__})"}
