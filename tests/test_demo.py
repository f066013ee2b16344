"""The demo pipeline end to end at toy sizes (`--config.quick=True`), and its resume."""

import json
import os
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


@pytest.mark.slow
def test_quick_demo_writes_every_artifact(tmp_path):
  proc = _run(tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
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
