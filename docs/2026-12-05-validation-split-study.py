"""How small a validation split can rank a run's checkpoints and fit its temperature.

Trains the seed recipe with validation_fraction=0.1 (6,000 held out), keeps every epoch's
checkpoint, then draws subsets of n validation examples and, for each, picks the best epoch by
subset accuracy and fits a temperature on the last epoch; reports the test accuracy of the epoch
picked and the test NLL after the fitted temperature. From the repository root:

  PYTHONPATH=$PWD python docs/2026-12-05-validation-split-study.py /tmp/valstudy

Results: 2026-12-05-photos-configs-checkpoints.md, "How small a validation split can be".
"""
import json
import os
import subprocess
import sys

import numpy as np

workdir = sys.argv[1]
if not os.path.exists(os.path.join(workdir, "final_metrics.json")):
  subprocess.run([sys.executable, "-m", "mnist_jax.main", "--config=experiments/seed_mlp.py",
                  "--config.validation_fraction=0.1", "--config.keep_checkpoints=20",
                  f"--workdir={workdir}"], check=True)
from mnist_jax import data
from mnist_jax.studies import predict, calibration
steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
val = data.load_split("mnist", "train[54000:]"); test = data.load_split("mnist", "test")
vals, tests = [], []
for step in steps:
  model = predict.load(workdir, str(step))
  vals.append(predict.log_probabilities_and_logits(model, val.images_NHWC)[0])
  tests.append(predict.log_probabilities_and_logits(model, test.images_NHWC)[0])
val_correct = np.stack([v.argmax(1) == val.labels_N for v in vals])  # [E, 6000]
test_acc = np.array([(t.argmax(1) == test.labels_N).mean() for t in tests])
print("epochs", len(steps), "val acc", np.round(val_correct.mean(1), 4).tolist())
print("test acc", np.round(test_acc, 4).tolist())
last_val, last_test = vals[-1], tests[-1]
nll = lambda t: calibration.negative_log_likelihood(last_test, test.labels_N, t)
t_full = calibration.fit_temperature(last_val, val.labels_N)
print(f"full: T {t_full:.3f} test nll {nll(1.0):.4f} -> {nll(t_full):.4f}; best epoch by full val "
      f"{int(val_correct.mean(1).argmax()) + 1} test acc {test_acc[val_correct.mean(1).argmax()]:.4f}")
rng = np.random.default_rng(0)
rows = []
for n in (6, 30, 100, 300, 600, 1000, 2000, 6000):
  picked, temps, nlls = [], [], []
  for draw in range(200 if n < 6000 else 1):
    idx = rng.choice(6000, n, replace=False)
    acc = val_correct[:, idx].mean(1)
    picked.append(test_acc[int(np.argmax(acc))])
    t = calibration.fit_temperature(last_val[idx], val.labels_N[idx])
    temps.append(t); nlls.append(nll(t))
  picked, temps, nlls = map(np.array, (picked, temps, nlls))
  se = np.sqrt(0.98 * 0.02 / n)
  row = dict(n=n, se_points=round(100 * se, 2), picked_test_acc_mean=round(picked.mean(), 4),
             picked_test_acc_p5=round(np.percentile(picked, 5), 4),
             T_p5=round(np.percentile(temps, 5), 3), T_median=round(np.median(temps), 3),
             T_p95=round(np.percentile(temps, 95), 3),
             nll_median=round(np.median(nlls), 4), nll_p95=round(np.percentile(nlls, 95), 4),
             nll_worse_than_uncalibrated=round(float((nlls > nll(1.0)).mean()), 3))
  rows.append(row); print(json.dumps(row), flush=True)
