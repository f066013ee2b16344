"""The measurements behind tools/bench/sampler.py (its docstring says what they are); loaded after the flags parse."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from mini_o3_jax.agent import prompts
from mini_o3_jax.agent.task import Task
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model.hf import load_pretrained, save_pretrained
from mini_o3_jax.model import vlm
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.sampler import engine as engine_lib
from mini_o3_jax.sampler import programs as programs_lib
from mini_o3_jax.sampler.rollout import RolloutConfig, Sampler, vision_token_ids
from mini_o3_jax.sampler import SamplingParams, generate

GRID = np.array([1, 8, 8])   # 64 patches -> 16 image tokens per image
IMAGE_TOKENS = 16


def build(tmp: str, family: str = "qwen2_5_vl", threads: int = 1):
  """(tokenizer, our model, transformers model) with identical random weights."""
  corpus = [prompts.question_prompt("What colour is the cup?"), prompts.observation_turn(0, 1),
            prompts.error_turn("bad box"), '<grounding>{"bbox_2d": [0.1, 0.2, 0.5, 0.6], "source": '
            '"original_image"}</grounding>', "<answer>red</answer>"] * 4
  tok = tok_lib.build_small_tokenizer(corpus, vocab_size=512)
  ids = tok_lib.special_token_ids(tok)
  preset = config_lib.tiny_qwen3 if family == "qwen3_vl" else config_lib.tiny
  cfg = preset(vocab_size=512, image_token_id=ids["image_token_id"],
               vision_start_token_id=ids["vision_start_token_id"],
               vision_end_token_id=ids["vision_end_token_id"], video_token_id=ids["video_token_id"])
  model = vlm.random_model(cfg, seed=0)
  save_pretrained(model, cfg, tmp)
  ours, _ = load_pretrained(tmp)
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForImageTextToText  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  hf = AutoModelForImageTextToText.from_pretrained(tmp).eval()
  return tok, ours, hf


def prompts_batch(cfg, batch: int, text_len: int, rng):
  """Left-aligned equal-length prompts: text, one image, text. -> ids [B, T], pixel_values, grids."""
  rows = []
  for _ in range(batch):
    rows.append(list(rng.integers(40, 500, text_len // 2)) + [cfg.vision_start_token_id] +
                [cfg.image_token_id] * IMAGE_TOKENS + [cfg.vision_end_token_id] +
                list(rng.integers(40, 500, text_len - text_len // 2)))
  ids = np.asarray(rows, np.int64)
  pv = rng.normal(size=(batch * int(np.prod(GRID)), cfg.vision.patch_dim)).astype(np.float32)
  return ids, pv, np.tile(GRID, (batch, 1))


def best_of(fn, repeats: int = 3) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


# ----------------------------------------------------------------------------- 1. single turn


def bench_single_turn(ours, hf, batch: int, new_tokens: int, text_len: int, repeats: int = 5) -> dict:
  """Prefill = the prompt forward (with the vision tower); decode = the rest of a greedy generate.

  Both systems are timed alternately, `repeats` times, keeping each one's best: the machine is
  shared, and the best of several runs is the least disturbed one.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from mini_o3_jax.sampler import single_turn  # pylint: disable=g-import-not-at-top
  cfg = ours.config
  ids, pv, grids = prompts_batch(cfg, batch, text_len, np.random.default_rng(1))
  mask = np.ones_like(ids)
  prompt_tokens = batch * ids.shape[1]
  t_ids = torch.tensor(ids)
  hf_in = dict(input_ids=t_ids, attention_mask=torch.tensor(mask),
               mm_token_type_ids=(t_ids == cfg.image_token_id).int(), pixel_values=torch.tensor(pv),
               image_grid_thw=torch.tensor(grids))

  def hf_prefill():
    with torch.no_grad():
      hf(**hf_in, use_cache=True)

  def hf_generate():
    with torch.no_grad():
      return hf.generate(**hf_in, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

  # Ours: the public API end to end, and the engine it builds, split into prefill and decode.
  def ours_generate():
    return generate(ours, ids, mask, pv, grids, max_new_tokens=new_tokens)

  rows = single_turn.split_rows(cfg, ids, mask, pv, grids)
  chunk = -(-ids.shape[1] // 16) * 16
  max_context = -(-(ids.shape[1] + new_tokens) // 64) * 64
  ecfg = engine_lib.EngineConfig(num_slots=batch, max_context=max_context, chunk_buckets=(chunk,), decode_steps=32,
                                 window_min=64, sampling=SamplingParams(),
                                 cache_len=-(-max(max_context + 1, chunk) // 64) * 64)
  eng = engine_lib.Engine(ours, ecfg)
  chunks = {}
  for r, (real, rpv, rgrids) in enumerate(rows):
    pos, next_pos = engine_lib.chunk_positions(real, rgrids, 0, image_token_id=cfg.image_token_id, merge=2)
    chunks[r] = engine_lib.Chunk(ids=real, positions=pos, next_pos=next_pos, turn_limit=new_tokens,
                                 pixel_values=rpv, grids=rgrids, reset=True, key=np.zeros(2, np.uint32))

  def ours_prefill():
    eng.append(chunks)
    jax.block_until_ready(eng.state.cache.k)

  def ours_decode():
    while eng.active().any():
      eng.decode()

  t = time.perf_counter()
  out = ours_generate()
  first_call = time.perf_counter() - t
  hf_tokens = hf_generate()[:, ids.shape[1]:].numpy()
  ours_prefill()
  ours_decode()
  best = {k: float("inf") for k in ("hf_prefill", "hf_total", "ours_prefill", "ours_decode", "ours_total")}
  for _ in range(repeats):
    for name, fn in (("hf_prefill", hf_prefill), ("hf_total", hf_generate), ("ours_prefill", ours_prefill),
                     ("ours_decode", ours_decode), ("ours_total", ours_generate)):
      t = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - t)
  decoded = batch * (new_tokens - 1)
  return {
      "batch": batch, "prompt_len": int(ids.shape[1]), "new_tokens": new_tokens,
      "hf_prefill_tok_s": prompt_tokens / best["hf_prefill"],
      "hf_decode_tok_s": decoded / max(best["hf_total"] - best["hf_prefill"], 1e-9),
      "hf_total_tok_s": batch * new_tokens / best["hf_total"],
      "ours_prefill_tok_s": prompt_tokens / best["ours_prefill"],
      "ours_decode_tok_s": decoded / best["ours_decode"],
      "ours_total_tok_s": batch * new_tokens / best["ours_total"],
      "ours_first_call_s": first_call,
      "greedy_tokens_equal_hf": float(np.mean(out.tokens == hf_tokens)),
  }


# ----------------------------------------------------------------------------- 2. multi-turn


def bench_multi_turn(ours, turns: int, batch: int, turn_tokens: int, obs_text: int, text_len: int,
                     repeats: int = 3) -> dict:
  """Turn k = append observation k (text + one image), then decode `turn_tokens` tokens, on all slots.

  prefix reuse: the observation is appended to each slot's cache at its offset (what rollouts do), with
  attention over the whole cache (window_min=0) and over power-of-two windows (window_min=64).
  recompute: the whole conversation so far (every image re-encoded) is prefilled into cleared slots,
  then the turn is decoded; this is what a sampler without a persistent cache pays.
  """
  cfg = ours.config
  rng = np.random.default_rng(2)
  per_turn = 1 + obs_text + IMAGE_TOKENS + 2
  max_context = text_len + IMAGE_TOKENS + 2 + turns * (turn_tokens + per_turn) + 64
  prompt_ids, pv, _ = prompts_batch(cfg, batch, text_len, rng)
  n_patch = int(np.prod(GRID))
  images = [pv[r * n_patch:(r + 1) * n_patch] for r in range(batch)]

  def observation():
    return (list(rng.integers(40, 500, obs_text // 2)) + [cfg.vision_start_token_id] +
            [cfg.image_token_id] * IMAGE_TOKENS + [cfg.vision_end_token_id] +
            list(rng.integers(40, 500, obs_text - obs_text // 2)))

  obs = [[observation() for _ in range(batch)] for _ in range(turns)]
  obs_pv = [[rng.normal(size=(n_patch, cfg.vision.patch_dim)).astype(np.float32) for _ in range(batch)]
            for _ in range(turns)]

  def engine(window_min):
    return engine_lib.Engine(ours, engine_lib.EngineConfig(
        num_slots=batch, max_context=max_context, chunk_buckets=(64, 128, 256, 512), patch_buckets=None,
        decode_steps=32, window_min=window_min, sampling=SamplingParams()),
        # As the rollout sampler: a random model must not emit image placeholders into the conversation.
        suppressed_token_ids=vision_token_ids(cfg))

  def finish_turn(eng, last, pos):
    while eng.active().any():
      o = eng.decode()
      for r in range(batch):
        last[r] += o.tokens[r, :o.count[r]].tolist()
        pos[r] += int(o.count[r])

  def reuse(eng):
    """Per-turn seconds, and the conversation (per row: token segments) for the recompute runs."""
    hist = [[list(prompt_ids[r])] for r in range(batch)]
    pos, chunks = [0] * batch, {}
    for r in range(batch):
      ids = np.asarray(hist[r][0], np.int32)
      p, pos[r] = engine_lib.chunk_positions(ids, GRID[None], 0, image_token_id=cfg.image_token_id, merge=2)
      chunks[r] = engine_lib.Chunk(ids=ids, positions=p, next_pos=pos[r], turn_limit=turn_tokens,
                                   pixel_values=images[r], grids=GRID[None], reset=True, key=np.zeros(2, np.uint32))
    out, _ = eng.append(chunks)
    last = [[int(out.tokens[r, 0])] for r in range(batch)]
    finish_turn(eng, last, pos)
    times = []
    for k in range(turns):
      t = time.perf_counter()
      chunks = {}
      for r in range(batch):
        hist[r].append(last[r])
        ids = np.asarray([last[r][-1]] + obs[k][r], np.int32)   # [pending token] + observation
        p, nxt = engine_lib.chunk_positions(ids, GRID[None], pos[r], image_token_id=cfg.image_token_id, merge=2)
        chunks[r] = engine_lib.Chunk(ids=ids, positions=p, next_pos=nxt, turn_limit=turn_tokens,
                                     pixel_values=obs_pv[k][r], grids=GRID[None])
        hist[r].append(obs[k][r])
        pos[r] = nxt
      out, _ = eng.append(chunks)
      last = [[int(out.tokens[r, 0])] for r in range(batch)]
      finish_turn(eng, last, pos)
      times.append(time.perf_counter() - t)
    return times, hist

  def recompute(eng, hist, k) -> float:
    """Turn k from scratch: prefill prompt + k turns + k observations (k + 1 images), decode a turn."""
    t = time.perf_counter()
    chunks = {}
    for r in range(batch):
      ids = np.asarray([t_ for seg in hist[r][:1 + 2 * k] for t_ in seg], np.int32)
      g = np.tile(GRID, (k + 1, 1))
      p, nxt = engine_lib.chunk_positions(ids, g, 0, image_token_id=cfg.image_token_id, merge=2)
      chunks[r] = engine_lib.Chunk(ids=ids, positions=p, next_pos=nxt, turn_limit=turn_tokens,
                                   pixel_values=np.concatenate([images[r]] + [obs_pv[j][r] for j in range(k)]),
                                   grids=g, reset=True, key=np.zeros(2, np.uint32))
    eng.append(chunks)
    finish_turn(eng, [[] for _ in range(batch)], [0] * batch)
    return time.perf_counter() - t

  result = {"batch": batch, "turn_tokens": turn_tokens, "observation_tokens": per_turn, "max_context": max_context}
  for name, window_min in (("reuse", 0), ("reuse_windowed", 64)):
    eng = engine(window_min)
    reuse(eng)                       # compiles every shape this pattern needs
    runs = []
    for _ in range(repeats):         # per turn, the least disturbed of several runs (shared machine)
      times, hist = reuse(eng)
      runs.append(times)
    result[name] = [min(ts) for ts in zip(*runs)]
    result[name + "_programs"] = eng.num_programs
    print(name, [round(x, 3) for x in result[name]], flush=True)
  eng = engine(64)
  ks = [k for k in (1, 2, 4, 8, 12, 16) if k <= turns]
  result["recompute_k"] = ks
  result["recompute"] = []
  for k in ks:
    recompute(eng, hist, k)          # compile
    result["recompute"].append(min(recompute(eng, hist, k) for _ in range(repeats)))
    print("recompute", k, round(result["recompute"][-1], 3), flush=True)
  result["recompute_programs"] = eng.num_programs
  return result


# ----------------------------------------------------------------------------- 3. compiles of a long rollout


def bench_rollout_compiles(ours, tok, max_turns: int, num_tasks: int, num_slots: int, timed_rerun: bool = True,
                           **overrides) -> dict:
  """Programs compiled by a fresh `Sampler` over a batch of long scripted rollouts (config + overrides)."""
  cfg = RolloutConfig(num_slots=num_slots, max_turns=max_turns, max_context=6144, max_turn_tokens=64,
                      max_images=max_turns + 1, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64,
                      sampling=SamplingParams(temperature=1.0), decode_steps=16, max_forced_tokens=64)
  cfg = dataclasses.replace(cfg, **overrides)
  rng = np.random.default_rng(3)
  tasks = [Task(Image.fromarray(rng.integers(0, 255, (rng.integers(200, 500), rng.integers(200, 500), 3), np.uint8)),
                f"question {i}") for i in range(num_tasks)]

  def policy(i, traj):
    k = traj.num_turns
    if k >= (i % 4) * 10 + 1:   # tasks stop after 1, 11, 21, 31 turns (then the 32nd is the answer)
      return "<answer>red</answer>"
    if k % 5 == 4:
      return '<grounding>{"bbox_2d": [0.5, 0.5]}</grounding>'   # a bad call: error turn, no image
    box = sorted(rng.uniform(0, 1, 2)), sorted(rng.uniform(0, 1, 2))
    x0, x1 = box[0][0], max(box[0][1], box[0][0] + 0.2)
    y0, y1 = box[1][0], max(box[1][1], box[1][0] + 0.2)
    last = len(traj.images) - 1   # zoom further into the newest crop, or go back to the original
    src = "original_image" if last == 0 or k % 3 == 0 else f"observation_{last}"
    return ('<grounding>' + json.dumps({"bbox_2d": [round(x0, 2), round(y0, 2), round(min(x1, 1), 2),
                                                    round(min(y1, 1), 2)], "source": src}) + '</grounding>')

  before = programs_lib.jit_cache_sizes()
  smp = Sampler(ours, tok, cfg)
  t = time.perf_counter()
  results = smp.rollout(tasks, policy=policy)
  first_s = time.perf_counter() - t
  after = programs_lib.jit_cache_sizes()
  second_s = None
  if timed_rerun:
    t = time.perf_counter()
    smp.rollout(tasks, policy=policy)
    second_s = time.perf_counter() - t
  turns = [r.num_turns for r in results]
  return {
      "tasks": num_tasks, "slots": num_slots, "max_turns": max_turns, "turns": turns,
      "stop_reasons": sorted({r.stop_reason for r in results}),
      "programs": sorted(smp.engine.programs), "num_programs": smp.engine.num_programs,
      "new_jit_entries": {k: after[k] - before[k] for k in after},
      "tokens": int(sum(len(r.token_ids) for r in results)),
      "first_run_s": first_s, "second_run_s": second_s,
      "overrides": {k: v for k, v in overrides.items()},
  }


# ----------------------------------------------------------------------------- report


def report(single, multi, comps) -> str:
  lines = []
  lines.append(f"Single turn, batch {single['batch']}, prompt {single['prompt_len']} tokens (one image of "
               f"{IMAGE_TOKENS} tokens per row), {single['new_tokens']} new tokens, greedy:")
  lines.append("")
  lines.append("| | prefill tok/s | decode tok/s | end-to-end tok/s |")
  lines.append("|---|---|---|---|")
  lines.append(f"| transformers generate (torch CPU) | {single['hf_prefill_tok_s']:.0f} | "
               f"{single['hf_decode_tok_s']:.0f} | {single['hf_total_tok_s']:.0f} |")
  lines.append(f"| mini_o3_jax sampler | {single['ours_prefill_tok_s']:.0f} | {single['ours_decode_tok_s']:.0f} "
               f"| {single['ours_total_tok_s']:.0f} |")
  lines.append(f"| ratio | {single['ours_prefill_tok_s'] / single['hf_prefill_tok_s']:.1f}x | "
               f"{single['ours_decode_tok_s'] / single['hf_decode_tok_s']:.1f}x | "
               f"{single['ours_total_tok_s'] / single['hf_total_tok_s']:.1f}x |")
  lines.append("")
  lines.append(f"Greedy tokens equal to transformers: {100 * single['greedy_tokens_equal_hf']:.1f}%. First call "
               f"(compiles) {single['ours_first_call_s']:.1f} s.")
  lines.append("")
  ks, c = multi["recompute_k"], multi["recompute"]
  lines.append(f"Multi-turn, batch {multi['batch']}: turn k = append observation k ({multi['observation_tokens']} "
               f"tokens incl. one {IMAGE_TOKENS}-token image) + decode {multi['turn_tokens']} tokens; context up to "
               f"{multi['max_context']} tokens. Milliseconds per turn:")
  lines.append("")
  lines.append("| turn k | " + " | ".join(str(k) for k in ks) + " | turn last / turn 1 |")
  lines.append("|---|" + "---|" * (len(ks) + 1))
  for name, label in (("reuse", "prefix reuse, full-cache attention (window_min=0)"),
                      ("reuse_windowed", "prefix reuse, windowed attention (window_min=64)")):
    r = multi[name]
    lines.append(f"| {label} | " + " | ".join(f"{1000 * r[k - 1]:.0f}" for k in ks) +
                 f" | {r[ks[-1] - 1] / r[0]:.2f} |")
  lines.append("| recompute from scratch (windowed) | " + " | ".join(f"{1000 * x:.0f}" for x in c) +
               f" | {c[-1] / c[0]:.2f} |")
  lines.append("")
  lines.append("Compiled programs (each distinct program + bucketed shape is one compile in a fresh process):")
  lines.append("")
  for comp in comps:
    kinds = collections.Counter(p[0] for p in comp["programs"])
    setting = ", ".join(f"{k}={v}" for k, v in comp["overrides"].items()) or "RolloutConfig defaults"
    timing = f"first run {comp['first_run_s']:.0f} s (with compiles)"
    if comp["second_run_s"] is not None:
      timing += f", second run {comp['second_run_s']:.0f} s"
    counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    lines.append(f"- {comp['max_turns']}-turn rollout batch ({comp['tasks']} tasks on {comp['slots']} slots, scripted "
                 f"crops and error turns, {min(comp['turns'])}..{max(comp['turns'])} turns per task, "
                 f"{comp['tokens']} tokens), {setting}: **{comp['num_programs']} programs** ({counts}); {timing}.")
  return "\n".join(lines)


def run(args) -> int | None:
  with tempfile.TemporaryDirectory() as tmp:
    tok, ours, hf = build(tmp, args.family, args.threads)
  single = bench_single_turn(ours, hf, args.batch, args.new_tokens, args.prompt_text)
  print(json.dumps(single, indent=1), flush=True)
  multi = bench_multi_turn(ours, args.turns, args.multi_batch, args.turn_tokens, obs_text=64,
                           text_len=args.prompt_text)
  print(json.dumps(multi, indent=1), flush=True)
  comps = [bench_rollout_compiles(ours, tok, args.rollout_turns, num_tasks=16, num_slots=8)]
  # The same batch with every shape knob at its coarsest: one prefill window, one image shape.
  comps.append(bench_rollout_compiles(ours, tok, args.rollout_turns, num_tasks=16, num_slots=8, timed_rerun=False,
                                      window_min=0, chunk_buckets=(128, 512), patch_buckets=(256,),
                                      image_row_buckets=(8,)))
  for c in comps:
    print(json.dumps({k: v for k, v in c.items() if k != "turns"}), flush=True)
  text = report(single, multi, comps)
  print()
  print(text)
  if args.write:
    import torch  # pylint: disable=g-import-not-at-top
    machine = (f"{os.cpu_count()}-core CPU ({platform.machine()}), {args.threads} thread(s) each, jax {jax.__version__}, "
               f"torch {torch.__version__}, {datetime.date.today().isoformat()}")
    header = "" if _has_section(args.write) else "\n## Sampler\n"
    with open(args.write, "a", encoding="utf-8") as f:
      f.write(f"{header}\n### `python tools/bench/sampler.py --family {args.family}` on {machine}\n\n{text}\n")


def _has_section(path: str) -> bool:
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    return any(line.strip() == "## Sampler" for line in f)

