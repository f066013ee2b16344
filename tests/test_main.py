"""The command line: the smoke config runs end to end; bad configs fail with a clear message."""

import json
import os
import subprocess
import sys

import pytest

from configs import demo
from mini_o3_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "mini_o3_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_smoke_config_runs_end_to_end(tmp_path):
  proc = _run(["--config", "configs/smoke.py", "--workdir", str(tmp_path)], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(tmp_path / "smoke.json"))
  assert result["export_reload_max_diff"] == 0.0
  assert result["grid_thw"][0] == 1 and result["prompt_tokens"] > 64
  assert os.path.exists(tmp_path / "hf_export" / "model.safetensors")
  assert os.path.exists(tmp_path / "log.txt")


def test_unknown_stage_is_a_clear_error(tmp_path):
  proc = _run(["--config", "configs/smoke.py", "--workdir", str(tmp_path), "--config.stages=('nope',)"], tmp_path)
  assert proc.returncode != 0
  assert "unknown stage 'nope'" in proc.stderr


def test_unknown_config_key_is_a_clear_error(tmp_path):
  proc = _run(["--config", "configs/smoke.py", "--workdir", str(tmp_path), "--config.no_such_key=1"], tmp_path)
  assert proc.returncode != 0
  assert "no_such_key" in proc.stderr


def test_quick_preset_adds_its_xla_flags_before_the_backend_starts(monkeypatch):
  import ml_collections

  from mini_o3_jax import main as main_lib
  from mini_o3_jax.pipeline import common
  preset = demo.quick_preset()
  config = ml_collections.ConfigDict({"quick": True, "xla_flags": "", "data": {}, "sft": {}, "rl": {}, "eval": {},
                                      "quick_preset": preset})
  resolved = common.resolve(config)
  assert resolved.xla_flags == preset.xla_flags and resolved.sft.steps == preset.sft.steps
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  main_lib._apply_xla_flags(config)
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                             "--xla_backend_optimization_level=0"]
  config.quick = False
  monkeypatch.setenv("XLA_FLAGS", "")
  main_lib._apply_xla_flags(config)
  assert os.environ["XLA_FLAGS"] == ""


def test_quick_preset_yields_to_flags_the_user_typed():
  import ml_collections

  from mini_o3_jax.pipeline import common
  preset = demo.quick_preset()
  config = ml_collections.ConfigDict({"quick": True, "sft": {"steps": 2000, "batch_size": 32}, "rl": {"steps": 80},
                                      "quick_preset": preset})
  resolved = common.resolve(config, {"sft.steps": 50, "quick": True})
  assert resolved.sft.steps == 50 and resolved.sft.batch_size == preset.sft.batch_size
  assert resolved.rl.steps == preset.rl.steps
  assert resolved.coldstart.num_slots == preset.coldstart.num_slots
  assert common.resolve(resolved) is resolved  # stages may resolve again: nothing changes
  assert common.resolve(ml_collections.ConfigDict({"quick": False, "sft": {"steps": 9}})).sft.steps == 9
  with pytest.raises(ValueError, match="no quick_preset"):
    common.resolve(ml_collections.ConfigDict({"quick": True, "sft": {"steps": 9}}))


@pytest.mark.parametrize("tool", ["export_hf.py", "import_hf.py", "prepare_data.py", "memory_plan.py",
                                  "bench/attention.py", "bench/data.py", "bench/sampler.py", "bench/train_step.py"])
def test_tool_help_shows_defaults_without_loading_jax(tool):
  """`--help` answers before the package's heavy modules (JAX) load."""
  probe = ("import contextlib, io, runpy, sys\n"
           f"sys.argv = [{tool!r}, '--help']\n"
           "out = io.StringIO()\n"
           "with contextlib.redirect_stdout(out):\n"
           "  try:\n"
           f"    runpy.run_path({os.path.join(ROOT, 'tools', tool)!r}, run_name='__main__')\n"
           "  except SystemExit:\n"
           "    pass\n"
           "print('JAX LOADED' if 'jax' in sys.modules else 'NO JAX')\n"
           "print(out.getvalue())\n")
  proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("NO JAX") and "usage:" in proc.stdout
  if tool in ("export_hf.py", "import_hf.py"):
    assert "(default: fp32)" in proc.stdout
  if tool == "memory_plan.py":
    assert "(default: 0.9)" in proc.stdout
  if tool == "bench/train_step.py":
    assert "(default: 1,-1,1)" in proc.stdout and "MFU =" in proc.stdout  # defaults and the whole docstring


def test_a_rerun_is_compared_on_the_settings_its_record_holds():
  """config.json of an earlier run lacks the keys added since: they are not compared (their defaults are
  the old behaviour); a recorded key that changed, or a section that vanished, is."""
  recorded = {"model": {"hidden_size": 128, "vision": {"depth": 2}}, "tokenizer": {"vocab_size": 1024},
              "view_pixels": 12544, "seed": 0}
  upgraded = {"model": {"hidden_size": 128, "vision": {"depth": 2, "grid": 8}, "family": "qwen2_5_vl"},
              "tokenizer": {"vocab_size": 1024}, "view_pixels": 12544, "seed": 1}
  assert main_lib.changed_settings(recorded, upgraded) == []
  assert main_lib.changed_settings(recorded, {**upgraded, "model": {"hidden_size": 64}}) == ["model"]
  assert main_lib.changed_settings(recorded, {**upgraded, "tokenizer": None, "view_pixels": 1}) == [
      "tokenizer", "view_pixels"]
