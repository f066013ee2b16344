"""Qwen2 / Qwen3 decoder (GQA, RMSNorm, SwiGLU, M-RoPE; Qwen3: per-head q/k norms) with an explicit KV cache.

Qwen3-VL's DeepStack: the decoder's input may carry, per token, the embedding followed by one vector per
DeepStack level ([batch, seq, hidden * (1 + levels)], zeros for text tokens); level i is added to the
hidden states after layer i, as `Qwen3VLTextModel._deepstack_process` does.

Two modes share one layer body:
  * no cache: causal self-attention over the given tokens (training, scoring);
  * cache: the chunk's keys/values are written into a fixed-size cache at per-row offsets and the chunk
    attends to everything valid before it. A prompt prefill, an appended observation turn and a single
    decode step are all this one operation with different chunk lengths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mini_o3_jax.model import attention, layers, rope
from mini_o3_jax.model.config import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Static-shape cache of every layer's keys and values.

  k, v [layers, batch, max_len, kv_heads, head_dim]; valid bool [batch, max_len] marks slots holding a
  real token (padding inside a chunk is written but stays invalid and is overwritten by the next chunk);
  length int32 [batch] is where the next chunk of each row is written.
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  length: jax.Array

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), valid=jnp.zeros((batch, max_len), bool),
               length=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


class DecoderLayer(nnx.Module):
  """One Qwen2 block; built with `stack=L` it holds all L blocks' parameters."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype, stack: int | None = None,
               attention_impl: str = "auto", attention_block: int = 512):
    d, h, kvh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=stack, std=cfg.initializer_range)
    self.input_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack)
    self.post_attention_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack)
    self.q_proj = layers.Linear(d, h * hd, axes=("embed", "q_heads"), bias=cfg.qkv_bias, **kw)
    self.k_proj = layers.Linear(d, kvh * hd, axes=("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
    self.v_proj = layers.Linear(d, kvh * hd, axes=("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
    self.o_proj = layers.Linear(h * hd, d, axes=("q_heads", "embed"), bias=cfg.o_bias, **kw)
    if cfg.qk_norm:
      self.q_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack)
      self.k_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack)
    else:
      self.q_norm = self.k_norm = None
    self.mlp = layers.GatedMLP(d, cfg.intermediate_size, act=cfg.hidden_act, bias=False, **kw)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
    self.attention_impl = attention.check_impl(attention_impl)
    self.attention_block = attention_block

  def qkv(self, x, cos, sin):
    """The attention inputs of x [batch, chunk, dim]: rotated q [batch, chunk, heads, head_dim], k and v
    [batch, chunk, kv_heads, head_dim]. Shared with the sampler's cache layout (`sampler.decoder`)."""
    b, t, _ = x.shape
    h = self.input_layernorm(x)
    q = self.q_proj(h).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin), v

  def finish(self, x, attn):
    """The residual updates after attention: attn [batch, chunk, heads, head_dim] -> new x."""
    x = x + self.o_proj(attn.reshape(x.shape[0], x.shape[1], -1))
    return x + self.mlp(self.post_attention_layernorm(x))

  def __call__(self, x, cos, sin, mask, kv=None, write_index=None):
    """x [batch, chunk, dim]; cos/sin [batch, chunk, head_dim].

    mask: bool [batch, chunk, keys] with a cache; without one, segment ids int [batch, chunk]
    (`attention.text_segments`; attention is causal within the chunk).

    kv: this layer's (k, v) cache [batch, max_len, kv_heads, head_dim] or None; write_index int [batch].
    Returns the new x and the updated (k, v) (or None).
    """
    q, k, v = self.qkv(x, cos, sin)
    if kv is not None:
      write = jax.vmap(lambda cache, new, i: jax.lax.dynamic_update_slice_in_dim(cache, new, i, axis=0))
      k = write(kv[0], k.astype(kv[0].dtype), write_index)
      v = write(kv[1], v.astype(kv[1].dtype), write_index)
      kv = (k, v)
    if kv is None:
      attn = attention.self_attention(q, k, v, mask, causal=True, impl=self.attention_impl,
                                      block=self.attention_block)
    else:
      attn = attention.dense(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    return self.finish(x, attn), kv


class TextModel(nnx.Module):
  """Token embeddings, the decoder stack and the final norm (the output head lives in the VLM)."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: str = "none", attention_impl: str = "auto", attention_block: int = 512):
    self.cfg = cfg
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype, std=cfg.initializer_range)
    self.layers = DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=cfg.num_hidden_layers,
                               attention_impl=attention_impl, attention_block=attention_block)
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.remat = remat

  def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """embeds [batch, chunk, dim * (1 + deepstack levels)]; positions int [3, batch, chunk];
    attention_mask [batch, chunk] (1 = real).

    Without a cache: causal attention within the chunk, padding keys hidden.
    With a cache: the chunk is written at `cache.length` of each row and attends to every valid earlier
    slot and causally within itself; the returned cache has `length += chunk` (padding stays invalid and
    is overwritten by the next chunk only if the caller advances by the real count: see `advance`).
    """
    b, t, _ = embeds.shape
    cfg = self.cfg
    embeds, deepstack = split_deepstack(embeds, cfg.hidden_size)
    cos, sin = rope.text_cos_sin(cfg, positions)
    token_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
      mask = attention.text_segments(token_valid, (b, t))  # causal within the chunk
      xs, write_index = None, None
    else:
      write_index = cache.length
      slots = jnp.arange(cache.max_len)
      q_slot = write_index[:, None] + jnp.arange(t)[None]                              # [batch, chunk]
      # Slots of this chunk take the chunk's validity; older slots keep theirs.
      new_valid = jax.vmap(lambda v, tv, i: jax.lax.dynamic_update_slice_in_dim(v, tv, i, 0))(
          cache.valid, token_valid, write_index)
      mask = new_valid[:, None, :] & (slots[None, None, :] <= q_slot[:, :, None])      # [batch, chunk, max_len]
      xs = (cache.k, cache.v)

    def body(layer, x, inputs):
      kv, added = inputs
      x, kv = layer(x, cos, sin, mask, kv, write_index)
      return (x if added is None else x + added.astype(x.dtype)), kv

    x, new_kv = scan_with_deepstack(self.layers, body, embeds, xs, deepstack, remat=self.remat)
    x = self.norm(x)
    if cache is None:
      return x, None
    new_cache = KVCache(k=new_kv[0], v=new_kv[1], valid=new_valid, length=cache.length + t)
    return x, new_cache


def split_deepstack(embeds: jax.Array, hidden: int) -> tuple[jax.Array, jax.Array | None]:
  """[batch, seq, hidden * (1 + levels)] -> the embeddings [batch, seq, hidden] and the DeepStack
  additions [levels, batch, seq, hidden] (None without levels)."""
  levels = embeds.shape[-1] // hidden - 1
  if levels <= 0:
    return embeds, None
  b, t, _ = embeds.shape
  deep = embeds[..., hidden:].reshape(b, t, levels, hidden)
  return embeds[..., :hidden], jnp.moveaxis(deep, 2, 0)


def scan_with_deepstack(stacked, body, x, xs, deepstack, *, remat: str = "none"):
  """Scans `body(layer, x, (xs_i, added_i)) -> (x, y_i)` over the stacked layers, where added_i is
  DeepStack level i for the first `levels` layers and None after them (two scans, so no zeros are
  carried through the later layers). xs: a pytree with a leading layer axis, or None."""
  n_layers = jax.tree.leaves(nnx.state(stacked))[0].shape[0]
  levels = 0 if deepstack is None else deepstack.shape[0]
  if levels == 0:
    return layers.scan_layers(stacked, lambda l, c, x_i: body(l, c, (x_i, None)), x, xs, remat=remat)
  head = None if xs is None else jax.tree.map(lambda a: a[:levels], xs)
  x, ys_head = layers.scan_layers(stacked, body, x, (head, deepstack), remat=remat, layer_slice=slice(0, levels))
  if levels == n_layers:
    return x, ys_head
  tail = None if xs is None else jax.tree.map(lambda a: a[levels:], xs)
  x, ys_tail = layers.scan_layers(stacked, lambda l, c, x_i: body(l, c, (x_i, None)), x, tail, remat=remat,
                                  layer_slice=slice(levels, n_layers))
  ys = None if ys_head is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys_head, ys_tail)
  return x, ys


def advance(cache: KVCache, new_cache: KVCache, num_real: jax.Array) -> KVCache:
  """Sets each row's write offset to old length + its real token count (right-padded chunks)."""
  return dataclasses.replace(new_cache, length=cache.length + num_real.astype(jnp.int32))
