"""Calibration, adversarial attacks and evaluation on a labelled folder, on a trained smoke model."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, load_config, main_in_process, train_and_report
from mnist_jax import configs
from mnist_jax.studies import attacks, calibration, digits, predict

EPS = [0.0, 0.03, 0.1, 0.2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  config = load_config("seed_mlp", "smoke")
  config.validation_fraction = 0.1  # Where the temperature is fitted.
  train_and_report(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def model(workdir):
  return predict.load(str(workdir))


def test_ece_is_zero_where_confidence_equals_accuracy_and_the_gap_where_not():
  # In each bin the accuracy equals the confidence: 8 of 10 right at 0.8, 3 of 5 right at 0.6.
  probs = np.array([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 5)
  labels = np.array([0] * 8 + [1] * 2 + [1] * 3 + [0] * 2)
  assert calibration.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
  # Always sure, right half the time: a gap of 0.5 everywhere.
  sure = np.array([[1.0, 0.0]] * 4)
  assert calibration.expected_calibration_error(sure, np.array([0, 1, 0, 1])) == pytest.approx(0.5)
  bins = calibration.reliability(probs, labels)
  assert bins.counts.sum() == 15 and bins.counts[12] == 10 and bins.counts[9] == 5


def test_temperature_fitted_on_samples_of_a_known_temperature_finds_it():
  rng = np.random.default_rng(0)
  logits_NC = rng.normal(0.0, 3.0, (20_000, 10)).astype(np.float32)
  probs_NC = calibration.softmax_with_temperature(logits_NC, 2.0).astype(np.float64)
  labels_N = np.array([rng.choice(10, p=p / p.sum()) for p in probs_NC])
  temperature = calibration.fit_temperature(logits_NC, labels_N)
  assert temperature == pytest.approx(2.0, rel=0.05)
  assert (calibration.negative_log_likelihood(logits_NC, labels_N, temperature)
          < calibration.negative_log_likelihood(logits_NC, labels_N))
  np.testing.assert_array_equal(calibration.softmax_with_temperature(logits_NC, temperature).argmax(1),
                                logits_NC.argmax(1))  # Scaling never changes a prediction.


@pytest.mark.slow
def test_attacks_start_at_the_clean_accuracy_fall_with_eps_and_pgd_is_never_weaker(
    model, mnist_test):
  images, labels = mnist_test.images_NHWC[:1000], mnist_test.labels_N[:1000]
  config = model.config
  result = attacks.accuracy_under_attack(
      model.state, images, labels, EPS, mean=config.pixel_mean, std=config.pixel_std,
      num_seeds=1, pgd_steps=5, batch_size=400)  # 1000 rows: the last batch is padded.
  logits = predict.logits(model.state, images, batch_size=1000, mean=config.pixel_mean,
                          std=config.pixel_std)
  assert result.eps == EPS
  assert result.clean_accuracy == result.fgsm_accuracy[0] == result.pgd_accuracy[0] == np.mean(
      logits.argmax(1) == labels)
  for fgsm, pgd, next_fgsm, next_pgd in zip(result.fgsm_accuracy, result.pgd_accuracy,
                                            result.fgsm_accuracy[1:], result.pgd_accuracy[1:]):
    assert next_fgsm <= fgsm and next_pgd <= pgd and pgd <= fgsm
  assert result.pgd_accuracy[-1] < 0.5 * result.clean_accuracy  # A real attack, not a no-op.
  assert result.step_sizes == pytest.approx([2.5 * e / 5 for e in EPS])
  for e in EPS:  # Inside the eps-ball and the valid range.
    for adversarial in (result.examples_fgsm_KHWC[e], result.examples_pgd_KHWC[e]):
      moved = np.abs(adversarial.astype(np.int32) - images[:len(adversarial)].astype(np.int32))
      assert moved.max() <= round(e * 255) + 1 and adversarial.dtype == np.uint8


@pytest.mark.slow
def test_pgd_gives_the_same_bits_whatever_steps_each_compiled_call_runs(model, mnist_test):
  images = mnist_test.images_NHWC[:100].astype(np.float32)
  labels = mnist_test.labels_N[:100]
  kwargs = dict(mean=model.config.pixel_mean, std=model.config.pixel_std, num_seeds=1, steps=9)
  one_by_one, grown = [], []
  first = attacks.attack_batch(model.state, images, labels, 0.1, 0.03, **kwargs,
                               chunks=attacks._Chunks(target_s=0.0, done=one_by_one.append))
  second = attacks.attack_batch(model.state, images, labels, 0.1, 0.03, **kwargs,
                                chunks=attacks._Chunks(target_s=1e9, done=grown.append))
  assert one_by_one == [1] * 8 and grown == [1, 4, 3]  # PGD's 8 steps after FGSM's.
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], first[2])  # PGD moved beyond FGSM.


@pytest.mark.slow
def test_attack_mode_writes_its_report_and_refuses_bad_eps(workdir):
  result = main_in_process("--mode=attack", f"--workdir={workdir}", "--eps=0,0.1",
                           "--attack_examples=200", "--pgd_steps=3")
  assert result.returncode == 0, result.stderr
  saved = json.loads((workdir / "attack" / "results.json").read_text())
  assert saved["eps"] == [0.0, 0.1] and saved["examples"] == 200
  assert f"eps 0.1    fgsm {saved['fgsm_accuracy'][1]:.4f}  pgd {saved['pgd_accuracy'][1]:.4f}" in (
      result.stdout)
  for name in ("report.md", "robustness.png", "adversarial_examples.png"):
    assert (workdir / "attack" / name).stat().st_size > 0
  one_step = main_in_process("--mode=attack", f"--workdir={workdir}", "--eps=0.1",
                             "--attack_examples=100", "--pgd_steps=1")
  assert one_step.returncode == 0, one_step.stderr
  saved = json.loads((workdir / "attack" / "results.json").read_text())
  assert saved["pgd_accuracy"] == saved["fgsm_accuracy"]  # One PGD step is FGSM.
  assert "| 0.1 | - |" in (workdir / "attack" / "report.md").read_text()  # No step size.
  for eps, message in [("x", "--eps must be numbers"), ("0,2", "--eps must be in [0, 1]")]:
    result = main_in_process("--mode=attack", f"--workdir={workdir}", f"--eps={eps}")
    assert result.returncode == 1 and result.stderr.startswith(f"mnist_jax: {message}")


def _labelled_folder(root, mnist_test, count):
  """`count` test digits drawn dark on light, filed by their labels (a 7 also filed under 1)."""
  for i in range(count):
    label = int(mnist_test.labels_N[i])
    (root / str(label)).mkdir(parents=True, exist_ok=True)
    Image.fromarray(255 - mnist_test.images_NHWC[i, ..., 0]).resize((56, 56)).save(
        root / str(label) / f"{i}.png")
  return root


@pytest.mark.slow
def test_a_labelled_folder_is_scored_as_predict_scores_each_file(workdir, model, mnist_test,
                                                                 tmp_path):
  folder = _labelled_folder(tmp_path / "digits", mnist_test, 120)
  sevens = sorted(folder.glob("7/*.png"))
  sureness = predict.probabilities(model, [digits.load_image(str(path)) for path in sevens])[:, 7]
  # The clearest seven, mislabelled on purpose: a confident mistake.
  (folder / "1" / "a_seven.png").write_bytes(sevens[sureness.argmax()].read_bytes())
  (folder / "3" / "notes.txt").write_text("not an image")
  (folder / "cats").mkdir()
  (folder / "5" / "empty").mkdir()  # A nested folder with nothing in it adds nothing.

  result = main_in_process("--mode=eval", f"--workdir={workdir}", f"--images_dir={folder}")
  assert result.returncode == 0, result.stderr
  assert result.stderr.splitlines() == [
      f"mnist_jax: {folder}/3/notes.txt: not an image file that Pillow can read; skipped",
      f"mnist_jax: {folder}/cats: not a class of this model (classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9); "
      "skipped"]
  saved = json.loads((workdir / "eval" / "digits" / "results.json").read_text())
  files = sorted(path for path in folder.glob("*/*.png"))
  truth = np.array([int(path.parent.name) for path in files])
  probs = predict.probabilities(model, [digits.load_image(str(path)) for path in files])
  assert saved["images"] == len(files) == 121
  assert saved["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == truth), abs=1e-12)
  assert saved["accuracy"] <= 120 / 121  # The mislabelled seven is a mistake.
  assert saved["ece"] == pytest.approx(calibration.expected_calibration_error(probs, truth), abs=1e-5)
  report = (workdir / "eval" / "digits" / "report.md").read_text()
  assert "| 1/a_seven.png | 1 | 7 |" in report
  skipped = ["3/notes.txt: not an image file that Pillow can read; skipped",
             "cats: not a class of this model (classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9); skipped"]
  assert saved["skipped"] == skipped
  assert "## Skipped (2)\n\n" + "".join(f"- `{entry}`\n" for entry in skipped) in report
  for name in ("confusion_matrix", "confident_mistakes", "mistake_saliency", "reliability"):
    assert os.path.getsize(workdir / "eval" / "digits" / f"{name}.png") > 0

  calibrated = main_in_process("--mode=eval", f"--workdir={workdir}", f"--images_dir={folder}",
                               "--calibrated")
  assert calibrated.returncode == 0, calibrated.stderr
  again = json.loads((workdir / "eval" / "digits" / "results.json").read_text())
  temperature, _ = predict.validation_temperature(model)
  assert again["temperature"] == temperature and again["accuracy"] == saved["accuracy"]


@pytest.mark.parametrize("layout, message", [
    (None, "is not a directory"),
    ({"cats": 1}, "has no subfolder named by a class of this model"),
    ({"3": 0}, "holds no image that can be read"),
])
@pytest.mark.slow
def test_a_folder_that_cannot_be_scored_is_one_line(workdir, tmp_path, layout, message):
  folder = tmp_path / "folder"
  if layout is not None:
    for name, count in layout.items():
      (folder / name).mkdir(parents=True)
      for i in range(count):
        Image.new("L", (28, 28), 255).save(folder / name / f"{i}.png")
  result = main_in_process("--mode=eval", f"--workdir={workdir}", f"--images_dir={folder}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(f"mnist_jax: {folder} {message}")
  assert not (workdir / "eval" / "folder").exists()


@pytest.mark.slow
def test_calibrated_predict_keeps_each_digit_and_changes_its_probability(workdir, mnist_test,
                                                                         tmp_path):
  folder = _labelled_folder(tmp_path / "digits", mnist_test, 5)
  paths = [str(path) for path in sorted(folder.glob("*/*.png"))]
  plain = main_in_process("--mode=predict", f"--workdir={workdir}", f"--images={','.join(paths)}")
  scaled = main_in_process("--mode=predict", f"--workdir={workdir}", f"--images={','.join(paths)}",
                           "--calibrated")
  rows = lambda result: [line.split("  ") for line in result.stdout.splitlines()]
  assert [r[:2] for r in rows(plain)] == [r[:2] for r in rows(scaled)]
  assert [r[2] for r in rows(plain)] != [r[2] for r in rows(scaled)]


def test_calibrated_needs_a_validation_split(tmp_path):
  shutil.copytree(os.path.join(REPO, "tests", "data", "run_0.1.0"), tmp_path / "run")
  result = main_in_process("--mode=eval", f"--workdir={tmp_path / 'run'}", "--calibrated")
  assert (result.returncode, result.stdout) == (1, "")  # Refused before evaluating anything.
  assert result.stderr.strip().startswith(
      "mnist_jax: --calibrated fits a temperature on the run's validation split, and this run has none")


def test_a_run_whose_validation_split_is_too_small_fits_no_temperature():
  """Runs trained before the split's minimum was checked may hold 6 examples: no fit on those."""
  config = load_config("seed_mlp", "smoke")
  config.validation_fraction = 0.0001
  with pytest.raises(configs.ConfigError, match="holds out 6 of the 60,000 training examples"):
    calibration.held_out_split(config)
  config.validation_fraction = 0.1
  assert calibration.held_out_split(config) == "train[54000:]"


@pytest.mark.slow
def test_a_folder_is_read_as_keras_and_torchvision_read_one(workdir, mnist_test, tmp_path):
  """Images in subfolders of a class count; hidden files do not; what cannot be read is skipped;
  a second evaluation of a folder of the same name replaces the first, whole."""
  folder = _labelled_folder(tmp_path / "mine", mnist_test, 12)
  (folder / "2" / "more").mkdir()
  (folder / "2" / "more" / "x.png").write_bytes(next(folder.glob("2/*.png")).read_bytes())
  (folder / "2" / ".DS_Store").write_bytes(b"\0\0")
  (folder / ".ipynb_checkpoints").mkdir()
  os.mkfifo(folder / "2" / "fifo.png")
  result = main_in_process("--mode=eval", f"--workdir={workdir}", f"--images_dir={folder}")
  assert result.returncode == 0, result.stderr
  assert result.stderr.splitlines() == [f"mnist_jax: {folder}/2/fifo.png: not a regular file; skipped"]
  out = workdir / "eval" / "mine"
  assert json.loads((out / "results.json").read_text())["images"] == 13
  (out / "stale.png").write_bytes(b"")
  other = tmp_path / "elsewhere" / "mine"
  _labelled_folder(other, mnist_test, 3)
  assert main_in_process("--mode=eval", f"--workdir={workdir}", f"--images_dir={other}/.").returncode == 0
  assert json.loads((out / "results.json").read_text())["images"] == 3
  assert not (out / "stale.png").exists()


@pytest.mark.slow
def test_a_folder_without_mistakes_reports_none(workdir, model, mnist_test, tmp_path):
  folder = _labelled_folder(tmp_path / "right", mnist_test, 30)
  paths = sorted(folder.glob("*/*.png"))
  probs = predict.probabilities(model, [digits.load_image(str(path)) for path in paths])
  for path, p in zip(paths, probs):
    if p.argmax() != int(path.parent.name):
      path.unlink()
  result = main_in_process("--mode=eval", f"--workdir={workdir}", f"--images_dir={folder}")
  assert result.returncode == 0, result.stderr
  out = workdir / "eval" / "right"
  assert json.loads((out / "results.json").read_text())["accuracy"] == 1.0
  assert not (out / "mistake_saliency.png").exists() and (out / "reliability.png").exists()
