"""The demo pipeline end to end at toy sizes (`--config.quick=True`), its resume, and the Colab notebook's
cells on that run's work directory."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mini_o3_jax.model.config import VLMConfig
from mini_o3_jax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *extra):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "mini_o3_jax.main", "--config", "configs/demo.py", "--workdir",
                         str(workdir), "--config.quick=True", *extra], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1500)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
  """One run of every stage of the quick demo (~100 s on a CI worker), shared by this file's two tests."""
  workdir = tmp_path_factory.mktemp("quick_demo")
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


@pytest.mark.slow
def test_quick_demo_writes_every_artifact(quick_demo):
  tmp_path = quick_demo
  metrics = json.load(open(tmp_path / "metrics.json"))
  models = {r["model"] for r in metrics["eval"]}
  assert models == {"no_tools", "sft", "rl", "rl_no_overturn_mask"}
  for r in metrics["eval"]:
    assert set(r) >= {"model", "tier", "max_turns", "n", "accuracy", "mean_turns", "overturn_rate"}
    assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] > 0
  assert {r["max_turns"] for r in metrics["eval"] if r["model"] == "rl"} == {1, 2, 4}
  for f in ("report.md", "turn_scaling.png", "turn_scaling.pdf", "hf_export/model.safetensors",
            "hf_export/tokenizer.json", "metrics/sft.jsonl", "metrics/rl.jsonl", "metrics/rl_no_mask.jsonl"):
    assert (tmp_path / f).exists(), f
  # TensorBoard: one run per training stage and per evaluated model (`tensorboard --logdir WORKDIR`)
  for run in ("sft", "rl", "rl_no_mask", "eval_sft", "eval_rl", "eval_no_tools"):
    assert list((tmp_path / "tensorboard" / run).glob("events.out.tfevents.*")), run
  report = (tmp_path / "report.md").read_text()
  assert "The paper's claims in miniature" in report
  assert "## Skills" in report and "first_zoom_on_target" in report
  skills = json.load(open(tmp_path / "eval" / "sft" / "skills.json"))
  assert set(skills) >= {"goal", "box_xy", "box_rest", "read", "other"}
  # An RL stage moves the SFT weights exactly when one of its updates had a signal (a group with unequal
  # rewards, at a non-zero learning rate): at toy sizes the SFT model may answer nothing right, and then
  # the update must be a no-op. The masked and unmasked runs share seeds, so they differ only then too.
  mcfg = VLMConfig.from_pretrained(str(tmp_path / "hf_export"))
  params = {stage: jax.tree.leaves(ckpt_lib.restore_params(str(tmp_path / "ckpt" / stage), mcfg)[0])
            for stage in ("sft", "rl", "rl_no_mask")}
  gap = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(params[a], params[b]))
  for stage in ("rl", "rl_no_mask"):
    rows = [json.loads(line) for line in open(tmp_path / "metrics" / f"{stage}.jsonl")]
    signal = any(r["zero_adv_group_fraction"] < 1 and r["learning_rate"] > 0 for r in rows)
    assert (gap("sft", stage) > 0) == signal, (stage, rows)
  # A re-run resumes: every training stage finds its final checkpoint and does no new step.
  again = _run(tmp_path, "--config.stages=('sft', 'rl')")
  assert again.returncode == 0, again.stderr[-4000:]
  assert "resumed from step 6" in again.stderr and "resumed from step 2" in again.stderr


@pytest.mark.slow
def test_notebook_runs_the_quick_demo_on_cpu(quick_demo, tmp_path, monkeypatch):
  """tpu/colab_demo.ipynb runs top to bottom on CPU in quick mode and shows the plot, a trajectory, the report.

  Its demo cell runs `mini_o3_jax.main` on a copy of the quick demo's work directory (the training and eval
  stages of the same quick demo are the test above's): the notebook's cells are what is tested here. What
  the cells show from the report and export stages is removed first, so this run must write it again.
  """
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  import test_colab_notebook as nbt  # its helpers (imported only once its dependencies are known present)

  nb = nbformat.read(nbt.NOTEBOOK, as_version=4)
  for cell in nb.cells:  # the committed outputs are the full run's; these must come from this one
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  workdir = tmp_path / "demo"
  shutil.copytree(quick_demo, workdir)
  for f in ("turn_scaling.png", "turn_scaling.pdf", "report.md", "hf_export"):
    path = workdir / f
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  # Quick mode, this checkout (so the install cell finds the package and installs nothing), CPU.
  nbt._parameters_cell(nb).source = "\n".join([
      "QUICK = True", "REPO_URL = ''", f"REPO_DIR = {ROOT!r}", f"WORKDIR = {str(workdir)!r}", "PLATFORM = 'cpu'",
      "EXTRA_FLAGS = [\"--config.stages=('report','export')\"]"])
  nbt._register_kernel(tmp_path, monkeypatch)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
  env["JAX_PLATFORMS"] = "cpu"
  client = nbclient.NotebookClient(nb, kernel_name=nbt.KERNEL, timeout=1500,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)  # raises CellExecutionError if any cell fails

  outputs = nbt._outputs
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
  assert "mini_o3_jax is installed already" in text
  assert "devices: [CpuDevice" in text
  assert "stage report: done" in text and "done in" in text
  assert "gold answer" in text and "final answer:" in text
  assert "after" in text and "turn(s), stop reason" in text  # the in-process agent's episode
  assert "the runs: [" in text or any(outputs(c, "text/html") for c in code)  # %tensorboard, or its runs
  images = [c for c in code if outputs(c, "image/png")]
  assert len(images) == 3, "the turn-scaling plot, one evaluated trajectory, the in-process agent's trajectory"
  reports = [o for c in code for o in outputs(c, "text/markdown")]
  assert reports and "Accuracy (%) by test-time turn budget" in reports[-1]["data"]["text/markdown"]
  for f in ("turn_scaling.png", "report.md", "metrics.json", "hf_export/model.safetensors"):
    assert (workdir / f).exists(), f
  assert list((workdir / "eval").glob("*/*_0.png"))
