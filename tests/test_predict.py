"""Using a trained model: `--mode=eval`, `--mode=predict`, and `predict.probabilities`."""

import json
import re
import signal
import struct
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest
from PIL import ExifTags, Image

from conftest import REPO, load_config, main_in_process, run_main, train_and_report
from mnist_jax import data
from mnist_jax.studies import digits, predict


@pytest.fixture
def workdir(two_epoch_run):
  return two_epoch_run


def _render(image_HW, index, path):
  """A test digit as a photo of a drawing might be: dark on light, off centre, 100x100."""
  canvas = np.full((44, 44), 255, np.uint8)
  top, left = index % 17, (5 * index + 3) % 17
  canvas[top:top + 28, left:left + 28] = 255 - image_HW
  Image.fromarray(canvas).resize((100, 100), Image.Resampling.BILINEAR).save(path)
  return str(path)


def test_eval_prints_the_test_metrics_training_reported_for_the_best_checkpoint(workdir):
  result = main_in_process("--mode=eval", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  best = max(records, key=lambda r: (r["test_accuracy"], r["epoch"]))
  assert result.stdout.startswith(f"checkpoint {best['step']} (epoch {best['epoch']})")
  # Exactly the floats training wrote, not merely close ones.
  assert (f"test_loss {best['test_loss']!r}  test_accuracy {best['test_accuracy']!r}  "
          f"test_examples 10000") in result.stdout


@pytest.mark.slow
def test_eval_on_devices_that_divide_neither_batch_size_gives_the_same_metrics(workdir,
                                                                                monkeypatch):
  # Trained on one device at batch 128, eval batch 1024; evaluated on three devices, which divide
  # neither (a refusal of the training batch size before, which eval does not use).
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
  result = run_main("--mode=eval", f"--workdir={workdir}", "--checkpoint=latest")
  assert result.returncode == 0, result.stderr
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert f"test_accuracy {final['test_accuracy']!r}  test_examples 10000" in result.stdout
  (loss,) = re.findall(r"test_loss ([\d.]+)", result.stdout)
  assert float(loss) == pytest.approx(final["test_loss"], rel=1e-5)  # Summed in another order.


def test_mnist_like_fits_the_digit_in_20x20_centred_by_mass(mnist_test, tmp_path):
  digit = digits.mnist_like(digits.load_image(_render(mnist_test.images_NHWC[0, ..., 0], 5,
                                                        tmp_path / "a.png")))
  assert digit.shape == (28, 28) and digit.dtype == np.uint8
  assert digit[0].max() == 0 and digit[:, 0].max() == 0  # Inverted: a black background.
  rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
  assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (20, 21)  # 20, plus resampling blur.
  mass = digit.astype(np.float64) / digit.sum()
  centre = (mass.sum(1) @ np.arange(28), mass.sum(0) @ np.arange(28))
  np.testing.assert_allclose(centre, (13.5, 13.5), atol=0.75)


def test_a_fashion_photo_is_framed_as_fashion_mnist_frames_its_own():
  """The longest side to 28 pixels and the box centred, where a digit goes to 20 by its mass."""
  photo = np.full((90, 60), 250.0)  # A light background; a grey object 60 high, 30 wide, and a
  photo[10:70, 10:40] = 150.0  # black band at its top that moves its centre of mass up.
  photo[10:20, 10:40] = 0.0
  rows_and_cols = lambda image: (np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0)))
  rows, cols = rows_and_cols(digits.mnist_like(photo, "fashion_mnist"))
  assert (rows[0], rows[-1]) == (0, 27) and (cols[0], cols[-1]) == (7, 20)
  rows, cols = rows_and_cols(digits.mnist_like(photo, "mnist"))
  assert rows[-1] - rows[0] + 1 == 20 and rows[0] > 4  # Moved down: its mass sits high.
  with pytest.raises(digits.ImageError, match="this model is of 'emnist'"):
    digits.mnist_like(photo, "emnist")


def test_a_model_of_other_images_than_28x28_grayscale_is_refused_photos():
  info = data.DatasetInfo("cifar10", (32, 32, 3), 10, tuple("abcdefghij"))
  with pytest.raises(digits.ImageError, match=r"folder evaluation needs a 28x28 grayscale model; "
                                               r"this one takes \(32, 32, 3\)"):
    digits.check_takes_28x28_grayscale(info, "folder evaluation")
  digits.check_takes_28x28_grayscale(data.DatasetInfo("mnist", (28, 28, 1), 10, tuple("0123456789")),
                                      "predicting")


def test_predicts_rendered_test_digits_like_the_originals(workdir, mnist_test, tmp_path):
  count = 60
  images = [digits.load_image(_render(mnist_test.images_NHWC[i, ..., 0], i, tmp_path / f"{i}.png"))
            for i in range(count)]
  model = predict.load(str(workdir))
  probs = predict.probabilities(model, images)
  assert probs.shape == (count, 10)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  labels = mnist_test.labels_N[:count]
  rendered_accuracy = np.mean(probs.argmax(1) == labels)
  original = predict.probabilities(model, mnist_test.images_NHWC[:count], preprocess=False)
  original_accuracy = np.mean(original.argmax(1) == labels)
  assert rendered_accuracy >= 0.85, (rendered_accuracy, original_accuracy)


def _png_claiming(path, width, height):
  """A PNG whose header gives `width` x `height`: too big to decode, not to open."""
  Image.new("L", (8, 8), 255).save(path)
  data = bytearray(path.read_bytes())
  data[16:24] = struct.pack(">II", width, height)  # IHDR's data starts at byte 16.
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  path.write_bytes(bytes(data))


# How each EXIF orientation (2..8) stores an upright image; the viewer undoes it.
_STORED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
           5: np.transpose, 6: np.rot90, 7: lambda a: np.rot90(a, 2).T, 8: lambda a: np.rot90(a, -1)}


def test_ink_of_either_colour_on_a_transparent_background_predicts(workdir, mnist_test, tmp_path):
  """Dark ink, and white ink as drawn for a dark page, each with the digit in the alpha channel."""
  count = 40
  model = predict.load(str(workdir))
  by_ink = {}
  for ink in (0, 255):
    images = []
    for i in range(count):
      rgba = np.zeros((28, 28, 4), np.uint8)
      rgba[..., :3], rgba[..., 3] = ink, mnist_test.images_NHWC[i, ..., 0]
      Image.fromarray(rgba).resize((84, 84)).save(tmp_path / f"{ink}_{i}.png")
      images.append(digits.load_image(str(tmp_path / f"{ink}_{i}.png")))
    by_ink[ink] = np.stack([digits.mnist_like(image) for image in images])
    accuracy = np.mean(predict.probabilities(model, images).argmax(1) == mnist_test.labels_N[:count])
    assert accuracy >= 0.85, (ink, accuracy)  # White ink was flattened onto white: no digit.
  np.testing.assert_allclose(by_ink[0], by_ink[255], atol=2)


def _save_oriented(upright_HW, orientation, path):
  exif = Image.Exif()
  exif[ExifTags.Base.Orientation] = orientation
  Image.fromarray(np.ascontiguousarray(_STORED[orientation](upright_HW))).save(path, exif=exif)
  return str(path)


def test_a_12_bit_scan_in_a_16_bit_file_predicts_and_a_tiny_image_is_refused(workdir, mnist_test,
                                                                             tmp_path):
  digit = 255 - mnist_test.images_NHWC[0, ..., 0].astype(np.uint16)  # Dark on light.
  Image.fromarray(digit * 16).save(tmp_path / "scan.png")  # 0..4080, as 12-bit scanners write.
  model = predict.load(str(workdir))
  probs = predict.probabilities(model, [digits.load_image(str(tmp_path / "scan.png"))])
  assert probs.argmax() == mnist_test.labels_N[0]
  with pytest.raises(digits.ImageError, match="2x1 pixels is too small to hold a digit"):
    digits.mnist_like(np.zeros((1, 2)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_image_upright(tmp_path, orientation):
  upright = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7)
  loaded = digits.load_image(_save_oriented(upright, orientation, tmp_path / "a.png"))
  np.testing.assert_array_equal(loaded, upright)


def test_photos_stored_turned_predict_as_upright_ones(workdir, mnist_test, tmp_path):
  """As a phone writes them: JPEG pixels turned a quarter, orientation 6 in EXIF."""
  count = 60
  model = predict.load(str(workdir))
  images = []
  for i in range(count):
    upright = np.asarray(Image.open(_render(mnist_test.images_NHWC[i, ..., 0], i, tmp_path / "a.png")))
    images.append(digits.load_image(_save_oriented(upright, 6, tmp_path / f"{i}.jpg")))
  accuracy = np.mean(predict.probabilities(model, images).argmax(1) == mnist_test.labels_N[:count])
  assert accuracy >= 0.85  # About 0.15 when read sideways.


def _good_and_bad_files(mnist_test, tmp_path):
  """Two digit images, and files that cannot be predicted with the reason each gives."""
  good = [_render(mnist_test.images_NHWC[i, ..., 0], i, tmp_path / f"{i}.png") for i in (0, 1)]
  Image.open(good[1]).convert("RGB").save(tmp_path / "1.jpg")
  good[1] = str(tmp_path / "1.jpg")
  (tmp_path / "notes.png").write_text("not an image")
  (tmp_path / "cut.png").write_bytes((tmp_path / "0.png").read_bytes()[:100])
  Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
  _png_claiming(tmp_path / "bomb.png", 20_000, 20_000)  # Above Pillow's own limit.
  _png_claiming(tmp_path / "huge.png", 6_000, 5_000)  # Below Pillow's, above predict's.
  bad = {
      str(tmp_path / "missing.png"): "no such file",
      str(tmp_path / "notes.png"): "not an image file",
      str(tmp_path / "cut.png"): "cannot be read as an image",
      str(tmp_path / "blank.png"): "no digit found",
      str(tmp_path / "bomb.png"): "above the limit of 25 megapixels",
      str(tmp_path / "huge.png"): "6000x5000 pixels is above the limit of 25 megapixels",
  }
  return good, bad


def test_predict_reports_each_bad_file_and_still_predicts_the_others(workdir, mnist_test, tmp_path):
  good, bad = _good_and_bad_files(mnist_test, tmp_path)
  paths = [good[0], *bad, good[1]]
  result = main_in_process("--mode=predict", f"--workdir={workdir}", f"--images={','.join(paths)}")
  assert result.returncode == 1

  model = predict.load(str(workdir))
  expected = predict.probabilities(model, [digits.load_image(path) for path in good])
  assert result.stdout.splitlines() == [
      f"{path}  {probs.argmax()}  {probs.max():.4f}" for path, probs in zip(good, expected)
  ]
  errors = result.stderr.strip().splitlines()
  assert len(errors) == len(bad), result.stderr
  for line, (path, reason) in zip(errors, bad.items()):
    assert line.startswith(f"mnist_jax: {path}: {reason}"), line


# A process of its own: a fork of pytest's process, where JAX has started, could deadlock.
_FRAMING_AHEAD = """
import json, sys
from mnist_jax.run import workers
from mnist_jax.studies import digits, predict
workdir, paths = sys.argv[1], sys.argv[2:]
with workers.allowed(), predict.framing_files(workdir, paths) as framed:
  model = predict.load(workdir)
  framings = []
  for i in range(len(paths)):
    try:
      framings.append(framed(model, i).tolist())
    except digits.ImageError as e:
      framings.append(str(e))
print(json.dumps({"scipy_here": "scipy.ndimage" in sys.modules, "framings": framings}))
"""


def test_workers_frame_images_as_this_process_does_while_the_model_restores(workdir, mnist_test,
                                                                             tmp_path):
  good, bad = _good_and_bad_files(mnist_test, tmp_path)
  paths = [good[0], *bad, good[1]]
  result = subprocess.run([sys.executable, "-c", _FRAMING_AHEAD, str(workdir), *paths], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert (result.returncode, result.stderr) == (0, "")
  output = json.loads(result.stdout)
  assert not output["scipy_here"]  # Framing imports scipy: it ran in the workers.
  for path, framing in zip(paths, output["framings"], strict=True):
    try:
      assert framing == digits.framed_file(path).tolist()
    except digits.ImageError as e:
      assert framing == str(e)


@pytest.mark.slow
def test_a_run_of_several_seeds_evaluates_each_and_predicts_with_their_mean(tmp_path, mnist_test):
  config = load_config("seed_mlp", "smoke")
  config.num_seeds = 2
  train_and_report(config, tmp_path)
  record = json.loads((tmp_path / "metrics.jsonl").read_text())
  result = run_main("--mode=eval", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert f"test_accuracy {record['test_accuracy_per_seed']!r}" in result.stdout

  model = predict.load(str(tmp_path))
  images = mnist_test.images_NHWC[:100]
  probs = predict.probabilities(model, images, preprocess=False)
  first = jax.tree.map(lambda x: x[0], model.state.params)
  second = jax.tree.map(lambda x: x[1], model.state.params)
  apply = lambda params: jax.nn.softmax(model.state.apply_fn(
      {"params": params}, images.astype(np.float32) / 255.0, train=False))
  np.testing.assert_allclose(probs, (apply(first) + apply(second)) / 2, rtol=1e-5, atol=1e-6)
  assert not np.allclose(apply(first), apply(second), atol=1e-3)  # Two models, not one twice.

  # A labelled folder is scored for the ensemble and for each seed.
  for i in range(40):
    folder = tmp_path / "digits" / str(mnist_test.labels_N[i])
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mnist_test.images_NHWC[i, ..., 0]).save(folder / f"{i}.png")
  result = main_in_process("--mode=eval", f"--workdir={tmp_path}",
                           f"--images_dir={tmp_path / 'digits'}")
  assert result.returncode == 0, result.stderr
  saved = json.loads((tmp_path / "eval" / "digits" / "results.json").read_text())
  paths = sorted((tmp_path / "digits").glob("*/*.png"))
  truth = np.array([int(path.parent.name) for path in paths])
  prepared = np.stack([digits.mnist_like(digits.load_image(str(path))) for path in paths])[..., None]
  per_seed = [float(np.mean(np.asarray(model.state.apply_fn(
      {"params": params}, prepared.astype(np.float32) / 255.0, train=False)).argmax(1) == truth))
              for params in (first, second)]
  ensemble = predict.probabilities(model, prepared, preprocess=False)
  assert saved["accuracy_per_seed"] == pytest.approx(per_seed, abs=1e-12)
  assert saved["accuracy"] == pytest.approx(np.mean(ensemble.argmax(1) == truth), abs=1e-12)


@pytest.mark.slow
def test_ctrl_c_at_any_moment_of_predict_is_one_line(workdir, mnist_test, tmp_path):
  images = ",".join(_render(mnist_test.images_NHWC[i, ..., 0], i, tmp_path / f"{i}.png")
                    for i in range(20))
  outcomes = set()
  for delay in (0.3, 0.8, 1.3, 1.8, 2.5):  # Starting, importing, restoring, predicting, or done.
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_jax.main", "--mode=predict", f"--workdir={workdir}",
         f"--images={images}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    outcomes.add(process.returncode)
    if process.returncode == -signal.SIGINT:  # Before Python had started: no output at all.
      assert stderr == ""
    elif process.returncode != 0:
      assert (process.returncode, stderr) == (128 + signal.SIGINT, "mnist_jax: interrupted\n")
  assert 128 + signal.SIGINT in outcomes
