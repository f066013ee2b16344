"""Qwen2.5-VL and Qwen3-VL: the vision tower's tokens scattered into the token stream, the decoder, the head.

One class serves both families (the config's `vision` type picks the tower; the text switches pick the
decoder's details). `VLM.__call__` takes exactly what `transformers.Qwen2_5_VLForConditionalGeneration`
(or `Qwen3VLForConditionalGeneration`) takes and
computes the host-side pieces (M-RoPE positions, vision layout) itself, so it is the easy, eager API.
Jitted code (training steps, the sampler) calls `prepare_inputs` on the host once and then the pure
array methods `encode_images` / `forward` (the sampler decodes over its own cache, `sampler.decoder`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mini_o3_jax.model.config import Qwen3VisionConfig, VLMConfig
from mini_o3_jax.model import layers, rope
from mini_o3_jax.model.text import TextModel
from mini_o3_jax.model.vision import Qwen3VisionTower, VisionInputs, VisionTower


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
  """Everything one forward needs, as arrays (jit-friendly).

  input_ids int32 [batch, seq]; attention_mask int32 [batch, seq]; positions int32 [3, batch, seq];
  pixel_values float [patches, patch_dim] or None; vision: VisionInputs or None.
  """
  input_ids: jax.Array
  attention_mask: jax.Array
  positions: jax.Array
  pixel_values: jax.Array | None = None
  vision: VisionInputs | None = None


def check_token_ids(ids, vocab_size: int, name: str = "input_ids") -> None:
  """Raises ValueError if a token id lies outside [0, vocab_size), padding included.

  Inside the model such an id is no error: a negative one wraps, one past the end gathers NaN, which
  attention spreads over the whole row even where the mask hides it. Called where ids enter from the host.
  """
  ids = np.asarray(ids)
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{name} holds {int(bad.sum())} token id(s) outside the vocabulary [0, {vocab_size}): "
                     f"{int(ids[where])} at position {where}; were the ids made by another tokenizer?")


def prepare_inputs(config: VLMConfig, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None, *, pad_patches_to: int | None = None) -> tuple[ModelInputs, np.ndarray]:
  """Host side: M-RoPE positions and the vision layout for a batch. Returns (inputs, rope_deltas [batch])."""
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
  check_token_ids(input_ids, config.text.vocab_size)
  n_image_tokens = int(((input_ids == config.image_token_id) & (mask != 0)).sum())
  if (pixel_values is None) != (image_grid_thw is None):
    raise ValueError("pixel_values and image_grid_thw must be given together")
  if image_grid_thw is None:
    if n_image_tokens:
      raise ValueError(f"input_ids hold {n_image_tokens} image tokens but no pixel_values were given")
    positions, deltas = rope.get_rope_index(input_ids, None, mask, image_token_id=config.image_token_id,
                                            spatial_merge_size=config.vision.spatial_merge_size)
    return ModelInputs(jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                       jnp.asarray(positions)), deltas
  grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  pixel_values = np.asarray(pixel_values) if not isinstance(pixel_values, jax.Array) else pixel_values
  n_patches = int(np.prod(grid, -1).sum())
  if pixel_values.shape != (n_patches, config.vision.patch_dim):
    raise ValueError(f"pixel_values shape {tuple(pixel_values.shape)} does not match image_grid_thw "
                     f"({n_patches} patches of {config.vision.patch_dim})")
  expected = int(rope.image_token_counts(grid, config.vision.spatial_merge_size).sum())
  if n_image_tokens != expected:
    raise ValueError(f"Image features and image tokens do not match: {n_image_tokens} image tokens in "
                     f"input_ids, {expected} from image_grid_thw")
  positions, deltas = rope.get_rope_index(input_ids, grid, mask, image_token_id=config.image_token_id,
                                          spatial_merge_size=config.vision.spatial_merge_size)
  vision = VisionInputs.build(grid, config.vision, pad_to=pad_patches_to)
  pv = jnp.asarray(pixel_values)
  if pad_patches_to is not None and pad_patches_to > n_patches:
    pv = jnp.concatenate([pv, jnp.zeros((pad_patches_to - n_patches, pv.shape[1]), pv.dtype)])
  return ModelInputs(jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(positions),
                     pv, jax.tree.map(jnp.asarray, vision)), deltas


def scatter_image_embeds(token_embeds: jax.Array, is_image: jax.Array, image_embeds: jax.Array) -> jax.Array:
  """Replaces image-placeholder embeddings, in order, by the image tokens.

  token_embeds [batch, seq, dim]; is_image bool [batch, seq]; image_embeds [n, dim] with n >= the number
  of placeholders (extra rows, e.g. from padded patches, are unused).
  """
  b, t, d = token_embeds.shape
  flat = is_image.reshape(-1)
  idx = jnp.clip(jnp.cumsum(flat) - 1, 0, max(image_embeds.shape[0] - 1, 0))
  gathered = jnp.take(image_embeds, idx, axis=0).astype(token_embeds.dtype).reshape(b, t, d)
  return jnp.where(is_image[..., None], gathered, token_embeds)


class VLM(nnx.Module):
  """Qwen2.5-VL or Qwen3-VL for conditional generation (logits over the vocabulary)."""

  def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    tower = Qwen3VisionTower if isinstance(config.vision, Qwen3VisionConfig) else VisionTower
    run = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=config.remat, attention_impl=config.attention,
               attention_block=config.attention_block)
    self.visual = tower(config.vision, **run)
    self.model = TextModel(config.text, **run)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = layers.Linear(config.text.hidden_size, config.text.vocab_size, axes=("embed", "vocab"),
                                   bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                   std=config.text.initializer_range)

  # ------------------------------------------------------------------ eager, HF-shaped API

  def __call__(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None) -> jax.Array:
    """Logits [batch, seq, vocab]; arguments mean what they mean in `transformers`."""
    if isinstance(image_grid_thw, jax.core.Tracer) or isinstance(input_ids, jax.core.Tracer):
      raise TypeError("VLM.__call__ computes positions on the host; under jit call "
                      "prepare_inputs(...) outside and model.forward(inputs) inside")
    inputs, _ = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw)
    return _jit_forward(self, inputs)

  # ------------------------------------------------------------------ array API (jit-able)

  def encode_images(self, pixel_values: jax.Array, vision: VisionInputs) -> jax.Array:
    """[patches, patch_dim] -> image token embeddings [patches / 4, hidden * config.embed_levels].

    Qwen3-VL's tokens carry their DeepStack features after the embedding on the last axis, so code that
    moves image tokens around (batching, the sampler's slots) treats both families alike.

    With per-row images (pixel_values [batch, patches, patch_dim], vision arrays with a leading batch
    axis, the layout of `train.batch`) -> [batch, patches / 4, hidden].
    """
    if pixel_values.ndim == 3:
      graphdef, state = nnx.split(self.visual)
      return jax.vmap(lambda pv, vi: nnx.merge(graphdef, state)(pv, vi))(pixel_values, vision)
    return self.visual(pixel_values, vision)

  def embed(self, input_ids: jax.Array, image_embeds: jax.Array | None = None) -> jax.Array:
    """Token embeddings with image placeholders replaced, in order, by `image_embeds`.

    image_embeds: [n, hidden * levels] consumed across the whole batch in row-major order, or per row
    [batch, n, hidden * levels]. With DeepStack levels the result is [batch, seq, hidden * levels]
    (zeros past `hidden` for text tokens), which the decoder splits (`text.split_deepstack`).
    """
    x = self.model.embed_tokens(input_ids)
    if image_embeds is not None:
      if image_embeds.shape[-1] > x.shape[-1]:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, image_embeds.shape[-1] - x.shape[-1])))
      is_image = input_ids == self.config.image_token_id
      if image_embeds.ndim == 3:
        x = jax.vmap(lambda xr, mr, er: scatter_image_embeds(xr[None], mr[None], er)[0])(x, is_image, image_embeds)
      else:
        x = scatter_image_embeds(x, is_image, image_embeds)
    return x

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.lm_head is None:
      return self.model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def hidden_states(self, inputs: ModelInputs) -> jax.Array:
    """Final-norm hidden states [batch, seq, hidden] of a full causal forward."""
    image_embeds = None
    if inputs.pixel_values is not None:
      image_embeds = self.encode_images(inputs.pixel_values, inputs.vision)
    x = self.embed(inputs.input_ids, image_embeds)
    return self.model(x, inputs.positions, inputs.attention_mask)

  def forward(self, inputs: ModelInputs) -> jax.Array:
    return self.logits(self.hidden_states(inputs))


# The names users knew first; one class describes both families.
Qwen25VL = VLM
Qwen3VL = VLM


@nnx.jit
def _jit_forward(model: VLM, inputs: ModelInputs) -> jax.Array:
  return model.forward(inputs)


def random_model(config: VLMConfig, seed: int = 0, std: float = 0.05) -> VLM:
  """A model with random weights drawn on the host: N(0, std), norm scales 1 + N(0, 2*std).

  For tests and benchmarks: eager `nnx` init runs hundreds of tiny compiled ops; this fills the abstract
  state from one numpy generator instead (same values for the same seed, whatever the backend).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VLM(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = "/".join(str(p) for p in path)
    if ("norm" in name or "ln_q" in name) and not name.endswith("bias"):
      return jnp.asarray(1.0 + 2 * std * rng.standard_normal(x.shape), x.dtype)
    return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
