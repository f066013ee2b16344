"""Qwen2.5-VL vision tower: patch embedding, 2-D RoPE, window / full attention blocks, 2x2 patch merger.

Several images of different sizes go through one call as one flat sequence of patches. Which patches
may attend to which is data (segment ids computed on the host from the grid shapes), so there is no
Python loop over images inside jit and one compiled program serves any mix of images with the same
total patch count (pad with `VisionInputs.build(..., pad_to=...)` to bucket the count).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mini_o3_jax.model import attention, layers, rope
from mini_o3_jax.model.config import Qwen3VisionConfig, VisionConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionInputs:
  """Host-computed layout of a batch of images, in the tower's window-major patch order.

  patch_positions int32 [patches, 2]: (row, col) of each patch, window-major order.
  window_index int32 [patches/unit]: merge-unit permutation, processor order -> window-major order.
  reverse_index int32 [patches/unit]: its inverse (applied to the merged tokens).
  window_segments int32 [patches]: id of the attention window of each patch (window-major order).
  image_segments int32 [patches]: id of the image frame of each patch (window-major order).
  table_index int32 [patches, 4], table_weight float32 [patches, 4]: Qwen3-VL only (else None), the
    bilinear taps that resample its learned position table to each grid (`rope.position_table_taps`).

  Qwen3-VL has no windows: its window order is the processor order (identity permutations).
  """
  patch_positions: jax.Array
  window_index: jax.Array
  reverse_index: jax.Array
  window_segments: jax.Array
  image_segments: jax.Array
  table_index: jax.Array | None = None
  table_weight: jax.Array | None = None

  @property
  def num_patches(self) -> int:
    return self.patch_positions.shape[0]

  @classmethod
  def build(cls, grid_thw: np.ndarray, cfg: VisionConfig | Qwen3VisionConfig, pad_to: int | None = None) -> VisionInputs:
    """Computes the layout for images with `grid_thw` int [images, 3]; optionally pads to `pad_to` patches.

    Padding patches form their own segment, so they never mix with real ones; the merged tokens they
    produce come last and are ignored by the caller.
    """
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    if np.any(grid_thw[:, 1:] % m):
      raise ValueError(f"grid_thw {grid_thw.tolist()} has h or w not divisible by spatial_merge_size {m}")
    n = int(np.prod(grid_thw, -1).sum())
    if isinstance(cfg, Qwen3VisionConfig):
      return cls._build_unwindowed(grid_thw, cfg, n, pad_to)
    window_index, window_of_unit = _window_layout(grid_thw, m, cfg.window_merged)
    positions = rope.vision_patch_positions(grid_thw, m)
    frame_of_patch = np.repeat(np.arange(int(grid_thw[:, 0].sum())),
                               np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]))
    if pad_to is not None and pad_to < n:
      raise ValueError(f"pad_to={pad_to} is smaller than the {n} patches of these images")
    total = n if pad_to is None else pad_to
    if total % unit:
      raise ValueError(f"patch count {total} must be a multiple of {unit}")
    n_units, pad_units = n // unit, (total - n) // unit
    window_index = np.concatenate([window_index, n_units + np.arange(pad_units)])
    pad_seg = -1  # one segment for all padding patches
    window_of_unit = np.concatenate([window_of_unit, np.full(pad_units, pad_seg)])
    frame_of_unit = np.concatenate([frame_of_patch[::unit], np.full(pad_units, pad_seg)])
    positions = np.concatenate([positions, np.zeros((total - n, 2), positions.dtype)])
    # Everything below is in window-major order.
    positions = positions.reshape(-1, unit, 2)[window_index].reshape(-1, 2)
    window_segments = np.repeat(window_of_unit, unit)  # window_of_unit is already window-major
    image_segments = np.repeat(frame_of_unit[window_index], unit)
    return cls(
        patch_positions=positions.astype(np.int32),
        window_index=window_index.astype(np.int32),
        reverse_index=np.argsort(window_index).astype(np.int32),
        window_segments=window_segments.astype(np.int32),
        image_segments=image_segments.astype(np.int32),
    )


  @classmethod
  def _build_unwindowed(cls, grid_thw: np.ndarray, cfg: Qwen3VisionConfig, n: int, pad_to: int | None) -> VisionInputs:
    total = n if pad_to is None else pad_to
    if total < n:
      raise ValueError(f"pad_to={pad_to} is smaller than the {n} patches of these images")
    if total % cfg.merge_unit:
      raise ValueError(f"patch count {total} must be a multiple of {cfg.merge_unit}")
    pad = total - n
    frames = np.repeat(np.arange(int(grid_thw[:, 0].sum())),
                       np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]))
    segments = np.concatenate([frames, np.full(pad, -1)]).astype(np.int32)
    positions = np.concatenate([rope.vision_patch_positions(grid_thw, cfg.spatial_merge_size),
                                np.zeros((pad, 2), np.int32)]).astype(np.int32)
    index, weight = rope.position_table_taps(grid_thw, cfg.grid_per_side, cfg.spatial_merge_size)
    units = np.arange(total // cfg.merge_unit, dtype=np.int32)
    return cls(patch_positions=positions, window_index=units, reverse_index=units, window_segments=segments,
               image_segments=segments,
               table_index=np.concatenate([index, np.zeros((pad, 4), np.int32)]),
               table_weight=np.concatenate([weight, np.zeros((pad, 4), np.float32)]))


def _window_layout(grid_thw: np.ndarray, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Merge-unit permutation into windows of `window x window` units, and each unit's window id.

  Windows tile every frame from the top-left; edge windows are partial. Matches the reference's
  `get_window_index` (empty windows produce no units, so they vanish).
  """
  index, window_id = [], []
  offset, next_window = 0, 0
  for t, h, w in grid_thw:
    lh, lw = h // merge, w // merge
    nwh, nww = -(-lh // window), -(-lw // window)
    units = np.arange(t * lh * lw).reshape(t, lh, lw)
    padded = np.full((t, nwh * window, nww * window), -1)
    padded[:, :lh, :lw] = units
    padded = padded.reshape(t, nwh, window, nww, window).transpose(0, 1, 3, 2, 4).reshape(t * nwh * nww, -1)
    wid = np.broadcast_to(np.arange(t * nwh * nww)[:, None], padded.shape)
    keep = padded >= 0
    index.append(padded[keep] + offset)
    window_id.append(wid[keep] + next_window)
    offset += t * lh * lw
    next_window += t * nwh * nww
  if not index:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
  return np.concatenate(index), np.concatenate(window_id)


def _attention_runs(depth: int, full_blocks) -> list[tuple[int, int, bool]]:
  """[(start, stop, is_full)] covering 0..depth in runs of equal attention kind."""
  kinds = [i in set(full_blocks) for i in range(depth)]
  runs, start = [], 0
  for i in range(1, depth + 1):
    if i == depth or kinds[i] != kinds[start]:
      runs.append((start, i, kinds[start]))
      start = i
  return runs


def rotary_qkv(qkv: jax.Array, num_heads: int, cos: jax.Array, sin: jax.Array):
  """A fused projection [patches, 3 * dim] -> rotated q, k and v, each [patches, heads, head_dim]."""
  n = qkv.shape[0]
  qkv = qkv.reshape(n, 3, num_heads, -1)
  q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
  return layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin), v


class VisionBlock(nnx.Module):
  """Pre-norm ViT block; built with `stack=depth` it holds every block's parameters."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype, stack: int | None = None,
               attention_impl: str = "auto", attention_block: int = 512):
    d = cfg.hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=stack, std=cfg.initializer_range)
    self.norm1 = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack)
    self.norm2 = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack)
    self.qkv = layers.Linear(d, 3 * d, axes=("embed", "qkv"), bias=True, **kw)
    self.proj = layers.Linear(d, d, axes=("qkv", "embed"), bias=True, **kw)
    self.mlp = layers.GatedMLP(d, cfg.intermediate_size, act=cfg.hidden_act, bias=True, **kw)
    self.num_heads = cfg.num_heads
    self.attention_impl = attention.check_impl(attention_impl)
    self.attention_block = attention_block

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, full: bool, image_segments: jax.Array,
               window_segments: jax.Array, window_block: int) -> jax.Array:
    """x [patches, dim]; cos/sin [patches, head_dim]; full: static bool, full (per image) or window attention.

    Window attention is blocked (`attention.local_segment_attention`, linear in the patch count); full
    attention is within each image frame (`attention.self_attention`, `attention_impl`).
    """
    n, d = x.shape
    q, k, v = rotary_qkv(self.qkv(self.norm1(x)), self.num_heads, cos, sin)

    def full_attention(q, k, v):
      return attention.self_attention(q[None], k[None], v[None], image_segments[None], causal=False,
                                      impl=self.attention_impl, block=self.attention_block)[0]

    def window_attention(q, k, v):
      return attention.local_segment_attention(q, k, v, window_segments, window_block)

    attn = full_attention(q, k, v) if full else window_attention(q, k, v)
    x = x + self.proj(attn.reshape(n, d))
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then an MLP over each 2x2 block of neighbouring patches -> one LLM token."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    d, hidden = cfg.hidden_size, cfg.hidden_size * cfg.merge_unit
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=cfg.initializer_range)
    self.ln_q = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp_0 = layers.Linear(hidden, hidden, axes=("merger", "mlp"), bias=True, **kw)
    self.mlp_2 = layers.Linear(hidden, cfg.out_hidden_size, axes=("mlp", "embed"), bias=True, **kw)
    self.hidden = hidden

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.ln_q(x).reshape(-1, self.hidden)
    return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class VisionTower(nnx.Module):
  """pixel_values [patches, patch_dim] -> image token embeddings [patches / 4, out_hidden_size]."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: str = "none", attention_impl: str = "auto", attention_block: int = 512):
    self.cfg = cfg
    self.patch_embed = layers.Linear(cfg.patch_dim, cfg.hidden_size, axes=("patch", "embed"), bias=False,
                                     rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=cfg.initializer_range)
    self.blocks = VisionBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=cfg.depth,
                              attention_impl=attention_impl, attention_block=attention_block)
    self.merger = PatchMerger(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if cfg.position_table:
      init = jax.nn.initializers.normal(cfg.initializer_range)
      self.row_embed = nnx.Param(init(rngs.params(), (cfg.position_table, cfg.hidden_size), param_dtype))
      self.col_embed = nnx.Param(init(rngs.params(), (cfg.position_table, cfg.hidden_size), param_dtype))
    self.remat = remat

  def __call__(self, pixel_values: jax.Array, inputs: VisionInputs) -> jax.Array:
    cfg = self.cfg
    n, unit = pixel_values.shape[0], cfg.merge_unit
    x = self.patch_embed(pixel_values)                                                  # [patches, dim]
    x = x.reshape(n // unit, unit, -1)[inputs.window_index].reshape(n, -1)             # window-major
    if cfg.position_table:
      rows, cols = inputs.patch_positions[:, 0], inputs.patch_positions[:, 1]
      x = x + (self.row_embed[...][rows] + self.col_embed[...][cols]).astype(x.dtype)
    if cfg.position_sincos:
      code = position_code(inputs.patch_positions[:, 0], inputs.patch_positions[:, 1], x.shape[-1], PATCH_CODE_PERIOD)
      x = x + (cfg.position_sincos * code).astype(x.dtype)
    cos, sin = rope.vision_cos_sin(inputs.patch_positions, cfg.head_dim, cfg.rope_theta)
    window_block = cfg.window_merged**2 * unit  # the largest possible window, in patches
    # Runs of consecutive blocks with the same attention kind, each one scan with a static kind, so
    # window layers never build a [patches, patches] mask.
    for start, stop, full in _attention_runs(cfg.depth, cfg.fullatt_block_indexes):

      def body(block, x, _, full=full):
        return block(x, cos, sin, full, inputs.image_segments, inputs.window_segments, window_block), None

      x, _ = layers.scan_layers(self.blocks, body, x, None, remat=self.remat, layer_slice=slice(start, stop))
    merged = self.merger(x)[inputs.reverse_index]                                       # [patches/4, out]
    if cfg.output_centre or cfg.output_rms or cfg.output_position_code:
      merged = _normalise_output(merged, inputs, cfg)
    return merged


# The patch-level sin-cos code's longest period, in patches (`position_sincos`, `sincos_position_table`).
PATCH_CODE_PERIOD = 10.0


def position_code(rows: jax.Array, cols: jax.Array, dim: int, max_period: float = 4.0) -> jax.Array:
  """A fixed 2-D sin-cos code [n, dim] of integer cells: sin / cos of rows, then of cols, at dim / 4
  frequencies from pi to pi / max_period per cell (zero-padded to `dim`)."""
  q = dim // 4
  freqs = jnp.pi * jnp.exp(-jnp.log(max_period) * jnp.arange(q) / max(q - 1, 1))
  r = rows[:, None].astype(jnp.float32) * freqs
  c = cols[:, None].astype(jnp.float32) * freqs
  code = jnp.concatenate([jnp.sin(r), jnp.cos(r), jnp.sin(c), jnp.cos(c)], -1)
  return jnp.pad(code, ((0, 0), (0, dim - code.shape[-1])))


def sincos_position_table(side: int, dim: int, max_period: float = PATCH_CODE_PERIOD) -> jax.Array:
  """`position_code` of every cell of a side x side grid, row-major [side * side, dim]: a Qwen3-VL position
  table that gives a grid of side x side patches the Qwen2.5-VL tower's `position_sincos` code exactly
  (the table's bilinear taps fall on its entries) and other grids the code stretched to them."""
  rows, cols = jnp.divmod(jnp.arange(side * side), side)
  return position_code(rows, cols, dim, max_period)


def _normalise_output(merged: jax.Array, inputs: VisionInputs, cfg: VisionConfig) -> jax.Array:
  """The experimental output options (`VisionConfig.output_*`) on image tokens [tokens, out] in
  processor order: statistics per image frame, so images in one call never mix."""
  unit = cfg.merge_unit
  frame = inputs.image_segments[::unit][inputs.reverse_index]                        # [tokens]
  same = (frame[:, None] == frame[None, :]).astype(jnp.float32)                     # [tokens, tokens]
  count = jnp.maximum(same.sum(-1, keepdims=True), 1.0)
  x = merged.astype(jnp.float32)
  if cfg.output_centre:
    x = x - same @ x / count
  if cfg.output_rms:
    ms = same @ jnp.mean(jnp.square(x), -1, keepdims=True) / count
    x = x * (cfg.output_rms * jax.lax.rsqrt(ms + 1e-8))
  if cfg.output_position_code:
    cell = inputs.patch_positions[::unit][inputs.reverse_index] // cfg.spatial_merge_size  # [tokens, 2]
    x = x + cfg.output_position_code * position_code(cell[:, 0], cell[:, 1], x.shape[-1]) / np.sqrt(x.shape[-1])
  return x.astype(merged.dtype)


# ------------------------------------------------------------------------------------ Qwen3-VL

class Qwen3VisionBlock(nnx.Module):
  """Pre-LayerNorm ViT block with full attention within each image; `stack=depth` holds every block."""

  def __init__(self, cfg: Qwen3VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype, stack: int | None = None,
               attention_impl: str = "auto", attention_block: int = 512):
    d = cfg.hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=stack, std=cfg.initializer_range)
    self.norm1 = layers.LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype, stack=stack)
    self.norm2 = layers.LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype, stack=stack)
    self.qkv = layers.Linear(d, 3 * d, axes=("embed", "qkv"), bias=True, **kw)
    self.proj = layers.Linear(d, d, axes=("qkv", "embed"), bias=True, **kw)
    self.mlp = layers.MLP(d, cfg.intermediate_size, act=cfg.hidden_act, **kw)
    self.num_heads = cfg.num_heads
    self.attention_impl = attention.check_impl(attention_impl)
    self.attention_block = attention_block

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, image_segments: jax.Array) -> jax.Array:
    """x [patches, dim]; cos/sin [patches, head_dim]; image_segments int [patches]."""
    n, d = x.shape
    q, k, v = rotary_qkv(self.qkv(self.norm1(x)), self.num_heads, cos, sin)
    attn = attention.self_attention(q[None], k[None], v[None], image_segments[None], causal=False,
                                    impl=self.attention_impl, block=self.attention_block)[0]
    x = x + self.proj(attn.reshape(n, d))
    return x + self.mlp(self.norm2(x))


class Qwen3PatchMerger(nnx.Module):
  """LayerNorm (per patch, or after the 2x2 shuffle for DeepStack), then a GELU MLP -> one LLM token."""

  def __init__(self, cfg: Qwen3VisionConfig, *, postshuffle_norm: bool, rngs: nnx.Rngs, dtype, param_dtype,
               stack: int | None = None):
    d, hidden = cfg.hidden_size, cfg.hidden_size * cfg.merge_unit
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=cfg.initializer_range, stack=stack)
    self.norm = layers.LayerNorm(hidden if postshuffle_norm else d, eps=cfg.layer_norm_eps,
                                 param_dtype=param_dtype, stack=stack)
    self.linear_fc1 = layers.Linear(hidden, hidden, axes=("merger", "mlp"), bias=True, **kw)
    self.linear_fc2 = layers.Linear(hidden, cfg.out_hidden_size, axes=("mlp", "embed"), bias=True, **kw)
    self.hidden, self.postshuffle_norm = hidden, postshuffle_norm

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [patches, dim] -> [patches / 4, out_hidden_size]."""
    x = self.norm(x.reshape(-1, self.hidden)) if self.postshuffle_norm else self.norm(x).reshape(-1, self.hidden)
    return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class Qwen3VisionTower(nnx.Module):
  """pixel_values [patches, patch_dim] -> image tokens [patches / 4, out_hidden_size * (1 + deepstack)].

  Each token's embedding comes first on the last axis, then one DeepStack feature per entry of
  `deepstack_visual_indexes` (the merged output of that block), which the decoder adds to its hidden
  states after its first layers.
  """

  def __init__(self, cfg: Qwen3VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: str = "none", attention_impl: str = "auto", attention_block: int = 512):
    self.cfg = cfg
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch_embed = layers.Linear(cfg.patch_dim, cfg.hidden_size, axes=("patch", "embed"), bias=True,
                                     std=cfg.initializer_range, **kw)
    self.pos_embed = layers.param(rngs, (cfg.num_position_embeddings, cfg.hidden_size), ("table", "embed"),
                                  param_dtype, std=cfg.initializer_range)
    self.blocks = Qwen3VisionBlock(cfg, stack=cfg.depth, attention_impl=attention_impl,
                                   attention_block=attention_block, **kw)
    self.merger = Qwen3PatchMerger(cfg, postshuffle_norm=False, **kw)
    self.deepstack_merger_list = (Qwen3PatchMerger(cfg, postshuffle_norm=True, stack=cfg.deepstack_levels, **kw)
                                  if cfg.deepstack_levels else None)
    self.remat = remat

  def __call__(self, pixel_values: jax.Array, inputs: VisionInputs) -> jax.Array:
    cfg = self.cfg
    x = self.patch_embed(pixel_values)                                                  # [patches, dim]
    table = self.pos_embed[...][inputs.table_index]                                     # [patches, 4, dim]
    x = x + jnp.einsum("pk,pkd->pd", inputs.table_weight, table.astype(jnp.float32)).astype(x.dtype)
    cos, sin = rope.vision_cos_sin(inputs.patch_positions, cfg.head_dim, cfg.rope_theta)

    def body(block, x, _):
      return block(x, cos, sin, inputs.image_segments), None

    features, start = [], 0
    for stop in (*(i + 1 for i in cfg.deepstack_visual_indexes), cfg.depth):
      if stop > start:
        x, _ = layers.scan_layers(self.blocks, body, x, None, remat=self.remat, layer_slice=slice(start, stop))
      features.append(x)
      start = stop
    merged = self.merger(x)                                                             # [patches/4, out]
    if not cfg.deepstack_levels:
      return merged
    _, deep = layers.scan_layers(self.deepstack_merger_list, lambda m, c, f: (c, m(f)), None,
                                 jnp.stack(features[:-1]))                              # [levels, patches/4, out]
    return jnp.concatenate([merged, *deep], axis=-1)
