"""Feature targets for the vision tower: image tokens a tiny decoder can bind a question to (issue 13).

The tiny base learns to answer "where is the <colour shape>?" only when its image tokens are built like
this (docs/miniature.md, sessions 10-11): a token that holds a shape carries its own position and its
colour, and a canvas token carries nothing. So the base's recipe first trains the tower alone to emit,
for each merged token,

  target = s * (position_scale * code(row, col) / sqrt(d) + object_scale * u + colour_scale * v[colour]
                + shape_scale * w[shape])

(with `shape_by_saliency` off the shape term is added outside the factor s: a shape's kind does not fade
towards its edges as its saliency does), plus digit_scale * z[digit] on the token holding the centre of a
legible label's digit (a read crop's: the decoder's `read` questions need the digit, which nothing else in
the target keeps) and label_scale * (l + 2 dx l_x + 2 dy l_y) on the token holding the centre of a label too small to
read (a zoom's window or object view: where to zoom next; (dx, dy) where in the token it lies, the precision a
legible crop of it needs) and centre_scale * (c + 2 dx c_x + 2 dy c_y) on the token holding a shape's centre (where
in that token the centre lies: a crop around the shape needs its place finer than a token), with s the token's
saliency within its colour and `colour` its
palette colour (both from its pixels, `processing.image.token_colours`), code the fixed 2-D sin-cos code of
its cell (`model.vision.position_code`), u a fixed "object" direction, v[k] a fixed unit direction per
palette colour and w[k] one per shape kind (the kind of the scene's shape that covers most of the token, or
whose centre it holds; no term where none does; `pretrain_vision.targets.shape_tokens`). The
loss is the squared error summed over the hidden size, relative to the targets' mean squared norm, and
averaged over real image tokens; the decoder then trains on the frozen tower (`pretrain_vision` stage,
`pipeline/pretrain_stage.py`).

These targets are world knowledge of the synthetic scenes (their palette), a training aid for the
miniature only: the 7B recipe starts from a tower that has learnt to see already.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mini_o3_jax.model import vision as vision_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import state as state_lib
from mini_o3_jax.train.state import Metrics, Params, TrainState


NUM_DIGITS = 10


@dataclasses.dataclass(frozen=True)
class FeatureTargetConfig:
  """The target's parts (module docstring): scales of the position code, the object direction, the
  colour direction, the shape-kind direction (0 = no shape term), the digit's (0 = none), the small label's
  and the shape centre's (0 = none); whether the
  shape term too is scaled by the token's saliency (else it is whole wherever a kind is given); the seeds
  of the fixed directions; the palette size and the number of shape kinds."""
  num_colours: int
  num_shapes: int = 0
  position_scale: float = 0.5
  object_scale: float = 0.4
  colour_scale: float = 0.4
  shape_scale: float = 0.0
  shape_by_saliency: bool = True
  digit_scale: float = 0.0
  label_scale: float = 0.0
  centre_scale: float = 0.0
  object_seed: int = 7
  colour_seed: int = 11
  shape_seed: int = 13
  digit_seed: int = 17
  label_seed: int = 19
  centre_seed: int = 23


def object_direction(dim: int, seed: int) -> jax.Array:
  """float32 [dim], norm ~1: the fixed direction every shape token shares (a draw scaled by 1 / sqrt(dim), not
  normalised like `train.sft.objectness_direction`: the measured recipe's target, docs/miniature.md session 11)."""
  return jax.random.normal(jax.random.PRNGKey(seed), (dim,), jnp.float32) / math.sqrt(dim)


def unit_directions(num: int, dim: int, seed: int) -> jax.Array:
  """float32 [num, dim], unit rows: one fixed direction per palette colour (or shape kind)."""
  v = jax.random.normal(jax.random.PRNGKey(seed), (num, dim), jnp.float32)
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def feature_targets(saliency: jax.Array, colour: jax.Array, cells: jax.Array, dim: int,
                    config: FeatureTargetConfig, shape: jax.Array | None = None,
                    digit: jax.Array | None = None, label: jax.Array | None = None,
                    centre: jax.Array | None = None) -> jax.Array:
  """float32 [batch, tokens, dim] targets (module docstring) from saliency float [batch, tokens] (< 0 on
  padding, treated as 0), colour int [batch, tokens], cells int [batch, tokens, 2] (row, column), with
  `shape_scale` shape int [batch, tokens] (-1: no shape covers the token) and with `digit_scale` digit int
  [batch, tokens] (-1: no legible digit's centre), with `label_scale` label and with `centre_scale` centre, float
  [batch, tokens, 3] ((1, dx, dy) where a small label's or a shape's centre lies, 0 elsewhere: `point_term`)."""
  s = jnp.maximum(saliency.astype(jnp.float32), 0.0)[..., None]                    # [b, t, 1]
  b, t = saliency.shape
  code = vision_lib.position_code(cells[..., 0].reshape(-1), cells[..., 1].reshape(-1), dim).reshape(b, t, dim)
  colours = unit_directions(config.num_colours, dim, config.colour_seed)[jnp.clip(colour, 0)]  # [b, t, dim]
  out = s * (config.position_scale * code / math.sqrt(dim)
             + config.object_scale * object_direction(dim, config.object_seed) + config.colour_scale * colours)
  if config.shape_scale:
    if shape is None:
      raise ValueError("shape_scale > 0 needs each token's shape kind")
    kinds = unit_directions(config.num_shapes, dim, config.shape_seed)[jnp.clip(shape, 0)]       # [b, t, dim]
    # the saliency falls off within a shape; its kind does not (shape_by_saliency off: whole on real tokens)
    weight = s if config.shape_by_saliency else (saliency >= 0)[..., None].astype(jnp.float32)
    out = out + weight * config.shape_scale * (shape >= 0)[..., None] * kinds
  if config.digit_scale:
    if digit is None:
      raise ValueError("digit_scale > 0 needs each token's digit")
    digits = unit_directions(NUM_DIGITS, dim, config.digit_seed)[jnp.clip(digit, 0)]              # [b, t, dim]
    out = out + config.digit_scale * ((digit >= 0) & (saliency >= 0))[..., None] * digits
  for name, scale, points, seed in (("small label", config.label_scale, label, config.label_seed),
                                    ("shape centre", config.centre_scale, centre, config.centre_seed)):
    if scale:
      if points is None:
        raise ValueError(f"a {name} scale > 0 needs each token's {name}")
      out = out + scale * point_term(points, saliency >= 0, dim, seed)
  return out


def point_term(points: jax.Array, real: jax.Array, dim: int, seed: int) -> jax.Array:
  """float32 [batch, tokens, dim]: p + 2 dx p_x + 2 dy p_y on real tokens whose points [batch, tokens, 3] are
  (1, dx, dy) (a point in the token, (dx, dy) in [-0.5, 0.5) its offset from the token's centre), 0 elsewhere; p,
  p_x, p_y fixed unit directions drawn from `seed`."""
  here, offset = points[..., :1] * real[..., None], 2.0 * points[..., 1:]                          # [b, t, 1], [b, t, 2]
  p, px, py = unit_directions(3, dim, seed)
  return here * (p + offset[..., :1] * px + offset[..., 1:] * py)


def feature_target_loss(image_embeds: jax.Array, targets: jax.Array, real: jax.Array) -> jax.Array:
  """Mean over real tokens of |embed - target|^2 / (mean over real tokens of |target|^2), pure.

  image_embeds, targets: [batch, tokens, dim]; real: bool [batch, tokens] (False on padding).
  """
  real = real.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(real), 1.0)
  scale = jnp.maximum(jnp.sum(real * jnp.sum(jnp.square(targets), -1)) / count, 1e-6)
  err = jnp.sum(jnp.square(image_embeds.astype(jnp.float32) - targets), -1)        # [b, t]
  return jnp.sum(real * err) / count / scale


def vision_loss_and_grads(config: FeatureTargetConfig, graphdef, params: Params,
                          batch: batch_lib.SFTBatch) -> tuple[jax.Array, Metrics, Params]:
  """The tower's feature-target loss on one batch and its gradients (the decoder is not run), pure."""
  if batch.image_saliency is None or batch.image_colour is None or batch.image_cell is None:
    raise ValueError("the feature targets need SFTBatch.image_saliency, image_colour and image_cell")

  def loss_fn(p: Params) -> jax.Array:
    model = nnx.merge(graphdef, p)
    emb = model.encode_images(batch.inputs.pixel_values, batch.inputs.vision)   # [batch, tokens, dim]
    targets = feature_targets(batch.image_saliency, batch.image_colour, batch.image_cell, emb.shape[-1], config,
                              batch.image_shape, batch.image_digit, batch.image_label, batch.image_centre)
    return feature_target_loss(emb, targets, batch.image_saliency >= 0)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  return loss, {"loss": loss}, grads


def make_vision_step(config: FeatureTargetConfig, tx: optax.GradientTransformation, mesh: Mesh,
                     state_shardings: TrainState, *,
                     learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None) -> state_lib.ShardedStep:
  """The jitted tower step `(state, SFTBatch) -> (state, metrics)`: loss, grad_norm, learning_rate."""

  def step(state: TrainState, batch: batch_lib.SFTBatch) -> tuple[TrainState, Metrics]:
    loss, metrics, grads = vision_loss_and_grads(config, state.graphdef, state.params, batch)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    return state_lib.apply_gradients(state, grads, tx), metrics

  return state_lib.ShardedStep(step, mesh, state_shardings)
