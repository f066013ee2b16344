"""Rotary position embeddings: M-RoPE for the decoder, 2-D axial RoPE for the vision tower.

Position *ids* are host-side numpy (they depend on image grid shapes, which are Python data); the
cos/sin tables are jnp so they are computed inside jit from those ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------- host side: position ids

def vision_patch_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
  """(row, col) of every patch, in the processor's merge-block-major patch order. -> int32 [patches, 2]."""
  out = []
  for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # Patches arrive grouped in merge x merge blocks, blocks in row-major order.
    blocks = (h // merge, merge, w // merge, merge)
    hh = hh.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    ww = ww.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
  if not out:
    return np.zeros((0, 2), np.int32)
  return np.concatenate(out).astype(np.int32)


def image_token_counts(image_grid_thw: np.ndarray, merge: int) -> np.ndarray:
  return (np.prod(np.asarray(image_grid_thw, np.int64).reshape(-1, 3), -1) // merge**2).astype(np.int64)


def get_rope_index(input_ids: np.ndarray, image_grid_thw: np.ndarray | None, attention_mask: np.ndarray | None,
                   *, image_token_id: int, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
  """3-D (temporal, height, width) positions of a batch of mixed text/image sequences.

  Equal to `transformers` `Qwen2_5_VLModel.get_rope_index` for images: text tokens advance all three axes
  by one; an image's `t x h x w` merged tokens get (t0, start + row, start + col) and the text after it
  continues at start + max(h, w). Padding (attention_mask 0) gets position 0.

  Args:
    input_ids: int [batch, seq].
    image_grid_thw: int [num_images, 3], images in the order they appear in the batch (row-major).
    attention_mask: [batch, seq] of 0/1, or None for no padding.

  Returns:
    positions int32 [3, batch, seq] and rope deltas int32 [batch] (next position minus number of valid
    tokens, which continues the positions of generated tokens: pos = n_valid + delta).
  """
  input_ids = np.asarray(input_ids)
  b, t = input_ids.shape
  mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  counts = [] if image_grid_thw is None else list(image_token_counts(image_grid_thw, spatial_merge_size))
  grids = [] if image_grid_thw is None else [tuple(g) for g in np.asarray(image_grid_thw).reshape(-1, 3)]
  next_image = 0
  positions = np.zeros((3, b, t), np.int64)
  deltas = np.zeros((b,), np.int64)
  for row in range(b):
    ids = input_ids[row][mask[row]]
    n = len(ids)
    pos = np.zeros((3, n), np.int64)
    cur, i = 0, 0
    while i < n:
      if ids[i] != image_token_id:
        pos[:, i] = cur
        cur += 1
        i += 1
        continue
      if next_image >= len(grids):
        raise ValueError(f"row {row} has more image tokens than image_grid_thw describes ({len(grids)} images)")
      gt, gh, gw = grids[next_image]
      count = counts[next_image]
      run = ids[i:i + count]
      if len(run) != count or np.any(run != image_token_id):
        raise ValueError(f"row {row}: image {next_image} needs {count} consecutive image tokens at {i}")
      lh, lw = gh // spatial_merge_size, gw // spatial_merge_size
      tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(lh), np.arange(lw), indexing="ij")
      pos[0, i:i + count] = tt.reshape(-1) + cur
      pos[1, i:i + count] = hh.reshape(-1) + cur
      pos[2, i:i + count] = ww.reshape(-1) + cur
      cur += max(lh, lw)
      i += count
      next_image += 1
    positions[:, row, mask[row]] = pos
    deltas[row] = cur - n
  if next_image != len(grids):
    raise ValueError(f"image_grid_thw describes {len(grids)} images but the input ids hold {next_image}")
  return positions.astype(np.int32), deltas.astype(np.int32)


# ---------------------------------------------------------------- device side: cos / sin tables

def inverse_frequencies(dim: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                  mrope_section: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """positions int [3, batch, seq] -> cos, sin fp32 [batch, seq, head_dim].

  Frequency j of the rotary half uses the temporal, height or width position according to which
  `mrope_section` chunk it falls in; both halves use the same layout.
  """
  inv_freq = inverse_frequencies(head_dim, theta)                                   # [head_dim/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq                       # [3, batch, seq, head_dim/2]
  axis_of_freq = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)       # [head_dim/2]
  # A gather, not a one-hot matmul: TPU matmuls may run in bf16 and positions need full precision.
  freqs = freqs[axis_of_freq, :, :, np.arange(len(axis_of_freq))]                   # [head_dim/2, batch, seq]
  freqs = jnp.moveaxis(freqs, 0, -1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(patch_positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """patch_positions int [patches, 2] (row, col) -> cos, sin fp32 [patches, head_dim]."""
  inv_freq = inverse_frequencies(head_dim // 2, theta)                              # [head_dim/4]
  freqs = patch_positions.astype(jnp.float32)[..., None] * inv_freq                 # [patches, 2, head_dim/4]
  freqs = freqs.reshape(freqs.shape[0], -1)                                         # rows' then cols' freqs
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)
