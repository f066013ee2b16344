"""GRPO outcome advantages: rewards normalised within each group of one prompt's trajectories.

Pure, jit-able. Over-turn trajectories get reward 0 here, the one place the rule lives in the step; with
masking on they also leave their group's statistics when `exclude_masked_from_stats` is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mini_o3_jax.rl.config import RLConfig
from mini_o3_jax.train import losses

Array = jax.Array
Metrics = dict[str, Array]


def group_advantages(
    rewards: Array,
    groups: int | Array,
    valid: Array | None = None,
    *,
    num_groups: int | None = None,
    normalize_std: bool = True,
    eps: float = 1e-6,
    exclude_masked_from_stats: bool = False,
) -> tuple[Array, Metrics]:
  """GRPO outcome advantages: (r - mean_group) / (std_group + eps).

  The std is the UNBIASED sample std (divisor n - 1), as `torch.std` in verl's
  GRPO advantage. Degenerate groups get advantage 0 for all their members:
  groups whose contributing rewards are all equal (detected exactly with
  max == min, so float round-off in the mean cannot leak a spurious signal
  through a tiny std) and groups with fewer than 2 contributing rollouts
  (a single rollout has no baseline and an undefined unbiased std; verl would
  return r / (1 + eps) there, we return 0).

  Over-turn rollouts (`valid == 0`):
    * default (as the original): they enter the group mean/std with the
      reward they were given (0) and get the advantage that implies; the
      loss (`grpo_loss` with over-turn masking) then drops their tokens.
    * `exclude_masked_from_stats=True`: the mean/std use valid rollouts only
      and invalid rollouts get advantage 0.

  Args:
    rewards: `[N]` rewards.
    groups: either an int group size (rollouts laid out contiguously as
      `[num_groups, group_size]`, N divisible by it) or `[N]` int group ids in
      `[0, num_groups)`.
    valid: `[N]` bool/0-1, False for over-turn rollouts. None: all valid.
    num_groups: number of groups (static) when `groups` is an id array; if
      None, N is used (an upper bound; empty groups are ignored).
    normalize_std: divide by the group std (else only subtract the mean).
    eps: added to the std.
    exclude_masked_from_stats: see above.

  Returns:
    `(advantages [N] float32, metrics)`; metrics has
    `degenerate_group_fraction` (zero-advantage groups among non-empty groups)
    and `reward_mean`.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  n = rewards.shape[0]
  if np.ndim(groups) == 0:
    groups = int(groups)
    if groups <= 0 or n % groups:
      raise ValueError(f'{n} rollouts do not split into groups of {groups}.')
    num_groups = n // groups
    group_ids = jnp.arange(n, dtype=jnp.int32) // groups
  else:
    group_ids = jnp.asarray(groups, jnp.int32)
    num_groups = n if num_groups is None else num_groups
  if valid is None:
    valid = jnp.ones((n,), jnp.float32)
  valid = jnp.asarray(valid).astype(jnp.float32)
  # Members that enter the group statistics.
  member = valid if exclude_masked_from_stats else jnp.ones_like(valid)

  def seg_sum(x: Array) -> Array:
    return jax.ops.segment_sum(x, group_ids, num_segments=num_groups)

  count = seg_sum(member)  # [G]
  mean = losses.safe_div(seg_sum(rewards * member), count)  # [G]
  centred = rewards - mean[group_ids]  # [N]
  var = losses.safe_div(seg_sum(jnp.square(centred) * member), count - 1.0)  # [G]
  std = jnp.sqrt(var)
  big = jnp.finfo(jnp.float32).max
  r_max = jax.ops.segment_max(jnp.where(member > 0, rewards, -big), group_ids,
                              num_segments=num_groups)
  r_min = jax.ops.segment_min(jnp.where(member > 0, rewards, big), group_ids,
                              num_segments=num_groups)
  degenerate = (count < 2) | (r_max <= r_min)  # [G]

  if normalize_std:
    adv = centred / (std[group_ids] + eps)
  else:
    adv = centred
  adv = jnp.where(degenerate[group_ids] | (member == 0), 0.0, adv)

  nonempty = (seg_sum(jnp.ones_like(rewards)) > 0).astype(jnp.float32)
  metrics = {
      'degenerate_group_fraction': losses.safe_div(
          jnp.sum(degenerate.astype(jnp.float32) * nonempty), jnp.sum(nonempty)),
      'reward_mean': jnp.mean(rewards),
  }
  return adv, metrics


def trajectory_advantages(config: RLConfig, rewards: jax.Array, group_ids: jax.Array,
                  overturn: jax.Array) -> tuple[jax.Array, jax.Array, Metrics]:
  """Effective rewards [batch] (0 for over-turn), advantages [batch] and group metrics (pure).

  group_ids int [batch] in [0, batch); -1 (padding rows) belongs to no group.
  """
  overturn = overturn.astype(bool)
  rewards = jnp.where(overturn, 0.0, rewards.astype(jnp.float32))
  masking = config.overturn_masking
  adv, metrics = group_advantages(
      rewards, group_ids, valid=~overturn if masking else None, num_groups=rewards.shape[0],
      normalize_std=config.normalize_adv_std, eps=config.adv_eps,
      exclude_masked_from_stats=config.exclude_masked_from_stats and masking)
  return rewards, adv, metrics
