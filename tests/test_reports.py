"""The training report, its TensorBoard events, `--mode=report` and `--mode=explore`, on real MNIST."""

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

from conftest import REPO, load_config, main_in_process, train_and_report
from mnist_jax import data, metrics, pipelines, steps
from mnist_jax.report import drawing, explore, plots, tables
from mnist_jax.run import progress, rundir, summaries
from mnist_jax.studies import calibration
from test_data import TEST_COUNTS, TRAIN_COUNTS

REPORT_FIGURES = ("learning_curves", "test_predictions", "confusion_matrix", "confident_mistakes",
                  "reliability", "mistake_saliency")
EXPLORE_FIGURES = ("label_histogram", "first_train_images", "pixel_histograms", "image_colorbar")


@pytest.fixture
def trained(two_epoch_run):
  """The session's run of two smoke epochs, and its final metrics."""
  return two_epoch_run, rundir.read_final(str(two_epoch_run), metrics.check_record)


def assert_legible_png(path):
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    width, height = image.size
  assert 400 <= width <= 2000 and 300 <= height <= 2000, (path, image.size)


def confusion_table(report: str) -> np.ndarray:
  """The counts and the `examples` column of report.md's confusion table, as integers."""
  rows = [line for line in report.splitlines() if re.match(r"\| \*\*\d+\*\* \|", line)]
  return np.array([[int(cell) for cell in row.split("|")[2:-2]] for row in rows])


def test_training_writes_every_figure_and_a_report_linking_them(trained):
  workdir, _ = trained
  report = (workdir / "report.md").read_text()
  for name in REPORT_FIGURES:
    assert_legible_png(workdir / "plots" / f"{name}.png")
    assert f"(plots/{name}.png)" in report


def test_the_report_gives_calibration_and_shows_where_mistakes_looked(trained):
  workdir, final = trained
  saved = rundir.read_predictions(str(workdir))
  report = (workdir / "report.md").read_text()
  # No validation split: no temperature, and the report says why.
  assert "temperature" not in saved and "No temperature was fitted" in report
  ((nll, ece),) = re.findall(r"^\| as trained \| ([\d.]+) \| ([\d.]+) \|", report, re.MULTILINE)
  assert float(nll) == pytest.approx(final["test_loss"], abs=1e-4)
  probs_NC = np.exp(calibration.log_softmax(saved["logits_NC"].astype(np.float64)))
  assert float(ece) == pytest.approx(
      calibration.expected_calibration_error(probs_NC, saved["labels_N"]), abs=1e-4)
  # Saliency maps of the 25 most confident mistakes, each scaled to its own maximum.
  assert list(saved["saliency_index_K"]) == list(
      tables.most_confident_mistakes(probs_NC, saved["labels_N"], tables.NUM_MISTAKES))
  assert saved["saliency_KHW"].shape == (25, 28, 28)
  np.testing.assert_allclose(saved["saliency_KHW"].max(axis=(1, 2)), 1.0)


def test_confusion_matrix_counts_every_test_example_and_gives_the_accuracy(trained):
  workdir, final = trained
  saved = np.load(workdir / "predictions.npz")
  assert saved["logits_NC"].shape == (10_000, 10)
  counts_CC = tables.confusion_counts(saved["labels_N"], saved["logits_NC"].argmax(1), 10)
  assert counts_CC.sum() == 10_000
  np.testing.assert_allclose(np.trace(counts_CC) / 10_000, final["test_accuracy"], rtol=1e-6)
  report = (workdir / "report.md").read_text()
  table = confusion_table(report)
  np.testing.assert_array_equal(table[:, :10], counts_CC)
  assert table[:, 10].tolist() == TEST_COUNTS
  (numbers,) = re.findall(r"^\| ([\d.]+)% \| ([\d.]+) \| 10000 \|", report, re.MULTILINE)
  assert float(numbers[0]) == round(100 * np.trace(counts_CC) / 10_000, 2)
  assert float(numbers[1]) == pytest.approx(final["test_loss"], abs=1e-4)


def test_tensorboard_reader_finds_the_scalars_and_the_figures(trained):
  workdir, final = trained
  events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"),
                                              size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  tags = events.Tags()["tensors"]
  for tag in metrics.scalars(final):
    assert events.SummaryMetadata(tag).plugin_data.plugin_name == "scalars", tag
    assert [event.step for event in events.Tensors(tag)] == [final["step"] // 2, final["step"]]
  accuracy = events.Tensors("test/accuracy")[-1]
  assert float(tensor_util.make_ndarray(accuracy.tensor_proto)) == pytest.approx(
      final["test_accuracy"], rel=1e-6)
  learning_rate = events.Tensors("learning_rate")[-1]
  assert float(tensor_util.make_ndarray(learning_rate.tensor_proto)) == pytest.approx(1e-3)
  for name in REPORT_FIGURES:
    assert events.SummaryMetadata(f"report/{name}").plugin_data.plugin_name == "images"
    width, height, png = tensor_util.make_ndarray(events.Tensors(f"report/{name}")[0].tensor_proto)
    with Image.open(io.BytesIO(png)) as image:
      assert image.size == (int(width), int(height))
  assert len(tags) == len(metrics.scalars(final)) + len(REPORT_FIGURES)


@pytest.mark.slow
def test_a_validation_split_shows_wherever_the_test_split_does(tmp_path):
  config = load_config("seed_mlp", "smoke")
  config.validation_fraction = 0.1
  final = train_and_report(config, tmp_path)
  assert metrics.splits_in(final) == ["train", "val", "test"]
  line = metrics.epoch_line(final, 1)
  assert "  val_loss " in line and "  val_acc " in line
  report = (tmp_path / "report.md").read_text()
  assert ("| epoch | train loss | train accuracy | val loss | val accuracy | test loss | "
          "test accuracy | epoch time (s) |") in report
  assert f"| {final['val_accuracy']:.4f} | {final['test_loss']:.4f} |" in report
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"),
                                              size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  for tag, field in (("val/loss", "val_loss"), ("val/accuracy", "val_accuracy")):
    (event,) = events.Tensors(tag)
    assert float(tensor_util.make_ndarray(event.tensor_proto)) == pytest.approx(final[field])
  history = tables.history_columns(rundir.read_history(str(tmp_path), metrics.check_record))
  figure = plots.learning_curves(history, metrics.splits_in(history))
  for ax in figure.axes:
    assert [line.get_label() for line in ax.get_lines()] == ["train", "val", "test"]
  # The temperature is fitted on the validation split, and scaled probabilities are reported.
  saved = rundir.read_predictions(str(tmp_path))
  assert str(saved["temperature_fitted_on"]) == "the validation split (train[54000:])"
  temperature = float(saved["temperature"])
  assert f"| temperature scaled, T = {temperature:.3f} |" in report


@pytest.mark.parametrize("extras", [
    # A negative index would show the last test image, silently.
    dict(saliency_KHW=np.zeros((1, 28, 28)), saliency_index_K=np.array([-1])),
    dict(saliency_KHW=np.zeros((1, 28, 28)), saliency_index_K=np.array([3])),
    dict(saliency_KHW=np.zeros((2, 28, 28)), saliency_index_K=np.array([0])),
    dict(saliency_KHW=np.zeros((1, 28, 28))),
    dict(temperature=np.float32(0.0)), dict(temperature=np.float32(np.nan)),
])
def test_damaged_temperature_or_saliency_maps_in_predictions_are_refused(tmp_path, extras):
  rundir.write_predictions(str(tmp_path), np.zeros((3, 10), np.float32), np.array([0, 1, 2]),
                           [str(d) for d in range(10)], **extras)
  with pytest.raises(rundir.RunFileError, match="is damaged .its temperature or saliency maps"):
    rundir.read_predictions(str(tmp_path))


@pytest.mark.slow
def test_report_mode_redraws_the_report_of_a_finished_run(trained, tmp_path):
  workdir, _ = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "plots")
  (copy / "report.md").unlink()
  result = main_in_process("--mode=report", f"--workdir={copy}")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"report: {copy / 'report.md'} (6 figures, the slowest drawn in ")
  for name in REPORT_FIGURES:  # Drawn from predictions.npz as training drew them from memory.
    assert_legible_png(copy / "plots" / f"{name}.png")
    assert (copy / "plots" / f"{name}.png").read_bytes() == (
        workdir / "plots" / f"{name}.png").read_bytes(), name
  original = (workdir / "report.md").read_text().replace(str(workdir), "WORKDIR")
  redrawn = (copy / "report.md").read_text().replace(str(copy), "WORKDIR")
  assert redrawn.replace("`copy`", f"`{workdir.name}`") == original


def test_report_mode_on_an_unfinished_workdir_is_one_clear_line(tmp_path):
  result = main_in_process("--mode=report", f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert result.stderr.strip().startswith(f"mnist_jax: {tmp_path / 'config.json'} does not exist")
  assert len(result.stderr.strip().splitlines()) == 1


def test_a_failing_plot_warns_and_keeps_the_metrics(tmp_path, monkeypatch, capsys):
  def broken(*args, **kwargs):
    raise RuntimeError("no ink")

  monkeypatch.setattr(plots, "confusion_matrix", broken)
  final = train_and_report(load_config("seed_mlp", "smoke"), tmp_path)
  assert final["test_accuracy"] > 0.9
  assert "warning: no training report (RuntimeError: no ink)" in capsys.readouterr().err
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
  assert json.loads((tmp_path / "final_metrics.json").read_text()) == final
  assert np.load(tmp_path / "predictions.npz")["logits_NC"].shape == (10_000, 10)


def test_explore_mode_prints_shapes_and_the_known_class_counts(tmp_path):
  config_file = os.path.join(REPO, "experiments", "seed_mlp.py")
  result = main_in_process("--mode=explore", f"--config={config_file}", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert "train  images (60000, 28, 28, 1) uint8  labels (60000,) int32" in result.stdout
  assert "test   images (10000, 28, 28, 1) uint8  labels (10000,) int32" in result.stdout
  rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s+\d\s", line)]
  assert [int(row[1]) for row in rows] == TRAIN_COUNTS
  assert [int(row[3]) for row in rows] == TEST_COUNTS
  for name in EXPLORE_FIGURES:
    assert_legible_png(tmp_path / "plots" / f"{name}.png")
    assert f"(plots/{name}.png)" in (tmp_path / "explore.md").read_text()


def test_pixel_value_counts_match_numpys_histogram(mnist_test):
  expected, _ = np.histogram(mnist_test.images_NHWC, bins=256, range=(0, 256))
  np.testing.assert_array_equal(explore.pixel_value_counts(mnist_test.images_NHWC), expected)


def test_recall_and_precision_on_a_hand_checked_example():
  labels = np.array([0, 0, 1, 2, 2, 2])
  predicted = np.array([0, 1, 1, 2, 2, 0])
  counts = tables.confusion_counts(labels, predicted, 3)
  np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
  recall, precision = tables.recall_and_precision(counts)
  np.testing.assert_allclose(recall, [1 / 2, 1, 2 / 3])
  np.testing.assert_allclose(precision, [1 / 2, 1 / 2, 1])


def test_most_confident_mistakes_come_first_and_right_answers_never():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01], [0.3, 0.7]])
  labels = np.array([1, 1, 1, 0, 0])
  np.testing.assert_array_equal(tables.most_confident_mistakes(probs, labels, k=5), [0, 4, 2])
  np.testing.assert_array_equal(tables.most_confident_mistakes(probs, labels, k=2), [0, 4])


def test_stream_epoch_reports_progress_with_an_eta(mnist_test, monkeypatch):
  del mnist_test  # Prepared.
  config = load_config("seed_mlp", "smoke")
  config.batch_size = 2500
  info = data.DatasetInfo("mnist", (28, 28, 1), 10, tuple("0123456789"))
  state = steps.create_train_state(config, info, jax.random.PRNGKey(0), 4)
  out = io.StringIO()
  monkeypatch.setattr(pipelines, "CHUNK_EXAMPLES", 2500)  # A chunk a step.
  monkeypatch.setattr(progress, "EpochProgress",
                      functools.partial(progress.EpochProgress, interval_s=0.0, out=out))
  pipeline = pipelines.StreamPipeline(config, state, {"train": "test"})
  pipeline.train_epoch(state, jax.random.PRNGKey(1))
  lines = out.getvalue().splitlines()
  assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4"]
  assert all(re.search(r"examples/s  ETA \d+:\d\d$", line) for line in lines), lines


_WRITE_WITHOUT_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None  # Any import of TensorFlow now fails.
from mnist_jax.run import summaries
first, second = summaries.Writer(sys.argv[1]), summaries.Writer(sys.argv[1])
first.scalars(7, {"train/loss": 0.25})
second.pngs(7, {"digit": sys.argv[2]})
"""


def test_events_are_written_without_tensorflow_and_read_back(tmp_path):
  logdir, digit = tmp_path / "tensorboard", tmp_path / "digit.png"
  Image.fromarray(np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)).save(digit)
  subprocess.run([sys.executable, "-c", _WRITE_WITHOUT_TENSORFLOW, str(logdir), str(digit)],
                 check=True)
  events = event_accumulator.EventAccumulator(str(logdir))
  events.Reload()
  (loss,) = events.Tensors("train/loss")
  assert (loss.step, float(tensor_util.make_ndarray(loss.tensor_proto))) == (7, 0.25)
  width, height, png = tensor_util.make_ndarray(events.Tensors("digit")[0].tensor_proto)
  with Image.open(io.BytesIO(png)) as image:
    assert (int(width), int(height)) == image.size == (20, 12)
    np.testing.assert_array_equal(np.asarray(image), np.arange(240).reshape(12, 20))


def test_event_records_are_the_bytes_tensorboards_own_writer_writes():
  frames = io.BytesIO()
  writer = record_writer.RecordWriter(frames)
  payloads = [b"", b"\x00", bytes(range(256)) * 41, os.urandom(100_003)]
  for payload in payloads:
    writer.write(payload)
  assert b"".join(summaries._record(payload) for payload in payloads) == frames.getvalue()


@pytest.mark.parametrize("values", [0.1, 1e30, float("nan"), [b"28", b"28", bytes(range(256))]])
def test_tensors_are_those_tensorboards_own_function_makes(values):
  expected = tensor_util.make_tensor_proto(
      np.float32(values) if isinstance(values, float) else values)
  assert summaries._tensor(values).SerializeToString() == expected.SerializeToString()


def test_a_writer_that_cannot_write_warns_once_and_training_goes_on(tmp_path, capsys):
  (tmp_path / "tensorboard").write_text("a file where the log directory should be")
  writer = summaries.Writer(str(tmp_path / "tensorboard"))
  writer.scalars(1, {"train/loss": 0.5})
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "digit.png")
  writer.pngs(1, {"digit": str(tmp_path / "digit.png")})
  assert capsys.readouterr().err.count("TensorBoard events stop here") == 1


def test_class_names_and_colour_images_draw_too(tmp_path):
  names = ("T-shirt/top", "Trouser", "Pullover")
  counts = {"train": np.array([6000, 5000, 4000]), "test": np.array([1000, 900, 800])}
  table = explore.count_table(counts, names)
  assert table[1].split() == ["0", "T-shirt/top", "6000", "40.00", "1000", "37.04"]
  assert table[-1].split() == ["total", "15000", "100.00", "2700", "100.00"]
  images_NHWC = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  counts_CC = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 6]])
  Plot = drawing.Plot
  drawing.write_pngs({
      "histogram": Plot("label_histogram", counts, names, "classes"),
      "grid": Plot("image_grid", images_NHWC, [f"{names[i % 3]} / Pullover" for i in range(7)],
                   "colour"),
      "colorbar": Plot("image_with_colorbar", images_NHWC[0], images_NHWC[0] / 255, "one"),
      "confusion": Plot("confusion_matrix", counts_CC, *tables.recall_and_precision(counts_CC),
                        names, "three classes"),
  }, str(tmp_path))
  for name in ("histogram", "grid", "colorbar", "confusion"):
    assert_legible_png(tmp_path / f"{name}.png")
