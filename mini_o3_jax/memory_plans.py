"""A run config's per-device memory on TPU slices: its phases (SFT / RL / evaluation), the meshes and
micro-batches that fit, and the tables `tools/memory_plan.py` prints. The estimates are `train.memory`'s.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import tempfile
from typing import Sequence

from mini_o3_jax.model import config as config_lib
from mini_o3_jax.pipeline import common
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax import run_config
from mini_o3_jax.sampler.rollout import RolloutConfig
from mini_o3_jax.train import memory
from mini_o3_jax.train import optimizer as optimizer_lib

PRESETS = {**run_config.PRESETS, **run_config.TINY_PRESETS}  # tiny presets at their default vocabulary


def load_config(path: str, overrides: Sequence[str] = ()):
  """A config file's `get_config()`, with `key.sub=value` overrides (values as Python literals)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # the checkout around configs/
  if repo not in sys.path:  # configs import each other as `configs.<name>`, as under `python -m mini_o3_jax.main`
    sys.path.insert(0, repo)
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.strip().split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def model_config(config) -> config_lib.VLMConfig:
  """The run's model config, without building its tokenizer where the ids are known."""
  kind = config.tokenizer.get("kind", "small")
  if config.model.get("preset") or config.model.get("init_from"):
    vocab = (tok_lib.QWEN_NUM_BPE_TOKENS + len(tok_lib.QWEN_ADDED_TOKENS) if kind == "qwen"
             else config.tokenizer.vocab_size)
    return run_config.model_config_for_vocabulary(config, vocab, run_config.special_ids(kind))
  with tempfile.TemporaryDirectory() as tmp:  # the demo's sizes depend on its trained tokenizer
    return run_config.model_config(config, common.build_tokenizer(common.resolve(config), tmp))


def power_of_two(n: int, minimum: int = 16) -> int:
  b = minimum
  while b < n:
    b *= 2
  return b


def _image_patches(rollout: RolloutConfig, patch_pixels: int) -> int:
  """Padded patches of one image in the sampler: the per-image bucket holding an image at max_pixels."""
  need = rollout.max_pixels // patch_pixels
  fitting = [b for b in sorted(rollout.patch_buckets or ()) if b >= need]
  return fitting[0] if fitting else power_of_two(need)


def phases(config, mcfg: config_lib.VLMConfig, patch_pixels: int = 14 * 14) -> list[memory.Phase]:
  """The SFT / RL / evaluation phases of a config's stages (patch_pixels: the model's patch area)."""
  stages = [s.strip() for entry in config.stages for s in str(entry).split(",")]
  out = []
  if "sft" in stages:
    sft = run_config.sft_stage(config, mcfg)
    out.append(memory.Phase(
        "sft", batch=sft.batch.batch_size, grad_accum=sft.step.grad_accum_steps,
        seq_len=max(sft.batch.length_buckets), patches_per_row=max(sft.batch.patch_buckets),
        logits_chunk=sft.step.logits_chunk, train_vision=sft.step.train_vision, optimizer=sft.optimizer))
  if "rl" in stages or "rl_no_mask" in stages:
    rl = run_config.rl_stage(config, mcfg)
    out.append(memory.Phase(
        "rl", batch=rl.batch.batch_size, grad_accum=rl.step.grad_accum_steps, seq_len=max(rl.batch.length_buckets),
        patches_per_row=max(rl.batch.patch_buckets), logits_chunk=rl.step.logits_chunk,
        train_vision=rl.step.train_vision, optimizer=rl.optimizer,
        rollout_slots=rl.rollout.num_slots, rollout_context=rl.rollout.max_context,
        rollout_chunk=max(rl.rollout.chunk_buckets), rollout_patches=_image_patches(rl.rollout, patch_pixels)))
  if "eval" in stages:
    c = config.eval
    rollout = run_config.rollout_config(config, c)
    out.append(memory.Phase(
        "eval", train=False, rollout_slots=c.num_slots, rollout_context=c.max_context,
        rollout_chunk=max(rollout.chunk_buckets), rollout_patches=_image_patches(rollout, patch_pixels)))
  return out


def why(p: memory.Plan, budget: memory.Budget) -> str:
  """The items that decide the verdict, largest first."""
  big = sorted(((v, k) for k, v in p.items.items() if v), reverse=True)[:3]
  parts = ", ".join(f"{k} {memory.gib(v)}" for v, k in big)
  return f"peak {memory.gib(p.peak)} GiB vs {memory.gib(budget.usable)} usable: {parts}"


def plans_for(mcfg, phase: memory.Phase, tpus: Sequence[str], mesh: memory.MeshShape | None, headroom: float):
  """[(label, plan, budget, rows per device or None, note)] for each TPU shape."""
  out = []
  for tpu in tpus:
    chip, devices = memory.tpu_slice(tpu)
    budget = memory.Budget(chip, headroom)
    label = f"{tpu} ({devices}x{chip.hbm_gib:g} GiB)"
    if mesh is not None:
      if mesh.size != devices:
        raise SystemExit(f"--mesh {mesh} has {mesh.size} devices, {tpu} has {devices}")
      p = memory.plan(mcfg, phase, mesh)
      rows = -(-phase.micro_batch // mesh.batch_ways) if phase.train else None
      out.append((label, p, budget, rows, "" if budget.verdict(p) == "fits" else why(p, budget)))
      continue
    found = memory.recommend(mcfg, phase, devices, budget)
    if found is not None:
      p, rows = found
      out.append((label, p, budget, rows if phase.train else None, ""))
      continue
    # Nothing fits: show the leanest candidate (most model parallelism, one row per device).
    best = None
    for m in memory.candidate_meshes(devices, mcfg):
      micro = m.batch_ways
      trial = dataclasses.replace(phase, grad_accum=max(1, phase.batch // micro)) if phase.train else phase
      p = memory.plan(mcfg, trial, m)
      if best is None or p.peak < best.peak:
        best = p
    out.append((label, best, budget, 1 if phase.train else None, why(best, budget)))
  return out


def render(name: str, mcfg, phase: memory.Phase, rows, *, markdown: bool) -> str:
  n = memory.param_count(mcfg)
  title = f"{name}: {phase.name}"
  head = f"{n / 1e9:.2f}B params ({mcfg.param_dtype} params, {mcfg.dtype} compute, remat {mcfg.remat})"
  if phase.train:
    head += (f", batch {phase.batch} rows of {phase.seq_len} tokens and {phase.patches_per_row} patches, "
             f"logits_chunk {phase.logits_chunk}")
  if phase.rollout_slots:
    head += (f", sampler {phase.rollout_slots} slots x {phase.cache_len} cache, {phase.rollout_patches} patches "
             "per image")
  table = memory.table([(label, p, b) for label, p, b, _, _ in rows], markdown=markdown)
  lines = [f"### {title}\n\n{head}." if markdown else f"{title}: {head}", "", table, ""]
  for label, p, budget, per_device, note in rows:
    verdict = budget.verdict(p)
    micro = f", micro-batch {per_device} row(s)/device" if per_device else ""
    lines.append(f"{'- ' if markdown else '  '}{label}: mesh {p.mesh}{micro}: {verdict}" + (f" ({note})" if note else ""))
  return "\n".join(lines) + "\n"


def preset_phase(mcfg: config_lib.VLMConfig, phase: str, *, batch: int, grad_accum: int, seq_len: int, patches: int,
                 logits_chunk: int | None, slots: int, context: int) -> memory.Phase:
  """A phase for a bare model preset (no config): `slots` sampler slots (0: none) at `context` tokens."""
  train = phase != "eval"
  return memory.Phase(phase, train=train, batch=batch, grad_accum=grad_accum, seq_len=seq_len,
                      patches_per_row=patches, logits_chunk=logits_chunk or None,
                      optimizer=optimizer_lib.OptimizerConfig() if train else None,
                      rollout_slots=slots, rollout_context=context if slots else 0, rollout_chunk=512,
                      rollout_patches=power_of_two(2_000_000 // mcfg.vision.patch_size**2) if slots else 0)
