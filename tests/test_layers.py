"""Model building blocks against plain numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from mini_o3_jax.model import layers, rope


def _np_attention(q, k, v, mask):
  h, kvh = q.shape[2], k.shape[2]
  k = np.repeat(k, h // kvh, axis=2)
  v = np.repeat(v, h // kvh, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None], logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def test_grouped_attention_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, v = rng.normal(size=(2, 5, 4, 8)), rng.normal(size=(2, 7, 2, 8)), rng.normal(size=(2, 7, 2, 8))
  mask = rng.random((2, 5, 7)) < 0.7
  mask[:, :, 0] = True
  got = layers.attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("seq,block", [(64, 16), (48, 16), (40, 16), (16, 16)])
def test_causal_attention_equals_dense_causal_mask(seq, block):
  # 64 and 48: the block-skipping path; 40 (not a multiple) and 16 (one block): the dense fallback.
  rng = np.random.default_rng(seq)
  q, k, v = rng.normal(size=(3, seq, 4, 8)), rng.normal(size=(3, seq, 2, 8)), rng.normal(size=(3, seq, 2, 8))
  valid = np.arange(seq)[None] < np.array([seq, seq - 5, 7])[:, None]
  mask = np.tril(np.ones((seq, seq), bool))[None] & valid[:, None, :]
  got = layers.causal_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(valid), block)
  # Rows of padding queries see only valid keys either way; compare the real query rows.
  np.testing.assert_allclose(np.asarray(got)[valid], _np_attention(q, k, v, mask)[valid], atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_local_segment_attention_equals_dense_segment_mask(seed):
  rng = np.random.default_rng(seed)
  block = 16
  sizes = rng.integers(1, block + 1, size=12)  # contiguous segments, none longer than the block
  seg = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
  n = len(seg)
  q, k, v = (rng.normal(size=(n, 2, 8)).astype(np.float32) for _ in range(3))
  got = layers.local_segment_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg), block)
  want = _np_attention(q[None], k[None], v[None], (seg[:, None] == seg[None, :])[None])[0]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
  norm = layers.RMSNorm(16, eps=1e-6)
  want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5)


def test_mrope_sections_pick_temporal_height_width():
  # Positions that differ per axis reveal which axis each frequency uses.
  positions = jnp.asarray(np.array([[[5]], [[7]], [[11]]], np.int32))  # [3, batch=1, seq=1]
  head_dim, section = 16, (2, 3, 3)
  cos, _ = rope.mrope_cos_sin(positions, head_dim, 10000.0, section)
  inv = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
  axis_pos = np.array([5] * 2 + [7] * 3 + [11] * 3)
  want = np.cos(np.concatenate([axis_pos * inv] * 2))
  np.testing.assert_allclose(np.asarray(cos)[0, 0], want, rtol=1e-5)
