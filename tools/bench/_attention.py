"""The measurements behind tools/bench/attention.py (its docstring says what they are); loaded after the flags parse."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model import VLM, attention
from mini_o3_jax.model.vlm import prepare_inputs

TOKEN_IDS = dict(image_token_id=500, vision_start_token_id=501, vision_end_token_id=502, video_token_id=503)

WORKLOADS = {"text": dict(heads=8, kv_heads=2, head_dim=128, causal=True),
             "vision": dict(heads=16, kv_heads=16, head_dim=80, causal=False)}


def _inputs(workload: str, length: int):
  w = WORKLOADS[workload]
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, length, w["heads"], w["head_dim"])) * 0.5, jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, length, w["kv_heads"], w["head_dim"])) * 0.5, jnp.float32)
          for _ in range(2))
  if workload == "text":
    valid = np.arange(length)[None] >= length // 8                        # left padding
    segments = attention.text_segments(jnp.asarray(valid), (1, length))
  else:
    segments = jnp.zeros((1, length), jnp.int32)                           # one image
  return q, k, v, segments


def _program(workload: str, impl: str, backward: bool, block: int):
  causal = WORKLOADS[workload]["causal"]

  def forward(q, k, v, segments):
    return attention.self_attention(q, k, v, segments, causal=causal, impl=impl, block=block)

  if not backward:
    return jax.jit(forward)
  return jax.jit(jax.grad(lambda q, k, v, s: forward(q, k, v, s).sum(), argnums=(0, 1, 2)))


def measure(workload: str, impl: str, backward: bool, length: int, block: int, repeats: int,
            time_limit_bytes: float, time_max_length: int) -> dict:
  args = _inputs(workload, length)
  compiled = _program(workload, impl, backward, block).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  seconds = None
  if temp <= time_limit_bytes and length <= time_max_length:
    jax.block_until_ready(compiled(*args))
    runs = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      runs.append(time.perf_counter() - start)
    seconds = statistics.median(runs)
  return dict(temp=temp, seconds=seconds)


def model_step_temp(impl: str, tokens: int, side: int, block: int) -> int:
  """XLA temporaries of a tiny-VLM training step: `tokens` text tokens and one side x side-patch image."""
  cfg = config_lib.tiny(vocab_size=512, attention=impl, attention_block=block, **TOKEN_IDS)
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, max_position_embeddings=4 * (tokens + side * side)))
  image = [TOKEN_IDS["vision_start_token_id"]] + [TOKEN_IDS["image_token_id"]] * (side * side // 4)
  ids = np.array([image + [TOKEN_IDS["vision_end_token_id"]] + [7] * tokens], np.int32)
  pixels = np.zeros((side * side, cfg.vision.patch_dim), np.float32)
  inputs, _ = prepare_inputs(cfg, ids, np.ones_like(ids), pixels, np.array([[1, side, side]]))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0))))

  def loss(state, inputs):
    logits = nnx.merge(graphdef, state).forward(inputs)
    return jax.nn.log_softmax(logits.astype(jnp.float32)).mean()

  compiled = jax.jit(jax.grad(loss)).lower(state, inputs).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def model_table(lengths, block: int) -> str:
  lines = ["\n**tiny VLM training step** (compiled temporaries; text: T tokens + an 8x8-patch image; vision: one "
           "image of P patches, P / 4 image tokens + 8 text tokens)\n",
           "| length | text: dense | text: blockwise | vision: dense | vision: blockwise |", "|---|---|---|---|---|"]
  temps = {}
  for n in lengths:
    side = int(round(n**0.5)) // 2 * 2
    temps[n] = dict(text_dense=model_step_temp("dense", n, 8, block), text_block=model_step_temp("blockwise", n, 8, block),
                    vision_dense=model_step_temp("dense", 8, side, block),
                    vision_block=model_step_temp("blockwise", 8, side, block))
    t = temps[n]
    lines.append(f"| {n:,} | {_fmt_bytes(t['text_dense'])} | {_fmt_bytes(t['text_block'])} | "
                 f"{_fmt_bytes(t['vision_dense'])} | {_fmt_bytes(t['vision_block'])} |")
  growth = [f"{lo:,} -> {hi:,}: " + ", ".join(f"{k.replace('_block', ' blockwise').replace('_dense', ' dense')} "
                                               f"{temps[hi][k] / temps[lo][k]:.1f}x" for k in temps[lo])
            for lo, hi in zip(lengths, lengths[1:])]
  lines.append("\nTemporary memory growth: " + "; ".join(growth) + ".")
  return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
  return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def _fmt_time(s) -> str:
  return "-" if s is None else (f"{s * 1e3:,.0f} ms" if s < 10 else f"{s:,.1f} s")


def table(lengths, block: int, repeats: int, time_limit_bytes: float, time_max_length: int) -> str:
  lines = []
  for workload in WORKLOADS:
    for backward in (False, True):
      what = "forward + backward" if backward else "forward"
      unit = "tokens" if workload == "text" else "patches of one image"
      lines += [f"\n**{workload}, {what}** ({unit})\n",
                "| length | dense temp | blockwise temp | dense time | blockwise time | blockwise / dense time |",
                "|---|---|---|---|---|---|"]
      rows = {}
      for length in lengths:
        rows[length] = {impl: measure(workload, impl, backward, length, block, repeats, time_limit_bytes,
                                      time_max_length)
                        for impl in ("dense", "blockwise")}
        d, b = rows[length]["dense"], rows[length]["blockwise"]
        ratio = "-" if d["seconds"] is None or b["seconds"] is None else f"{b['seconds'] / d['seconds']:.2f}x"
        lines.append(f"| {length:,} | {_fmt_bytes(d['temp'])} | {_fmt_bytes(b['temp'])} | {_fmt_time(d['seconds'])} "
                     f"| {_fmt_time(b['seconds'])} | {ratio} |")
      growth = []
      for lo, hi in zip(lengths, lengths[1:]):
        growth.append(f"{lo:,} -> {hi:,}: dense {rows[hi]['dense']['temp'] / rows[lo]['dense']['temp']:.1f}x, "
                      f"blockwise {rows[hi]['blockwise']['temp'] / rows[lo]['blockwise']['temp']:.1f}x")
      lines.append("\nTemporary memory growth: " + "; ".join(growth) + ".")
  return "\n".join(lines)


def run(args) -> int | None:
  lengths = [int(x) for x in args.lengths.split(",")]
  load = os.getloadavg()[0]
  header = (f"### `python tools/bench/attention.py` on {os.cpu_count()}-core CPU ({platform.machine()}), jax "
            f"{jax.__version__}, block {args.block}, {datetime.date.today()} (1-min load average {load:.1f} at start)")
  body = (table(lengths, args.block, args.repeats, args.time_limit_gib * 2**30, args.time_max_length) + "\n"
          + model_table(lengths, args.block))
  out = header + "\n" + body + "\n"
  print(out)
  if args.write:
    with open(args.write, "a") as f:
      f.write("\n" + out)
  return 0

