"""tpu/colab_demo.ipynb runs top to bottom on CPU in quick mode and shows the plot, a trajectory, the report."""

import json
import os
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


@pytest.mark.slow
def test_notebook_runs_the_quick_demo_on_cpu(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:  # the committed outputs are the full run's; these must come from this one
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  workdir = tmp_path / "demo"
  # Quick mode, this checkout (so the install cell finds the package and installs nothing), CPU; the RL
  # stages are left out (test_demo.py runs every stage of the same quick demo): the notebook's cells are
  # what is tested here.
  _parameters_cell(nb).source = "\n".join([
      "QUICK = True", "REPO_URL = ''", f"REPO_DIR = {str(ROOT)!r}", f"WORKDIR = {str(workdir)!r}", "PLATFORM = 'cpu'",
      "EXTRA_FLAGS = [\"--config.stages=('data','sft','eval','report','export')\"]"])
  _register_kernel(tmp_path, monkeypatch)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
  env["JAX_PLATFORMS"] = "cpu"
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=1500,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)  # raises CellExecutionError if any cell fails

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
  assert "mini_o3_jax is installed already" in text
  assert "devices: [CpuDevice" in text
  assert "stage report: done" in text and "done in" in text
  assert "gold answer" in text and "final answer:" in text
  assert "after" in text and "turn(s), stop reason" in text  # the in-process agent's episode
  assert "the runs: [" in text or any(_outputs(c, "text/html") for c in code)  # %tensorboard, or its runs
  images = [c for c in code if _outputs(c, "image/png")]
  assert len(images) == 3, "the turn-scaling plot, one evaluated trajectory, the in-process agent's trajectory"
  reports = [o for c in code for o in _outputs(c, "text/markdown")]
  assert reports and "Accuracy (%) by test-time turn budget" in reports[-1]["data"]["text/markdown"]
  for f in ("turn_scaling.png", "report.md", "metrics.json"):
    assert (workdir / f).exists(), f
  assert list((workdir / "eval").glob("*/*_0.png"))
