"""The package's layout: each public name is defined in one module only."""

import ast
import collections
import os

import mnist_jax

PACKAGE = os.path.dirname(mnist_jax.__file__)
# `main`: the entry point of each command that owns its flags (`python -m mnist_jax.main`,
# `python -m mnist_jax.tools.bench`); absl's `app.run` takes it by that name.
ENTRY_POINTS = {"main"}


def _public_names(tree: ast.Module) -> set[str]:
  """Names a module defines at its top level (functions, classes, assignments), but for those
  that start with `_` and those it imports."""
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for target in targets:
        for name in ast.walk(target):
          if isinstance(name, ast.Name):
            names.add(name.id)
  return {name for name in names if not name.startswith("_")}


def _modules() -> dict[str, ast.Module]:
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path, encoding="utf-8") as f:
          modules[os.path.relpath(path, PACKAGE)] = ast.parse(f.read(), path)
  return modules


def test_no_public_name_is_defined_in_two_modules():
  where = collections.defaultdict(list)
  modules = _modules()
  assert len(modules) > 20  # The walk found the package.
  for module, tree in modules.items():
    for name in _public_names(tree) - ENTRY_POINTS:
      where[name].append(module)
  twice = {name: sorted(paths) for name, paths in where.items() if len(paths) > 1}
  assert not twice, f"defined in more than one module: {twice}"


def test_the_check_sees_functions_classes_and_constants_but_not_private_or_imported_names():
  tree = ast.parse("import os\nfrom x import y\nA = 1\nB: int = 2\nC, D = 3, 4\n_E = 5\n"
                   "def f(): pass\nclass G: pass\ndef _h(): pass\n")
  assert _public_names(tree) == {"A", "B", "C", "D", "f", "G"}


# Dependencies run one way: main -> tools -> report -> studies -> the core. A layer imports
# nothing from the layers before it (run/, below the core, is another's to check).
_CORE = ("augment", "configs", "data", "metrics", "models", "optimizers", "pipelines", "steps",
         "train")
_ABOVE = {"studies": ("report", "tools", "main", "bench"), "report": ("tools", "main", "bench"),
          **{module: ("studies", "report", "tools", "main", "bench") for module in _CORE}}


def _imported(tree: ast.Module) -> set[str]:
  """The first part of every `mnist_jax.<part>` a module imports, at any depth of its code."""
  parts = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnist_jax"):
      dotted = node.module.split(".")[1:]
      parts.update([dotted[0]] if dotted else [alias.name for alias in node.names])
    elif isinstance(node, ast.Import):
      parts.update(alias.name.split(".")[1] for alias in node.names
                   if alias.name.startswith("mnist_jax."))
  return parts


def test_dependencies_run_one_way():
  wrong = {}
  for module, tree in _modules().items():
    layer = module.split(os.sep)[0].removesuffix(".py")
    forbidden = set(_imported(tree)) & set(_ABOVE.get(layer, ()))
    if forbidden:
      wrong[module] = sorted(forbidden)
  assert not wrong, f"imports from a layer above: {wrong}"


def test_the_import_check_sees_lazy_and_package_imports():
  tree = ast.parse("from mnist_jax.report import training\nfrom mnist_jax import data, steps\n"
                   "def f():\n  import mnist_jax.tools.sweep\n")
  assert _imported(tree) == {"report", "data", "steps", "tools"}
