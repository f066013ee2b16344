"""AdamW with warmup + cosine decay, clipping, decay masks and vision freezing.

Works on any params pytree: nested dicts or a `flax.nnx.State` (whose key
paths hold `DictKey` / `GetAttrKey` entries). Masks and labels are computed
from the tree handed to each `init` / `update` call, so the same optimizer
serves param trees and the matching gradient trees.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

PathNames = tuple[str, ...]
DecayMaskFn = Callable[[PathNames, Any], bool]

# Variable wrappers (`nnx.Variable.value`) add attribute keys that are not
# part of the parameter's name.
_WRAPPER_ATTRS = ('value', 'raw_value', '_value')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer hyper-parameters.

  Attributes:
    lr: peak learning rate.
    warmup_steps: linear warmup from 0 to `lr` over this many updates.
    total_steps: updates at which the cosine decay reaches `lr * end_lr_ratio`
      (counted from step 0, warmup included); constant afterwards.
    end_lr_ratio: final LR as a fraction of `lr` (1.0 = constant after warmup).
    b1, b2, eps: Adam moments.
    weight_decay: decoupled (AdamW) decay, scaled by the LR; applied only to
      params selected by the decay mask.
    grad_clip_norm: global-norm clip; None or <= 0 disables it.
    freeze_vision: params whose path starts with `vision_prefix` get zero
      updates (and carry no Adam state).
    train_only_vision: the opposite: every other param gets zero updates
      (the tower trained alone, e.g. on feature targets).
    vision_prefix: first path component of the vision tower.
    grad_accum_steps: > 1 averages gradients over that many calls
      (`optax.MultiSteps`); the schedule counts real updates only.
  """
  lr: float = 1e-5
  warmup_steps: int = 0
  total_steps: int = 1000
  end_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  grad_clip_norm: float | None = 1.0
  freeze_vision: bool = False
  train_only_vision: bool = False
  vision_prefix: str = 'visual'
  grad_accum_steps: int = 1


def path_names(path: tuple[Any, ...]) -> PathNames:
  """A jax key path as strings, without Variable-wrapper attributes.

  `(DictKey('vision'), DictKey(0), DictKey('bias'), GetAttrKey('value'))`
  becomes `('vision', '0', 'bias')`.
  """
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name in _WRAPPER_ATTRS:
        continue
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  return tuple(names)


def default_decay_mask(path: PathNames, leaf: Any) -> bool:
  """True if the param gets weight decay.

  No decay for biases and normalisation scales. The rank alone is not enough
  (layer-stacked params add a leading axis, so a stacked bias is 2-D), and the
  name alone is not either (unknown 1-D params), so both are checked: decay
  iff rank >= 2 AND the name is not a bias/scale/norm.
  """
  if jnp.ndim(leaf) < 2:
    return False
  lowered = [p.lower() for p in path]
  if lowered and lowered[-1] in ('bias', 'scale', 'b'):
    return False
  return not any('norm' in p or p.startswith('ln') for p in lowered)


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
  """Linear warmup 0 -> lr, then cosine decay to lr * end_lr_ratio."""
  peak = float(config.lr)
  end = peak * float(config.end_lr_ratio)
  warmup = int(config.warmup_steps)
  decay_steps = max(int(config.total_steps) - warmup, 1)

  def schedule(step: Any) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def _is_vision(path: PathNames, config: OptimizerConfig) -> bool:
  return bool(path) and path[0] == config.vision_prefix


def _is_frozen(path: PathNames, config: OptimizerConfig) -> bool:
  vision = _is_vision(path, config)
  return (config.freeze_vision and vision) or (config.train_only_vision and not vision)


def make_optimizer(
    config: OptimizerConfig,
    params_tree: Any,
    *,
    decay_mask_fn: DecayMaskFn = default_decay_mask,
) -> optax.GradientTransformation:
  """Builds the optimizer.

  Chain: [clip by global norm] -> Adam -> decoupled weight decay (masked) ->
  -schedule(step). With `freeze_vision` the vision params (with
  `train_only_vision` all the others) are routed to `optax.set_to_zero()` by
  `optax.multi_transform`, so they are excluded from the clipping norm and hold
  no Adam state. With `grad_accum_steps > 1` the
  whole thing is wrapped in `optax.MultiSteps` (mean of the gradients).

  Args:
    config: hyper-parameters.
    params_tree: the params (nested dict or nnx.State); used to check the
      configuration (e.g. that freezing matches some params).
    decay_mask_fn: `(path_names, leaf) -> bool`, True to decay.

  Returns:
    An optax transformation; its `update` needs `params` when weight decay
    is on.
  """
  leaves = jax.tree_util.tree_leaves_with_path(params_tree)
  if not leaves:
    raise ValueError('params_tree has no leaves.')
  if config.freeze_vision and config.train_only_vision:
    raise ValueError('freeze_vision and train_only_vision together would train nothing.')
  if (config.freeze_vision or config.train_only_vision) and not any(
      _is_vision(path_names(p), config) for p, _ in leaves):
    raise ValueError(
        f'{"freeze_vision" if config.freeze_vision else "train_only_vision"} is set but no param path '
        f'starts with {config.vision_prefix!r}.')
  if config.grad_accum_steps < 1:
    raise ValueError('grad_accum_steps must be >= 1.')

  def decay_mask(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: bool(decay_mask_fn(path_names(p), x)), tree)

  parts = []
  if config.grad_clip_norm is not None and config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay, decay_mask))
  parts.append(optax.scale_by_learning_rate(make_schedule(config)))
  tx = optax.chain(*parts)

  if config.freeze_vision or config.train_only_vision:
    def labels(tree: Any) -> Any:
      return jax.tree_util.tree_map_with_path(
          lambda p, _: 'frozen' if _is_frozen(path_names(p), config)
          else 'train', tree)
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()}, labels)

  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx
