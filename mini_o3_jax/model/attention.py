"""Softmax attention behind one entry point, with implementations whose memory is linear in length.

Self-attention (`self_attention`) takes its mask as segment ids, the way splash attention does: a token
attends to the tokens of its own segment (and, if causal, to those at or before its index). Padding is a
segment of its own, so no query row is ever empty and every implementation agrees on every row:

  text rows:   segments = 0 for real tokens, `PAD_SEGMENT` for padding, causal
  vision rows: one segment per image (or per window), not causal

Implementations (`impl`):
  dense      [heads, q, k] fp32 scores; fastest at small sizes, memory quadratic in length
  blockwise  plain JAX online softmax over [block, block] tiles with a custom VJP that recomputes the
             tiles in the backward pass (FlashAttention-2): forward and backward memory linear in length
  splash     the Pallas TPU splash-attention kernel (`interpret=True` runs it on CPU, slowly)
  cudnn      `jax.nn.dot_product_attention` (cuDNN on GPU); text rows only: causal, a single real segment
             followed by padding (right padding), expressed as per-row lengths
  auto       dense while the score matrix is small (<= `DENSE_LIMIT` entries per head), else splash on
             TPU and blockwise elsewhere

The sampler's cache attention (`cache_attention`: a chunk of queries against a key cache with a validity
mask) is forward-only; its blockwise form scans the cache in blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from mini_o3_jax import sharding as shard_lib

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "splash", "cudnn")
PAD_SEGMENT = -1                        # segment id of padding tokens (they attend among themselves)
_BLOCK_PAD_SEGMENT = np.iinfo(np.int32).min  # tokens added to fill the last block
DENSE_LIMIT = 2048 * 2048               # auto: dense attention up to this many scores per head
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def check_impl(impl: str) -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
  return impl


def resolve(impl: str, q_len: int, kv_len: int, backend: str | None = None) -> str:
  """The implementation `auto` stands for at these (static) lengths on `backend` (default: JAX's)."""
  check_impl(impl)
  if impl != "auto":
    return impl
  if q_len * kv_len <= DENSE_LIMIT:
    return "dense"
  return "splash" if (backend or jax.default_backend()) == "tpu" else "blockwise"


def text_segments(valid: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
  """Segment ids [batch, seq] of text rows: 0 for real tokens, PAD_SEGMENT for padding."""
  if valid is None:
    return jnp.zeros(shape, jnp.int32)
  return jnp.where(valid.astype(bool), 0, PAD_SEGMENT).astype(jnp.int32)


def segment_mask(segments: jax.Array, causal: bool) -> jax.Array:
  """The dense mask bool [batch, seq, seq] that `segments` and `causal` stand for."""
  mask = segments[:, :, None] == segments[:, None, :]
  if causal:
    t = segments.shape[1]
    mask &= jnp.tril(jnp.ones((t, t), bool))[None]
  return mask


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, causal: bool,
                   impl: str = "auto", block: int = 512, interpret: bool = False) -> jax.Array:
  """q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim], segments int [batch, seq].

  Returns [batch, seq, heads, head_dim]. Logits and softmax are fp32 in every implementation.
  """
  impl = resolve(impl, q.shape[1], k.shape[1])
  if impl == "dense":
    return dense_causal(q, k, v, segments) if causal else dense(q, k, v, segment_mask(segments, False))
  if impl == "blockwise":
    return blockwise(q, k, v, segments, causal=causal, block=block)
  if impl == "splash":
    return splash(q, k, v, segments, causal=causal, interpret=interpret)
  return cudnn(q, k, v, segments, causal=causal)


# --------------------------------------------------------------------------------------------- dense

def dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Softmax attention with grouped KV heads and an explicit mask.

  q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim], mask bool [batch, q_len,
  kv_len] (True = may attend) or None. A query row with no visible key gets a uniform average instead
  of NaN; such rows are ignored downstream.
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, t, kvh, h // kvh, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def dense_causal(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, block: int | None = None) -> jax.Array:
  """Dense causal self-attention that skips the key blocks above the diagonal.

  Shapes as `self_attention`. The queries are cut into blocks of `block` (default: the largest of 128,
  64, 32 that divides seq into >= 2 blocks) and block i attends to keys [0, (i+1)*block) only: with n
  blocks, (n+1)/2n of the dense scores, i.e. 58% at n = 6 (2.7x faster fwd+bwd on a CPU at seq 768,
  where the [T, T] softmax dominates).
  """
  t = q.shape[1]
  if block is None:
    block = next((c for c in (128, 64, 32) if t % c == 0 and t // c >= 2), t)
  if t % block or t // block < 2:
    return dense(q, k, v, segment_mask(segments, True))
  outs = []
  for i in range(t // block):  # static: a few blocks per bucket
    end = (i + 1) * block
    rows = slice(i * block, end)
    causal = jnp.arange(end)[None, :] <= (i * block + jnp.arange(block))[:, None]       # [block, end]
    mask = causal[None] & (segments[:, rows, None] == segments[:, None, :end])
    outs.append(dense(q[:, rows], k[:, :end], v[:, :end], mask))
  return jnp.concatenate(outs, axis=1)


def local_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
                            block: int) -> jax.Array:
  """Attention restricted to equal segment ids, for segments that are contiguous and at most `block` long.

  q/k/v [seq, heads, head_dim]; segments int [seq]. The sequence is cut into blocks of `block` tokens and
  each block attends to itself and its two neighbours, which covers every contiguous segment of length
  <= block. Cost and memory are O(seq * 3 * block) instead of O(seq^2) in every implementation: the
  vision tower's window layers.
  """
  n, h, d = q.shape
  nb = -(-n // block)
  pad = nb * block - n
  q, k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  seg = jnp.pad(segments, (0, pad), constant_values=jnp.iinfo(jnp.int32).min)
  qb = q.reshape(nb, block, h, d)
  seg_q = seg.reshape(nb, block)

  def neighbours(x, fill):
    xb = x.reshape((nb, block) + x.shape[1:])
    pad_block = jnp.full((1, block) + x.shape[1:], fill, x.dtype)
    prev = jnp.concatenate([pad_block, xb[:-1]], 0)
    nxt = jnp.concatenate([xb[1:], pad_block], 0)
    return jnp.concatenate([prev, xb, nxt], 1)                                       # [blocks, 3*block, ...]

  kb, vb = neighbours(k, 0), neighbours(v, 0)
  seg_k = neighbours(seg, jnp.iinfo(jnp.int32).max)
  mask = seg_q[:, :, None] == seg_k[:, None, :]                                      # [blocks, block, 3*block]
  out = dense(qb, kb, vb, mask)                                                      # blocks act as the batch
  return out.reshape(nb * block, h, d)[:n]


# ----------------------------------------------------------------------------------------- blockwise

def _pad_to(x: jax.Array, length: int, axis: int, value) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _tiles(x: jax.Array, block: int) -> jax.Array:
  """[batch, n * block, ...] -> [n, batch, block, ...] (the tile index leads, for scans)."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, t // block, block) + x.shape[2:]), 1, 0)


def _untile(x: jax.Array) -> jax.Array:
  """[n, batch, block, ...] -> [batch, n * block, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _tile_mask(seg_q, seg_k, pos_q, pos_k, causal: bool) -> jax.Array:
  """Visibility bool [batch, block_q, block_k] of one tile."""
  mask = seg_q[:, :, None] == seg_k[:, None, :]
  if causal:
    mask &= pos_k[None, None, :] <= pos_q[None, :, None]
  return mask


def _scores(q_t, k_t, mask):
  """q_t [b, bq, kvh, g, d], k_t [b, bk, kvh, d] -> masked fp32 scores [b, kvh, g, bq, bk]."""
  d = q_t.shape[-1]
  s = jnp.einsum("bqkgd,bskd->bkgqs", q_t, k_t, preferred_element_type=jnp.float32) * (d**-0.5)
  return jnp.where(mask[:, None, None], s, _MASK_VALUE)


def _online_softmax_step(carry, s, mask, weighted_values):
  """One key tile of the online softmax. carry: running max m and sum l [..., q], accumulator acc
  [..., q, d] (fp32); s fp32 scores [..., q, k]; mask bool broadcastable to s; weighted_values(p) -> the
  tile's p @ v [..., q, d] in fp32."""
  m, l, acc = carry
  m_new = jnp.maximum(m, s.max(-1))
  p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
  scale = jnp.exp(m - m_new)
  return m_new, l * scale + p.sum(-1), acc * scale[..., None] + weighted_values(p)


def _online_softmax_init(shape, d):
  """The carry of `_online_softmax_step` for queries of `shape` (without head_dim)."""
  return (jnp.full(shape, _MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape + (d,), jnp.float32))


def _key_range(i, n: int, causal: bool):
  """Key tiles [0, stop) that query tile i can see: causal tiles stop at the diagonal."""
  return i + 1 if causal else jnp.full_like(i, n)


def _query_range(j, n: int, causal: bool):
  """Query tiles [start, n) that can see key tile j."""
  return j if causal else jnp.zeros_like(j)


def _tile_loop(start, stop, body, init):
  """`body(index, carry)` for index in [start, stop): a `while_loop` even when the bounds are static.

  The tile loops run only inside the custom VJP. Written as a scan (a static `fori_loop`) or a scan with a
  per-tile `lax.cond`, the model's reverse-mode AD through its scanned layer stack kept tile-sized
  intermediates of every tile pair ([tiles, tiles, ..., block, block] buffers, measured: memory quadratic
  again); a while loop with traced bounds keeps one tile at a time.
  """
  def step(state):
    index, carry = state
    return index + 1, body(index, carry)

  return jax.lax.while_loop(lambda state: state[0] < stop, step, (start, init))[1]
def _forward_tiles(qg, k, v, segments, causal: bool, block: int):
  """Online softmax over the visible key tiles of every query tile.

  qg [b, T, kvh, g, d]; k/v [b, T, kvh, d]; segments [b, T]; T a multiple of block.
  Returns out [b, T, kvh, g, d] (qg's dtype) and the log-sum-exp [b, kvh, g, T] (fp32).
  """
  q_tiles, k_tiles, v_tiles = _tiles(qg, block), _tiles(k, block), _tiles(v, block)
  seg_tiles = _tiles(segments, block)
  n = seg_tiles.shape[0]
  b, _, kvh, g, d = qg.shape
  positions = jnp.arange(n * block).reshape(n, block)

  def query_tile(i):
    q_t, seg_q, pos_q = q_tiles[i], seg_tiles[i], positions[i]

    def key_tile(j, carry):
      k_t, v_t = k_tiles[j], v_tiles[j]
      mask = _tile_mask(seg_q, seg_tiles[j], pos_q, positions[j], causal)
      s = _scores(q_t, k_t, mask)                                          # [b, kvh, g, bq, bk]
      return _online_softmax_step(carry, s, mask[:, None, None], lambda p: jnp.einsum(
          "bkgqs,bskd->bkgqd", p.astype(v_t.dtype), v_t, preferred_element_type=jnp.float32))

    m, l, acc = _tile_loop(jnp.zeros_like(i), _key_range(i, n, causal), key_tile,
                           _online_softmax_init((b, kvh, g, block), d))
    safe = jnp.maximum(l, jnp.finfo(jnp.float32).tiny)
    out = acc / safe[..., None]                                            # [b, kvh, g, bq, d]
    lse = jnp.where(l > 0, m + jnp.log(safe), jnp.inf)                     # empty row: no gradient
    return jnp.moveaxis(out, 3, 1).astype(qg.dtype), lse

  out, lse = jax.lax.map(query_tile, jnp.arange(n))                        # [n, b, bq, ...], [n, b, kvh, g, bq]
  return _untile(out), jnp.moveaxis(lse, 0, 3).reshape(b, kvh, g, n * block)


def _backward_tiles(qg, k, v, segments, out, lse, d_out, causal: bool, block: int):
  """FlashAttention-2 backward: dq by query tile, then dk/dv by key tile, recomputing the scores."""
  b, T, kvh, g, d = qg.shape
  n = T // block
  scale = d**-0.5
  delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))  # [b, kvh, g, T]
  q_tiles, k_tiles, v_tiles, do_tiles = (_tiles(x, block) for x in (qg, k, v, d_out))
  seg_tiles = _tiles(segments, block)
  lse_tiles = jnp.moveaxis(lse.reshape(b, kvh, g, n, block), 3, 0)        # [n, b, kvh, g, bq]
  delta_tiles = jnp.moveaxis(delta.reshape(b, kvh, g, n, block), 3, 0)
  positions = jnp.arange(T).reshape(n, block)

  def probs_and_dscores(i, j):
    """Probabilities and score gradients [b, kvh, g, bq, bk] of query tile i against key tile j."""
    mask = _tile_mask(seg_tiles[i], seg_tiles[j], positions[i], positions[j], causal)
    s = _scores(q_tiles[i], k_tiles[j], mask)
    p = jnp.where(mask[:, None, None], jnp.exp(s - lse_tiles[i][..., None]), 0.0)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", do_tiles[i], v_tiles[j], preferred_element_type=jnp.float32)
    return p, p * (dp - delta_tiles[i][..., None])

  def dq_tile(i):
    def key_tile(j, dq):
      _, ds = probs_and_dscores(i, j)
      return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_tiles[j], preferred_element_type=jnp.float32) * scale

    dq = _tile_loop(jnp.zeros_like(i), _key_range(i, n, causal), key_tile, jnp.zeros(q_tiles.shape[1:], jnp.float32))
    return dq.astype(qg.dtype)

  def dkv_tile(j):
    def query_tile(i, carry):
      dk, dv = carry
      p, ds = probs_and_dscores(i, j)
      dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p, do_tiles[i], preferred_element_type=jnp.float32)
      dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, q_tiles[i], preferred_element_type=jnp.float32) * scale
      return dk, dv

    zeros = jnp.zeros(k_tiles.shape[1:], jnp.float32)
    dk, dv = _tile_loop(_query_range(j, n, causal), jnp.full_like(j, n), query_tile, (zeros, zeros))
    return dk.astype(k.dtype), dv.astype(v.dtype)

  dq = jax.lax.map(dq_tile, jnp.arange(n))
  dk, dv = jax.lax.map(dkv_tile, jnp.arange(n))
  return _untile(dq), _untile(dk), _untile(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(qg, k, v, segments, causal, block):
  return _forward_tiles(qg, k, v, segments, causal, block)[0]


def _flash_fwd(qg, k, v, segments, causal, block):
  out, lse = _forward_tiles(qg, k, v, segments, causal, block)
  return out, (qg, k, v, segments, out, lse)


def _flash_bwd(causal, block, residuals, d_out):
  qg, k, v, segments, out, lse = residuals
  dq, dk, dv = _backward_tiles(qg, k, v, segments, out, lse, d_out, causal, block)
  return dq, dk, dv, np.zeros(segments.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, causal: bool,
              block: int = 512) -> jax.Array:
  """Self-attention in [block, block] tiles; causal attention runs only the tiles at or below the diagonal.

  Shapes as `self_attention`. Memory: O(seq * heads * head_dim) residuals plus one tile of scores,
  forward and backward. Sequences are padded to a multiple of `block` (the padding is a segment of its
  own and is cut off again).
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  block = min(block, -(-t // 8) * 8)
  total = -(-t // block) * block
  qg = _pad_to(q.reshape(b, t, kvh, h // kvh, d), total, 1, 0)
  k, v = _pad_to(k, total, 1, 0), _pad_to(v, total, 1, 0)
  segments = _pad_to(segments.astype(jnp.int32), total, 1, _BLOCK_PAD_SEGMENT)
  out = _flash(qg, k, v, segments, causal, block)
  return out[:, :t].reshape(b, t, h, d)


# -------------------------------------------------------------------------------------------- splash

def _splash_rows(q, k, v, segments, *, causal: bool, interpret: bool, block: int):
  """Splash attention of rows that are whole on this device: q [b, T, h, d], k/v [b, T, kvh, d]."""
  b, t, h, d = q.shape
  kvh = k.shape[2]
  g = h // kvh
  total = -(-t // block) * block
  head_mask = mask_lib.CausalMask((total, total)) if causal else mask_lib.FullMask((total, total))
  kernel = kernel_lib.make_splash_mqa_single_device(
      mask_lib.MultiHeadMask([head_mask] * g),
      block_sizes=kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                        block_q_dq=block, block_kv_dq=block),
      interpret=interpret)
  qh = _pad_to(q * jnp.asarray(d**-0.5, q.dtype), total, 1, 0)            # the kernel does not scale
  qh = jnp.moveaxis(qh.reshape(b, total, kvh, g, d), 1, 3)                # [b, kvh, g, T, d]
  kh = jnp.moveaxis(_pad_to(k, total, 1, 0), 1, 2)                        # [b, kvh, T, d]
  vh = jnp.moveaxis(_pad_to(v, total, 1, 0), 1, 2)
  seg = _pad_to(segments.astype(jnp.int32), total, 1, _BLOCK_PAD_SEGMENT)

  def row(q_r, k_r, v_r, seg_r):
    ids = kernel_lib.SegmentIds(q=seg_r, kv=seg_r)
    return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(q_r, k_r, v_r)

  out = jax.vmap(row)(qh, kh, vh, seg)                                    # [b, kvh, g, T, d]
  return jnp.moveaxis(out, 3, 1).reshape(b, total, h, d)[:, :t]


def splash(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, causal: bool,
           interpret: bool = False, block: int = 128) -> jax.Array:
  """The Pallas splash kernel; under a mesh (`jax.set_mesh`) each device runs it on its own rows and heads
  (batch over data x fsdp, kv heads over tensor), since a Pallas call cannot be partitioned by XLA."""
  rows = functools.partial(_splash_rows, causal=causal, interpret=interpret, block=block)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
    return rows(q, k, v, segments)
  # [batch, length, heads, head_dim]; the heads split must divide the kv heads, which q's groups follow.
  qkv_spec = shard_lib.divisible_spec(mesh, ("batch", "length", "activation_heads", None), k.shape)
  segment_spec = P(qkv_spec[0], None)
  return jax.shard_map(rows, in_specs=(qkv_spec, qkv_spec, qkv_spec, segment_spec), out_specs=qkv_spec,
                       check_vma=False)(q, k, v, segments)


# --------------------------------------------------------------------------------------------- cudnn

def cudnn(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, causal: bool,
          implementation: str | None = "cudnn") -> jax.Array:
  """`jax.nn.dot_product_attention` for right-padded causal text rows (segment 0, then padding).

  The real tokens' outputs equal `dense`; padding rows differ (they are ignored downstream). Other masks
  (several segments, left padding) are not expressible as lengths: use blockwise for them.
  """
  if not causal:
    raise ValueError("attention impl 'cudnn' covers causal text rows only; use 'blockwise' for vision")
  lengths = (segments == 0).sum(axis=1).astype(jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                      key_value_seq_lengths=lengths, implementation=implementation)


# --------------------------------------------------------------------------------- cache (sampler)

def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, query_index: jax.Array, *,
                    impl: str = "auto", block: int = 1024) -> jax.Array:
  """A chunk of queries against a head-major key cache (forward only: the sampler).

  q [b, C, heads, hd]; k [b, kv_heads, hd, W]; v [b, kv_heads, W, hd]; key_valid bool [b, W];
  query_index int [b, C], the cache slot of each query: it sees the valid slots at or before it.
  Blockwise scans the cache in `block`-slot tiles with an online softmax (also what `splash` and `cudnn`
  use here: the cache is not a self-attention); a query with no visible slot gets zeros (dense: a uniform
  average); both are padding the sampler ignores.
  """
  b, c, h, d = q.shape
  kvh, w = k.shape[1], k.shape[3]
  impl = resolve(impl, c, w)
  slots = jnp.arange(w)
  if impl == "dense" or w <= block:
    mask = key_valid[:, None, :] & (slots[None, None, :] <= query_index[:, :, None])
    return cache_dense(q, k, v, mask)
  qg = q.reshape(b, c, kvh, h // kvh, d)
  n = -(-w // block)
  total = n * block
  k = _pad_to(k, total, 3, 0)
  v = _pad_to(v, total, 2, 0)
  valid = _pad_to(key_valid, total, 1, False)
  k_tiles = jnp.moveaxis(k.reshape(b, kvh, d, n, block), 3, 0)             # [n, b, kvh, hd, block]
  v_tiles = jnp.moveaxis(v.reshape(b, kvh, n, block, d), 2, 0)             # [n, b, kvh, block, hd]
  valid_tiles = jnp.moveaxis(valid.reshape(b, n, block), 1, 0)
  slot_tiles = jnp.arange(total).reshape(n, block)

  def key_tile(carry, args):
    k_t, v_t, valid_t, slot_t = args
    mask = valid_t[:, None, :] & (slot_t[None, None, :] <= query_index[:, :, None])   # [b, C, block]
    s = jnp.einsum("bqkgd,bkds->bkgqs", qg, k_t, preferred_element_type=jnp.float32) * (d**-0.5)
    s = jnp.where(mask[:, None, None], s, _MASK_VALUE)
    return _online_softmax_step(carry, s, mask[:, None, None], lambda p: jnp.einsum(
        "bkgqs,bksd->bkgqd", p.astype(v_t.dtype), v_t, preferred_element_type=jnp.float32)), None

  init = _online_softmax_init((b, kvh, h // kvh, c), d)
  (_, l, acc), _ = jax.lax.scan(key_tile, init, (k_tiles, v_tiles, valid_tiles, slot_tiles))
  out = acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[..., None]      # [b, kvh, g, C, hd]
  return jnp.moveaxis(out, 3, 1).reshape(b, c, h, d).astype(q.dtype)


def cache_dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Dense attention against head-major keys/values: q [b, t, heads, hd]; k [b, kv_heads, hd, keys];
  v [b, kv_heads, keys, hd]; mask bool [b, t, keys] (True = may attend)."""
  b, t, h, d = q.shape
  kvh = k.shape[1]
  qg = q.reshape(b, t, kvh, h // kvh, d)
  if t == 1:  # decode: one query per row; no query axis in the contractions
    logits = jnp.einsum("bkgd,bkds->bkgs", qg[:, 0], k, preferred_element_type=jnp.float32) * (d**-0.5)
    logits = jnp.where(mask[:, :, None, :], logits, _MASK_VALUE)           # mask [b, 1, s] -> [b, 1, 1, s]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, 1, h, d)
  logits = jnp.einsum("btkgd,bkds->bkgts", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
  logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, d)
