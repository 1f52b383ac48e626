"""experiments/colab.ipynb, executed headless from top to bottom with the smoke config."""

import json
import os

import nbclient
import nbformat
import pytest

from conftest import REPO

NOTEBOOK = os.path.join(REPO, "experiments", "colab.ipynb")


def _outputs(cell):
  text = "".join(output.get("text", "") for output in cell.outputs)
  text += "".join(output.get("data", {}).get("text/plain", "") for output in cell.outputs)
  images = [output for output in cell.outputs if "image/png" in output.get("data", {})]
  return text, images


@pytest.mark.slow
def test_colab_notebook_runs_the_smoke_config_headless(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  index = next(i for i, cell in enumerate(notebook.cells)
               if "parameters" in cell.metadata.get("tags", []))
  # As papermill does: a cell after the parameters that sets new values.
  workdir = str(tmp_path / "run")
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f"VARIANT = 'smoke'\nWORKDIR = {workdir!r}"
  ))
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
  )
  client.execute()

  texts = [_outputs(cell)[0] for cell in notebook.cells if cell.cell_type == "code"]
  assert any("backend: cpu" in text for text in texts)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [record["epoch"] for record in records] == [1]
  assert records[0]["test_accuracy"] > 0.9
  with open(os.path.join(workdir + "_wide", "config.json")) as f:
    assert json.load(f)["model_args"]["hidden_sizes"] == [256]
  figures = [image for cell in notebook.cells if cell.cell_type == "code"
             for image in _outputs(cell)[1]]
  assert len(figures) == 12  # Each of the two runs shows its report's six figures.
