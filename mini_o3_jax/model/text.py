"""Qwen2 / Qwen3 decoder (GQA, RMSNorm, SwiGLU, M-RoPE; Qwen3: per-head q/k norms); decoding over a KV
cache is the sampler's (`sampler.decoder`, over the layers' `qkv` / `finish`).

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


import jax
import jax.numpy as jnp
from flax import nnx

from mini_o3_jax.model import attention, layers, rope
from mini_o3_jax.model.config import TextConfig


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

  def __call__(self, x, cos, sin, segments):
    """x [batch, seq, dim]; cos/sin [batch, seq, head_dim]; segments int [batch, seq]
    (`attention.text_segments`): causal attention within each segment. Returns the new x.

    Decoding with a KV cache is the sampler's (`sampler.decoder`, over `qkv` and `finish`)."""
    q, k, v = self.qkv(x, cos, sin)
    attn = attention.self_attention(q, k, v, segments, causal=True, impl=self.attention_impl,
                                    block=self.attention_block)
    return self.finish(x, attn)


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

  def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states [batch, seq, dim] of a causal pass.

    embeds [batch, seq, dim * (1 + deepstack levels)]; positions int [3, batch, seq]; attention_mask
    [batch, seq] (1 = real; padding keys are hidden).
    """
    b, t, _ = embeds.shape
    cfg = self.cfg
    embeds, deepstack = split_deepstack(embeds, cfg.hidden_size)
    cos, sin = rope.text_cos_sin(cfg, positions)
    token_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    segments = attention.text_segments(token_valid, (b, t))

    def body(layer, x, inputs):
      _, added = inputs
      x = layer(x, cos, sin, segments)
      return (x if added is None else x + added.astype(x.dtype)), None

    x, _ = scan_with_deepstack(self.layers, body, embeds, None, deepstack, remat=self.remat)
    return self.norm(x)


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
