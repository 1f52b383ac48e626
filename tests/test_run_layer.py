"""run/ stands below the core: its modules import nothing of mnist_jax but errors.py and run/."""

import ast
import os

import pytest

from conftest import REPO

RUN = os.path.join(REPO, "mnist_jax", "run")
ALLOWED = ("mnist_jax.errors", "mnist_jax.run")


def _imports(source: str, package: str = "mnist_jax.run") -> list[str]:
  """Every module of mnist_jax a source imports, anywhere in it, by its full dotted name."""
  names = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: from the package, up `level - 1` packages.
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      # `from mnist_jax import configs` imports a module; `from x.y import name` may import either.
      names += [f"{base}.{alias.name}" for alias in node.names] + [base]
  return [name for name in names if name == "mnist_jax" or name.startswith("mnist_jax.")]


def _refused(name: str) -> bool:
  return name != "mnist_jax" and not any(
      name == allowed or name.startswith(allowed + ".") for allowed in ALLOWED)


@pytest.mark.parametrize("module", sorted(name for name in os.listdir(RUN) if name.endswith(".py")))
def test_run_modules_import_nothing_of_the_core_or_what_surrounds_it(module):
  with open(os.path.join(RUN, module), encoding="utf-8") as f:
    refused = [name for name in _imports(f.read()) if _refused(name)]
  assert not refused, f"run/{module} imports {refused}"


@pytest.mark.parametrize("source", [
    "from mnist_jax import configs", "from mnist_jax import errors, metrics", "import mnist_jax.data",
    "from mnist_jax.report import training", "from .. import steps",
    "def f():\n  from mnist_jax.studies import predict", "from mnist_jax.tools.sweep import run_sweep",
])
def test_the_check_finds_each_kind_of_import_of_the_core(source):
  assert any(_refused(name) for name in _imports(source)), source


def test_the_check_lets_errors_and_run_through():
  source = "from mnist_jax import errors\nfrom mnist_jax.run import rundir\nfrom . import parallel"
  assert not [name for name in _imports(source) if _refused(name)]
