"""Model building blocks against plain numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from mini_o3_jax.model import layers, rope


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
