"""A jnp reference of the per-row batch layout (`train.batch.collate_sft`'s, built independently), for
tests: each row's images encoded separately, a vmap over rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mini_o3_jax.model.config import VLMConfig
from mini_o3_jax.model import rope
from mini_o3_jax.model.vision import VisionInputs
from mini_o3_jax.model.vlm import ModelInputs


def prepare_row_inputs(config: VLMConfig, input_ids, attention_mask, row_pixel_values, row_grids, *,
                       pad_patches_to: int) -> tuple[ModelInputs, np.ndarray]:
  """Host side, per-row images: the layout data-parallel training and the sampler use.

  Each row's images are encoded separately (a vmap over rows), so a batch sharded over rows keeps its
  images on the same device as its tokens.

  Args:
    input_ids, attention_mask: [batch, seq].
    row_pixel_values: per row, float [patches_r, patch_dim] (or None / empty for a text-only row).
    row_grids: per row, int [images_r, 3] (or None / empty).
    pad_patches_to: patches per row after padding (a bucket size >= every row's patch count).

  Returns inputs with pixel_values [batch, pad_patches_to, patch_dim] and a VisionInputs whose arrays
  have a leading batch axis, plus the rope deltas [batch].
  """
  input_ids = np.asarray(input_ids)
  b = input_ids.shape[0]
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  if len(row_pixel_values) != b or len(row_grids) != b:
    raise ValueError(f"need pixel values and grids for each of the {b} rows")
  merge, unit = config.vision.spatial_merge_size, config.vision.merge_unit
  if pad_patches_to % unit:
    raise ValueError(f"pad_patches_to={pad_patches_to} must be a multiple of {unit}")
  positions = np.zeros((3,) + input_ids.shape, np.int32)
  deltas = np.zeros((b,), np.int32)
  pixels = np.zeros((b, pad_patches_to, config.vision.patch_dim), np.float32)
  visions = []
  for r in range(b):
    grid = np.zeros((0, 3), np.int64) if row_grids[r] is None else np.asarray(row_grids[r], np.int64).reshape(-1, 3)
    n_tokens = int(((input_ids[r] == config.image_token_id) & (mask[r] != 0)).sum())
    expected = int(rope.image_token_counts(grid, merge).sum())
    if n_tokens != expected:
      raise ValueError(f"row {r}: {n_tokens} image tokens in input_ids but {expected} from its grids")
    n = int(np.prod(grid, -1).sum())
    if n > pad_patches_to:
      raise ValueError(f"row {r} has {n} patches, more than pad_patches_to={pad_patches_to}")
    if n:
      pv = np.asarray(row_pixel_values[r], np.float32)
      if pv.shape != (n, config.vision.patch_dim):
        raise ValueError(f"row {r}: pixel_values shape {pv.shape} does not match its grids ({n} patches)")
      pixels[r, :n] = pv
    pos, delta = rope.get_rope_index(input_ids[r:r + 1], grid if n else None, mask[r:r + 1],
                                     image_token_id=config.image_token_id, spatial_merge_size=merge)
    positions[:, r:r + 1], deltas[r] = pos, delta[0]
    visions.append(VisionInputs.build(grid, config.vision, pad_to=pad_patches_to))
  vision = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *visions)
  return ModelInputs(jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(positions),
                     jnp.asarray(pixels), vision), deltas
