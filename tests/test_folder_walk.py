"""A labelled folder's walk: every file under a class folder is read or skipped with its reason."""

import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

from PIL import Image, ImageDraw

from conftest import REPO, main_in_process
from mnist_jax import data
from mnist_jax.studies import folders

MNIST = data.DatasetInfo("mnist", (28, 28, 1), 10, tuple("0123456789"))
NOBODY = 65534


def _digit(path):
  """A drawn 0: dark on white, 56x56."""
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.new("L", (56, 56), 255)
  ImageDraw.Draw(image).ellipse((16, 8, 40, 48), outline=0, width=5)
  image.save(path)


def _load(directory):
  images, labels, paths, skipped = folders.load_folder(str(directory), MNIST)
  return [os.path.relpath(p, directory) for p in paths], labels.tolist(), skipped


def test_links_are_followed_and_broken_links_loops_and_stray_files_are_named(tmp_path, capfd):
  root = tmp_path / "digits"
  _digit(root / "3" / "a.png")
  _digit(root / "3" / "sub" / "b.png")
  _digit(tmp_path / "elsewhere" / "c.png")
  (root / "3" / "linked").symlink_to(tmp_path / "elsewhere")  # Followed, as ImageFolder does.
  (root / "3" / "loop").symlink_to(root / "3")
  (root / "3" / "sub" / "up").symlink_to(root)  # The whole folder again, under class 3.
  (root / "4").mkdir()
  (root / "4" / "gone.png").symlink_to("missing.png")
  (root / "5").symlink_to(tmp_path / "elsewhere")  # A class folder that is a link.
  (root / "notes.txt").write_text("beside the class folders")
  (root / "stray.png").symlink_to(tmp_path / "nowhere.png")
  (root / ".hidden").write_text("left out")
  paths, labels, skipped = _load(root)
  assert paths == ["3/a.png", "3/linked/c.png", "3/sub/b.png", "5/c.png"]
  assert labels == [3, 3, 3, 5]
  assert skipped == [
      "3/loop: a link to a folder that holds it (a loop): not followed; skipped",
      "3/sub/up: a link to a folder that holds it (a loop): not followed; skipped",
      "4/gone.png: a broken link (to missing.png); skipped",
      "notes.txt: not in a class folder; skipped (images go in a subfolder named by their class)",
      f"stray.png: a broken link (to {tmp_path / 'nowhere.png'}); skipped",
  ]
  warnings = capfd.readouterr().err.splitlines()
  assert warnings == [f"mnist_jax: {root}/{entry}" for entry in skipped]


def test_a_folder_that_cannot_be_listed_is_named_not_dropped(tmp_path, monkeypatch):
  """Whatever stops a listing (here an I/O error) is reported for that folder."""
  root = tmp_path / "digits"
  _digit(root / "1" / "a.png")
  _digit(root / "1" / "bad" / "b.png")
  scandir = os.scandir

  def failing(path):
    if os.path.basename(path) == "bad":
      raise OSError(5, "Input/output error", path)
    return scandir(path)

  monkeypatch.setattr(os, "scandir", failing)
  paths, _, skipped = _load(root)
  assert paths == ["1/a.png"]
  assert skipped == ["1/bad: cannot be listed (Input/output error): the files in it are not read; "
                     "skipped"]


def _as_nobody(function):
  """`function()`'s value, run by a user without root's right to read any folder: in a forked
  child that drops to `nobody` when the tests run as root (a mode-000 folder is then unreadable,
  as it is to its users), in this process otherwise."""
  if os.geteuid() != 0:
    return function()
  read_end, write_end = os.pipe()
  with warnings.catch_warnings():  # The child touches no JAX: it lists folders and reads images.
    warnings.simplefilter("ignore", RuntimeWarning)
    child = os.fork()
  if child == 0:  # pragma: no cover (the child)
    try:
      os.close(read_end)
      os.setgroups([])
      os.setgid(NOBODY)
      os.setuid(NOBODY)
      result = function()
      os.write(write_end, json.dumps(result).encode())
    finally:
      os._exit(0)
  os.close(write_end)
  if not select.select([read_end], [], [], 60)[0]:  # A lock a thread held at the fork: stop.
    os.kill(child, signal.SIGKILL)
  with os.fdopen(read_end) as pipe:
    text = pipe.read()
  os.waitpid(child, 0)
  assert text, "the walk failed in the child; run the test without root to see why"
  return json.loads(text)


def test_permission_denied_is_named_for_a_class_folder_a_subfolder_and_a_file():
  root = tempfile.mkdtemp(prefix="folder_walk_")  # Under /tmp, which `nobody` can reach.
  try:
    for name in ("1/a.png", "1/locked/b.png", "1/secret.png", "7/c.png"):
      _digit(pathlib.Path(root) / name)
    for dirpath, dirnames, filenames in os.walk(root):
      os.chmod(dirpath, 0o755)
      for name in filenames:
        os.chmod(os.path.join(dirpath, name), 0o644)
    os.chmod(os.path.join(root, "1", "locked"), 0)
    os.chmod(os.path.join(root, "1", "secret.png"), 0)
    os.chmod(os.path.join(root, "7"), 0)

    def walk():
      images, labels, paths, skipped = folders.load_folder(root, MNIST)
      return [os.path.relpath(p, root) for p in paths], skipped

    paths, skipped = _as_nobody(walk)
    assert paths == ["1/a.png"]
    assert skipped == [
        "1/locked: cannot be listed (permission denied): the files in it are not read; skipped",
        "1/secret.png: permission denied; skipped",
        "7: cannot be listed (permission denied): the files in it are not read; skipped",
    ]  # The class folder 7 is not "empty".
  finally:
    os.chmod(os.path.join(root, "1", "locked"), 0o755)
    os.chmod(os.path.join(root, "7"), 0o755)
    shutil.rmtree(root)


def test_an_empty_images_dir_is_refused_before_anything_runs(tmp_path):
  result = main_in_process("--mode=eval", f"--workdir={tmp_path / 'no_run'}", "--images_dir=")
  assert (result.returncode, result.stdout) == (1, "")
  assert result.stderr == ("mnist_jax: --images_dir is empty; give a folder with a subfolder of "
                           "images per class, or leave the flag out to evaluate the test split\n")


# A process of its own: a fork of pytest's process, where JAX has started, could deadlock.
_IN_WORKERS = """
import json, sys
from mnist_jax import data
from mnist_jax.run import workers
from mnist_jax.studies import folders
mnist = data.DatasetInfo("mnist", (28, 28, 1), 10, tuple("0123456789"))
with workers.allowed(), workers.forked(2) as pool:
  images, labels, paths, skipped = folders.load_folder(sys.argv[1], mnist, pool)
print(json.dumps({"scipy_here": "scipy.ndimage" in sys.modules, "images": images.tolist(),
                  "labels": labels.tolist(), "paths": paths, "skipped": skipped}))
"""


def test_workers_frame_a_folder_as_this_process_does_in_the_same_order(tmp_path, capfd):
  root = tmp_path / "digits"
  for i in range(6):
    _digit(root / str(i % 3) / f"{i}.png")
  Image.new("L", (56, 56), 255).save(root / "1" / "blank.png")  # No digit: skipped.
  (root / "2" / "notes.png").write_text("not an image")
  (root / "2" / "gone.png").symlink_to("missing.png")
  (root / "4").mkdir()
  (root / "stray.txt").write_text("beside the class folders")
  result = subprocess.run([sys.executable, "-c", _IN_WORKERS, str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  there = json.loads(result.stdout)
  assert not there["scipy_here"]  # Framing imports scipy: it ran in the workers.
  images, labels, paths, skipped = folders.load_folder(str(root), MNIST)
  assert len(skipped) == 5 and len(paths) == 6
  assert (there["images"], there["labels"], there["paths"], there["skipped"]) == (
      images.tolist(), labels.tolist(), paths, skipped)
  assert result.stderr == capfd.readouterr().err  # The same warnings, in the same order.
