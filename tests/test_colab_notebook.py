"""tpu/colab_demo.ipynb: valid, committed with a full run's outputs; its run in quick mode on CPU (the plot, a
trajectory, the report) is in tests/test_demo.py, on the quick demo's work directory."""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tpu" / "colab_demo.ipynb"
KERNEL = "mini_o3_test_python"


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  return cells[0]


def _register_kernel(tmp_path, monkeypatch):
  """A kernelspec for this very interpreter, found through JUPYTER_PATH (no global install needed)."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "mini_o3_jax tests", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def _outputs(cell, mime):
  return [o for o in cell.outputs if mime in o.get("data", {})]


def test_notebook_is_valid_and_defaults_to_the_full_demo():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  params = _parameters_cell(nb).source
  assert "QUICK = False" in params
  assert nb.metadata["kernelspec"]["name"] == "python3"


def test_notebook_is_committed_with_the_outputs_of_a_full_cpu_run():
  """A reader sees what to expect: `tools/refresh_notebook.py` ran every cell, in order, without an error."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run tools/refresh_notebook.py"
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
  assert "devices: [CpuDevice" in text and "stage report: done" in text
  assert "--config.quick" not in text  # the full demo, not the smoke run
  assert len([c for c in code if _outputs(c, "image/png")]) == 3
  reports = [o for c in code for o in _outputs(c, "text/markdown")]
  assert reports and "Accuracy (%) by test-time turn budget" in reports[-1]["data"]["text/markdown"]


# The notebook run top to bottom (quick mode, CPU) is tests/test_demo.py's test_notebook_runs_the_quick_demo_on_cpu:
# it shares the quick demo's run there (its cells on a copy of that work directory), in the same worker.
