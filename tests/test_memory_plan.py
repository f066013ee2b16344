"""The memory plan: exact state sizes (against eval_shape and a real sharded TrainState), scaling of the
estimates with the mesh, the TPU table, and the CLI on the committed configs."""

import dataclasses
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from mini_o3_jax.model import Qwen25VL, config as config_lib
from mini_o3_jax import memory_plans, sharding
from mini_o3_jax.train import attention_memory, memory
from mini_o3_jax.train import optimizer as optimizer_lib
from mini_o3_jax.train import state as state_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import memory_plan  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import train_worker as W  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT = optimizer_lib.OptimizerConfig(lr=1e-3, weight_decay=0.01)
M = memory.MeshShape


@pytest.fixture(scope="module")
def cfg7b():
  return config_lib.qwen25vl_7b(dtype="bfloat16", remat="full")


def _eval_shape_count(cfg) -> int:
  model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", ["tiny", "qwen25vl_3b", "qwen25vl_7b"])
def test_param_count_equals_eval_shape(name):
  cfg = getattr(config_lib, name)()
  assert memory.param_count(cfg) == _eval_shape_count(cfg)
  if name == "qwen25vl_7b":
    assert memory.param_count(cfg) == 8_292_166_656


def test_state_bytes_scale_with_fsdp_and_tensor(cfg7b):
  full = memory.state_bytes(cfg7b, M(1, 1, 1), OPT)
  n = memory.param_count(cfg7b)
  assert full["params"] == 4 * n and full["grads"] == 4 * n  # fp32 master weights
  assert full["opt_state"] == pytest.approx(8 * n, abs=64)  # AdamW mu and nu in fp32 (+ step counters)
  for mesh in (M(1, 8, 1), M(1, 4, 2), M(1, 2, 4), M(1, 16, 2)):
    got = memory.state_bytes(cfg7b, mesh, OPT)
    # Everything large divides over fsdp x tensor; a few small vectors stay replicated.
    assert full["params"] / mesh.size <= got["params"] <= 1.01 * full["params"] / mesh.size, mesh
    assert got["opt_state"] == pytest.approx(2 * got["params"], abs=16)
  # A data axis replicates the state.
  assert memory.state_bytes(cfg7b, M(2, 4, 1), OPT) == memory.state_bytes(cfg7b, M(1, 4, 1), OPT)
  # bf16 parameters halve the params and (optax keeps moments in the params' dtype) the moments.
  half = memory.state_bytes(cfg7b.replace(param_dtype="bfloat16"), M(1, 8, 1), OPT)
  assert half["params"] * 2 == memory.state_bytes(cfg7b, M(1, 8, 1), OPT)["params"]


def test_estimates_scale_with_the_mesh_and_the_workload(cfg7b):
  cfg7b = cfg7b.replace(attention="dense")  # the quadratic reference; memory-efficient ones below
  phase = memory.Phase("rl", batch=64, grad_accum=8, seq_len=8192, patches_per_row=4096, logits_chunk=None,
                       optimizer=OPT, rollout_slots=64, rollout_context=16384, rollout_chunk=512,
                       rollout_patches=2560)
  base = memory.plan(cfg7b, phase, M(1, 8, 1)).items
  tensor = memory.plan(cfg7b, phase, M(1, 2, 4)).items
  # 8 rows per micro-batch: 1 per device on 8 batch ways, 4 per device on 2.
  assert tensor["attn_scores"] == base["attn_scores"]  # 4x the rows, heads / 4
  assert tensor["logits"] == base["logits"]            # 4x the rows, vocab / 4
  assert tensor["kv_cache"] == base["kv_cache"]        # 4x the slots, kv heads / 4
  assert tensor["text_saved"] == 4 * base["text_saved"]  # the residual stream is not split over tensor
  longer = memory.plan(cfg7b, dataclasses.replace(phase, seq_len=16384), M(1, 8, 1)).items
  # Causal query blocks of 128 keep (n + 1) / 2n of the [T, T] scores: 65/128 at 8k, 129/256 at 16k.
  assert attention_memory.causal_keys(8192) == 8192 * 65 / 128 and attention_memory.causal_keys(100) == 100
  assert longer["attn_scores"] == pytest.approx(4 * base["attn_scores"] * (129 / 256) / (65 / 128))
  chunked = memory.plan(cfg7b, dataclasses.replace(phase, logits_chunk=1024), M(1, 8, 1)).items
  assert chunked["logits"] * 8 == base["logits"]
  saved = {r: memory.plan(cfg7b.replace(remat=r), phase, M(1, 8, 1)).items["text_saved"]
           for r in ("none", "dots", "full")}
  assert saved["none"] > saved["dots"] > saved["full"]
  # KV cache: 2 (k, v) x 28 layers x 4 kv heads x 128 x bf16 per token, slots over the batch ways.
  assert base["kv_cache"] == 2 * 28 * 8 * 4 * 128 * 2 * phase.cache_len


def test_memory_efficient_attention_plans_linear_scores(cfg7b):
  phase = memory.Phase("sft", batch=8, grad_accum=1, seq_len=4096, patches_per_row=4096, logits_chunk=1024,
                       optimizer=OPT)
  mesh = M(1, 8, 1)

  def items(attention, seq_len, patches):
    config = cfg7b.replace(attention=attention)
    return memory.plan(config, dataclasses.replace(phase, seq_len=seq_len, patches_per_row=patches), mesh).items

  # On a TPU slice `auto` at these lengths is splash: no scores in HBM, text or vision.
  assert items("auto", 4096, 4096)["attn_scores"] == 0
  assert memory.score_keys(cfg7b, 16384, causal=True) == 0 and memory.score_keys(cfg7b, 1024, causal=True) > 0
  # Blockwise: one [512, 512] tile per layer, so 4x the length leaves the scores' bytes unchanged ...
  blockwise = [items("blockwise", n, 4096)["attn_scores"] for n in (4096, 16384)]
  assert blockwise[0] == blockwise[1] > 0
  # ... where dense grows ~4x per token (16x in all); the vision tower's full blocks likewise.
  dense = [items("dense", n, 4096)["attn_scores"] for n in (4096, 16384)]
  assert dense[1] > 15 * dense[0]
  vision = {a: [items(a, 4096, p)["vision"] for p in (4096, 16384)] for a in ("dense", "blockwise")}
  assert vision["blockwise"][1] <= 4.5 * vision["blockwise"][0] and vision["dense"][1] > 8 * vision["dense"][0]
  # The sampler's appended chunk reads the cache in tiles of `attention_block` slots.
  assert memory.cache_score_keys(cfg7b, 512, 32768) == 512 and memory.cache_score_keys(cfg7b, 1, 1024) == 1024


def test_tpu_slices():
  assert memory.tpu_slice("v4-8") == (memory.CHIPS["v4"], 4)
  assert memory.tpu_slice("v5litepod-16") == (memory.CHIPS["v5e"], 16)
  assert memory.tpu_slice("v5p-64") == (memory.CHIPS["v5p"], 32)
  assert [memory.CHIPS[c].hbm_gib for c in ("v4", "v5e", "v5p")] == [32, 16, 95]
  with pytest.raises(ValueError):
    memory.tpu_slice("v3-8")


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_tiny_plan_matches_a_real_sharded_train_state(shape):
  cfg = config_lib.tiny(vocab_size=512)
  mesh = sharding.make_mesh(shape)
  state, _, _ = state_lib.create_train_state(cfg, lambda p: state_lib.make_tx(OPT, p), mesh,
                                             params=W.host_params(cfg))  # host params: no RNG-init compile
  planned = memory.state_bytes(cfg, M(*shape), OPT)
  assert planned["params"] == memory.actual_state_bytes(state.params)
  assert planned["opt_state"] == memory.actual_state_bytes(state.opt_state)
  assert planned["params"] < memory.state_bytes(cfg, M(1, 1, 1), OPT)["params"]


def test_cli_preset_table(capsys):
  assert memory_plan.main(["--preset", "tiny", "--tpu", "v5e-8", "--seq_len", "256", "--patches", "64",
                           "--markdown"]) == 0
  out = capsys.readouterr().out
  assert "| shape | mesh (d,f,t) | params |" in out and "v5e-8 (8x16 GiB)" in out and "fits" in out


def test_committed_configs_fit_their_target_slice():
  """The 7B configs at their own mesh on v5p-32 (docs/scaling.md's target) fit, per the plan."""
  for name in ("sft", "rl", "eval"):
    config = memory_plans.load_config(os.path.join(ROOT, "configs", f"qwen25vl_7b_{name}.py"))
    mcfg = memory_plans.model_config(config)
    (phase,) = memory_plans.phases(config, mcfg)
    mesh = list(config.mesh)
    mesh[mesh.index(-1)] = 16 // int(np.prod([m for m in mesh if m != -1]))
    plan = memory.plan(mcfg, phase, M(*mesh))
    assert memory.Budget(memory.CHIPS["v5p"]).verdict(plan) == "fits", (name, plan.items)
