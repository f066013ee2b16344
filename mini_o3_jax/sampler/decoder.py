"""The sampler's decoder pass over its own KV cache: head-major layout, updated in place.

The only KV-cache path of the package (the model itself runs full causal passes). Two costs measured on
CPU (tiny model, 16 slots) shaped it, against the model's former cache path:
  * scanning the layers with the cache as the scan's input *and output* writes a whole new cache every
    call: a full cache copy per generated token;
  * a token-major cache ([layers, batch, max_len, kv_heads, head_dim]) makes XLA transpose every layer's
    keys into [.., head_dim, keys] order before the contraction, each step. Here keys are stored [.., kv_heads, head_dim, cache_len] and values
    [.., kv_heads, cache_len, head_dim], the operand orders the two attention contractions want, so
    nothing is transposed per step.
Here the cache is the scan's *carry*, each layer scatters only the chunk's new keys/values into its
slice (in place), and attention reads a window of it. The layer maths is the model's own
(`DecoderLayer.qkv` / `finish`, `text.scan_with_deepstack` for Qwen3-VL's DeepStack); equality with
the model's forward and with `transformers` is tested for both families.

Writes use scatter with mode="drop": an index past `cache_len` is dropped instead of clamped, so a
padded chunk can never overwrite real entries (dynamic_update_slice would clamp the start).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mini_o3_jax.model import attention, rope
from mini_o3_jax.model.config import TextConfig
from mini_o3_jax.model import text as text_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotCache:
  """Keys/values of every slot, head-major, keys transposed.

  k [layers, slots, kv_heads, head_dim, cache_len]; v [layers, slots, kv_heads, cache_len, head_dim];
  valid bool [slots, cache_len] marks entries holding a real token; length int32 [slots] is where each
  slot's next chunk is written.
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  length: jax.Array

  @classmethod
  def zeros(cls, cfg: TextConfig, slots: int, cache_len: int, dtype=jnp.float32) -> SlotCache:
    v_shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cache_len, cfg.head_dim)
    k_shape = v_shape[:3] + (cfg.head_dim, cache_len)
    return cls(k=jnp.zeros(k_shape, dtype), v=jnp.zeros(v_shape, dtype),
               valid=jnp.zeros((slots, cache_len), bool), length=jnp.zeros((slots,), jnp.int32))

  @property
  def cache_len(self) -> int:
    return self.v.shape[3]


def cached_forward(model, embeds: jax.Array, positions: jax.Array, mask: jax.Array, cache: SlotCache,
                   window: int | None = None) -> tuple[jax.Array, SlotCache]:
  """Runs a chunk against the cache; returns final-norm hidden states [slots, C, hidden] and the cache.

  embeds [slots, C, hidden] (from `model.embed`); positions int [3, slots, C]; mask [slots, C]
  (1 = real token). The chunk is written at each slot's `cache.length`; the returned cache has
  `length += mask.sum(1)` (padding stays invalid and is overwritten by the next chunk). It attends
  to every valid earlier entry and causally within itself.

  window: attend to the first `window` cache entries only (static; the caller guarantees every row
  that matters has `length + C <= window`), so attention costs O(window) instead of O(cache_len).
  """
  text = model.model
  cfg = text.cfg
  embeds, deepstack = text_lib.split_deepstack(embeds, cfg.hidden_size)
  slots, c, _ = embeds.shape
  cap = cache.cache_len
  window = cap if window is None else min(window, cap)
  cos, sin = rope.text_cos_sin(cfg, positions)
  real = mask.astype(bool)
  cols = cache.length[:, None] + jnp.arange(c)[None]                                   # [slots, C]
  rows = jnp.broadcast_to(jnp.arange(slots)[:, None], cols.shape)
  valid = cache.valid.at[rows, cols].set(real, mode="drop")                           # [slots, cap]
  key_valid = valid[:, :window]                                                       # [slots, W]

  def body(layer, carry, added):
    x, k_all, v_all, i = carry
    q, k, v = layer.qkv(x, cos, sin)
    # Advanced indices (layer, rows, cols) split by slices: the update is indexed [slots, C, kv_heads, hd].
    k_all = k_all.at[i, rows, :, :, cols].set(k.astype(k_all.dtype), mode="drop")
    v_all = v_all.at[i, rows, :, cols].set(v.astype(v_all.dtype), mode="drop")
    kvh, hd = v_all.shape[2], v_all.shape[4]
    k_i = jax.lax.dynamic_slice(k_all, (i, 0, 0, 0, 0), (1, slots, kvh, hd, window))[0]  # [slots, kvh, hd, W]
    v_i = jax.lax.dynamic_slice(v_all, (i, 0, 0, 0, 0), (1, slots, kvh, window, hd))[0]  # [slots, kvh, W, hd]
    attn = attention.cache_attention(q, k_i.astype(q.dtype), v_i.astype(q.dtype), key_valid, cols,
                                     impl=layer.attention_impl, block=layer.attention_block)
    x = layer.finish(x, attn)
    if added is not None:  # DeepStack (Qwen3-VL): this layer's image features join the stream
      x = x + added.astype(x.dtype)
    return (x, k_all, v_all, i + 1), None

  (x, k, v, _), _ = text_lib.scan_with_deepstack(
      text.layers, lambda layer, carry, inputs: body(layer, carry, inputs[1]),
      (embeds, cache.k, cache.v, jnp.int32(0)), None, deepstack)
  new_cache = SlotCache(k=k, v=v, valid=valid, length=cache.length + mask.sum(axis=1).astype(jnp.int32))
  return text.norm(x), new_cache
