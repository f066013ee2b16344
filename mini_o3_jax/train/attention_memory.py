"""How many attention scores exist at once, per query, for the memory plan (`train.memory`).

The count depends on the implementation `model.attention` runs, which `auto` picks by backend and size;
plans are for TPU slices, so `auto` is resolved as it would be there.
"""

from __future__ import annotations

from mini_o3_jax.model import attention as attention_lib
from mini_o3_jax.model.config import VLMConfig

PLAN_BACKEND = "tpu"  # plans are for TPU slices: `auto` attention resolves as it would there


def score_keys(config: VLMConfig, seq_len: int, *, causal: bool) -> float:
  """Keys per query whose attention scores exist at once in self-attention over `seq_len` tokens."""
  impl = attention_lib.resolve(config.attention, seq_len, seq_len, backend=PLAN_BACKEND)
  if impl == "dense":
    return causal_keys(seq_len) if causal else float(seq_len)
  if impl == "blockwise":  # one [block, block] tile of every row at a time
    block = min(config.attention_block, seq_len)
    return block * block / seq_len
  return 0.0  # splash / cudnn: the tiles live in on-chip memory


def cache_score_keys(config: VLMConfig, chunk: int, cache_len: int) -> float:
  """Keys per query whose scores exist at once when a chunk attends to the sampler's cache."""
  impl = attention_lib.resolve(config.attention, chunk, cache_len, backend=PLAN_BACKEND)
  if impl == "dense" or cache_len <= config.attention_block:
    return float(cache_len)
  return float(config.attention_block)  # the cache read in tiles (splash / cudnn use it too)


def causal_keys(seq_len: int) -> float:
  """Mean keys whose scores exist per query in dense causal attention (`attention.dense_causal`).

  Query blocks of 128 (or 64, 32) tokens attend only to the keys up to their block's end, so with n
  blocks (n + 1) / 2n of the dense [T, T] scores exist.
  """
  block = next((c for c in (128, 64, 32) if seq_len % c == 0 and seq_len // c >= 2), None)
  if block is None:
    return float(seq_len)
  n = seq_len // block
  return seq_len * (n + 1) / (2 * n)
