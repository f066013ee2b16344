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


def position_table_taps(grid_thw: np.ndarray, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear resampling of a learned `side x side` position table to each image's patch grid.

  The same as `F.interpolate(table, (h, w), mode="bilinear", align_corners=True)` (Qwen3-VL's
  `pos_embed`), written as four taps per patch: patch p's embedding is
  `sum_k weights[p, k] * table[index[p, k]]`. Patches come in the processor's merge-block order.

  Returns index int32 [patches, 4] into the flattened table and weights float32 [patches, 4].
  """
  rows = vision_patch_positions(grid_thw, merge)                                     # [patches, 2]
  sizes = []
  for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
    sizes.append(np.tile([[h, w]], (t * h * w, 1)))
  if not sizes:
    return np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32)
  sizes = np.concatenate(sizes)

  def axis_taps(index, size):
    src = index * (side - 1) / np.maximum(size - 1, 1)                               # align_corners=True
    lo = np.floor(src)
    taps = np.clip(lo[:, None].astype(np.int64) + np.arange(2), 0, side - 1)         # [patches, 2]
    weights = np.clip(1 - np.abs(src[:, None] - lo[:, None] - np.arange(2)), 0, None)
    return taps, weights

  h_taps, h_w = axis_taps(rows[:, 0].astype(np.float64), sizes[:, 0])
  w_taps, w_w = axis_taps(rows[:, 1].astype(np.float64), sizes[:, 1])
  index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
  weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
  return index.astype(np.int32), weights.astype(np.float32)


# ---------------------------------------------------------------- device side: cos / sin tables

def inverse_frequencies(dim: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def mrope_axes(mrope_section: tuple[int, ...], interleaved: bool = False) -> np.ndarray:
  """Which position axis (0 t, 1 h, 2 w) each frequency of the rotary half follows. -> int [head_dim/2].

  Blocks (Qwen2.5-VL): the first `mrope_section[0]` frequencies follow t, the next h, the last w.
  Interleaved (Qwen3-VL): frequency j follows h when j % 3 == 1 and j < 3 * section[1], w when
  j % 3 == 2 and j < 3 * section[2], else t, so every axis spans low and high frequencies.
  """
  if not interleaved:
    return np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
  j = np.arange(sum(mrope_section))
  axes = np.zeros_like(j)
  for axis in (1, 2):
    axes[(j % 3 == axis) & (j < 3 * mrope_section[axis])] = axis
  return axes


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...],
                  interleaved: bool = False) -> tuple[jax.Array, jax.Array]:
  """positions int [3, batch, seq] -> cos, sin fp32 [batch, seq, head_dim].

  Frequency j of the rotary half uses the temporal, height or width position given by `mrope_axes`;
  both halves use the same layout.
  """
  inv_freq = inverse_frequencies(head_dim, theta)                                   # [head_dim/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq                       # [3, batch, seq, head_dim/2]
  axis_of_freq = mrope_axes(mrope_section, interleaved)                             # [head_dim/2]
  # A gather, not a one-hot matmul: TPU matmuls may run in bf16 and positions need full precision.
  freqs = freqs[axis_of_freq, :, :, np.arange(len(axis_of_freq))]                   # [head_dim/2, batch, seq]
  freqs = jnp.moveaxis(freqs, 0, -1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def text_cos_sin(cfg, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The decoder's rotary tables for a `TextConfig`: positions int [3, batch, seq] -> [batch, seq, head_dim]."""
  return mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved)


def vision_cos_sin(patch_positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """patch_positions int [patches, 2] (row, col) -> cos, sin fp32 [patches, head_dim]."""
  inv_freq = inverse_frequencies(head_dim // 2, theta)                              # [head_dim/4]
  freqs = patch_positions.astype(jnp.float32)[..., None] * inv_freq                 # [patches, 2, head_dim/4]
  freqs = freqs.reshape(freqs.shape[0], -1)                                         # rows' then cols' freqs
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)
