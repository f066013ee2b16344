"""The `coldstart` stage: collect cold-start SFT trajectories with a model, as the paper does.

A model (a stage checkpoint of the work directory, by default the SFT one, or an HF directory) is
prompted with a few exemplar trajectories before each question, samples K trajectories per question,
and the correct ones are kept (`data.coldstart_gen`). Output: <workdir>/coldstart/ (trajectories.jsonl
and images/ readable by SFT, progress.jsonl, summary.json). Re-running resumes.

Configured by the optional `coldstart` config section (`default_config()`; a config without one runs
on the defaults, which suit the demo work directory after `sft`):

  model             "stage:<name>" (the latest checkpoint in <workdir>/ckpt/<name>, with the workdir's
                    tokenizer) or "hf:<dir>" (`model.hf.load_pretrained` and the directory's tokenizer)
  source            "synthetic" (tiers, split, n_per_tier, start) or "benchmark" (benchmark,
                    benchmark_split, data_dir, limit: 0 = all) via `data.load_benchmark`
  exemplars         a JSONL of exemplar trajectories; "" writes num_exemplars scripted ones of
                    exemplar_tier to <out_dir>/exemplars.jsonl first; num_exemplars 0 = zero-shot
  samples_per_question / max_kept_per_question / drop_tool_errors / min_crops   K, M and the filter
  temperature, max_turns, max_context, max_turn_tokens, num_slots, questions_per_batch   the sampler
  min_pixels / max_pixels   image budget (0 = the config's view_pixels, else the processor default)
  out_dir           "" = <workdir>/coldstart
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections
from flax import nnx

from mini_o3_jax.agent import RuleJudge
from mini_o3_jax.data import coldstart, coldstart_gen, load_benchmark
from mini_o3_jax.model.hf import load_pretrained
from mini_o3_jax.pipeline import common, train_stages
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax import run_config
from mini_o3_jax.sampler.rollout import Sampler
from mini_o3_jax.train import state as state_lib

log = logging.getLogger(__name__)

# Scene indices past the SFT (0..) and RL (1,000,000..) ones, so collected questions are new scenes.
QUESTION_START = 2_000_000
EXEMPLAR_START = 3_000_000

DEFAULTS: dict[str, Any] = dict(
    model="stage:sft",
    source="synthetic", tiers=("medium", "hard"), split="train", n_per_tier=50, start=QUESTION_START,
    benchmark="visualprobe", benchmark_split="train", data_dir="", limit=0,
    exemplars="", num_exemplars=2, exemplar_tier="medium",
    samples_per_question=4, max_kept_per_question=2, drop_tool_errors=True, min_crops=1,
    temperature=1.0, max_turns=6, max_context=2048, max_turn_tokens=96, num_slots=16, questions_per_batch=4,
    min_pixels=0, max_pixels=0, seed=0, out_dir="",
    # The prompt chunk carries the exemplars' images too, so its patch count varies: no patch buckets.
    chunk_buckets=(32, 64, 128, 256), decode_steps=8, patch_buckets_per_image=(),
)


def default_config() -> ml_collections.ConfigDict:
  """The section to put under `config.coldstart` (so `--config.coldstart.<key>=...` works)."""
  return ml_collections.ConfigDict(DEFAULTS)


def section(config) -> ml_collections.ConfigDict:
  """The effective settings: defaults, then `config.coldstart` (where `common.resolve` puts the quick preset)."""
  given = config.get("coldstart")
  given = {} if given is None else (given.to_dict() if hasattr(given, "to_dict") else dict(given))
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown coldstart setting(s) {unknown}; known: {sorted(DEFAULTS)}")
  merged = {**DEFAULTS, **given}
  if merged["source"] not in ("synthetic", "benchmark"):
    raise ValueError(f"coldstart.source must be 'synthetic' or 'benchmark', got {merged['source']!r}")
  if merged["source"] == "benchmark" and not merged["data_dir"]:
    raise ValueError("coldstart.source='benchmark' needs coldstart.data_dir (the local download)")
  if merged["num_exemplars"] < 0:
    raise ValueError(f"coldstart.num_exemplars must be >= 0, got {merged['num_exemplars']}")
  parse_model(merged["model"])
  return ml_collections.ConfigDict(merged)


def parse_model(spec: str) -> tuple[str, str]:
  """"stage:sft" -> ("stage", "sft"); "hf:/dir" -> ("hf", "/dir")."""
  kind, sep, value = str(spec).partition(":")
  if not sep or kind not in ("stage", "hf") or not value:
    raise ValueError(f"coldstart.model must be 'stage:<name>' or 'hf:<dir>', got {spec!r}")
  return kind, value


def load_model(config, workdir: str, spec: str):
  """(model, tokenizer) for a model spec (see `parse_model`)."""
  kind, value = parse_model(spec)
  if kind == "hf":
    if not os.path.isfile(os.path.join(value, "config.json")):
      raise FileNotFoundError(f"coldstart.model {spec!r}: no config.json in {value}")
    model, _ = load_pretrained(value)
    return model, tok_lib.load_tokenizer(value)
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  params = train_stages.restore_params(workdir, value, mcfg, mesh)
  graphdef, _ = state_lib.abstract_model(mcfg)
  return nnx.merge(graphdef, params), tokenizer


def questions(config, c) -> list[coldstart_gen.Question]:
  if c.source == "synthetic":
    return coldstart_gen.synthetic_questions(tuple(c.tiers), c.split, c.n_per_tier, run_config.task_config(config),
                                             start=c.start)
  ds = load_benchmark(c.benchmark, c.benchmark_split, c.data_dir, skip_bad=True)
  qs = coldstart_gen.benchmark_questions(ds)
  return qs[:c.limit] if c.limit else qs


def exemplars(config, c, out_dir: str) -> list:
  """The few-shot exemplars: c.exemplars, or scripted ones written once to <out_dir>/exemplars.jsonl."""
  if c.num_exemplars == 0:
    return []
  path = c.exemplars
  if not path:
    path = os.path.join(out_dir, "exemplars.jsonl")
    if not os.path.exists(path):
      trajs = list(coldstart.scripted_coldstart(c.exemplar_tier, c.num_exemplars, split="train",
                                                task_config=run_config.task_config(config), start=EXEMPLAR_START))
      coldstart.write_jsonl_with_images(path, os.path.join(out_dir, "exemplar_images"), trajs)
  return coldstart_gen.load_exemplars(path, limit=c.num_exemplars)


def run_coldstart(config, workdir: str) -> dict:
  c = section(config)
  out_dir = c.out_dir or os.path.join(workdir, "coldstart")
  os.makedirs(out_dir, exist_ok=True)
  qs = questions(config, c)
  shots = exemplars(config, c, out_dir)
  model, tokenizer = load_model(config, workdir, c.model)
  sampler = Sampler(model, tokenizer, run_config.rollout_config(config, c))
  collect_cfg = coldstart_gen.CollectConfig(
      samples_per_question=c.samples_per_question, max_kept_per_question=c.max_kept_per_question,
      drop_tool_errors=c.drop_tool_errors, min_crops=c.min_crops, questions_per_batch=c.questions_per_batch,
      seed=c.seed)
  source = (f"synthetic {list(c.tiers)} {c.split} [{c.start}, {c.start + c.n_per_tier})" if c.source == "synthetic"
            else f"{c.benchmark}/{c.benchmark_split}" + (f"[:{c.limit}]" if c.limit else ""))
  summary = coldstart_gen.collect(sampler, qs, out_dir, judge=RuleJudge(), config=collect_cfg, exemplars=shots,
                                  settings={"model": c.model}, info={"source": source})
  print(coldstart_gen.format_summary(summary), flush=True)
  return {k: summary[k] for k in ("questions", "samples", "kept", "accuracy", "pass_at_k", "mean_turns_kept")}
