"""Losses for cold-start SFT and GRPO with over-turn masking.

Pure, jit-able JAX functions. All reductions run in float32 whatever the
dtype of the logits, so bf16 activations do not degrade the loss.

Conventions:
  * `B` batch (trajectories), `T` sequence length, `V` vocabulary.
  * Masks are {0, 1} (any numeric or bool dtype); they are cast to float32.
  * Sums inside these functions are over the whole (logical) array: under
    `jax.jit` with sharded inputs the sum, and therefore the default token
    normaliser, is over the GLOBAL batch; XLA inserts the collectives.
  * Rows of the batch stay independent; nothing here reads host state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Metrics = dict[str, Array]


# ----------------------------------------------------------------------------
# Token-level quantities.
# ----------------------------------------------------------------------------


def token_logprobs(logits: Array, targets: Array) -> Array:
  """log p(target) per position.

  Computed as `logit[target] - logsumexp(logits)` so no full log-softmax
  `[B, T, V]` tensor is built; XLA fuses the float32 cast into the reductions.

  Args:
    logits: `[B, T, V]`, any float dtype.
    targets: `[B, T]` int token ids.

  Returns:
    `[B, T]` float32 log-probabilities.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  picked = jnp.take_along_axis(
      logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, T]
  return picked - lse


def token_entropy(logits: Array) -> Array:
  """Entropy of the next-token distribution, `[B, T, V] -> [B, T]` float32.

  H = logsumexp(z) - sum_v softmax(z)_v * z_v, which avoids log(0) for
  underflowing probabilities.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, T, 1]
  probs = jnp.exp(logits - lse)  # [B, T, V]
  return lse[..., 0] - jnp.sum(probs * logits, axis=-1)


def next_token_targets(input_ids: Array,
                       loss_mask: Array) -> tuple[Array, Array]:
  """Shifts a sequence into next-token targets.

  Position t of the model output predicts token t + 1, so the model logits are
  used as `logits[:, :-1]` against `targets = input_ids[:, 1:]`. A target is
  trained on iff ITS OWN loss mask is set (the mask of the token being
  predicted, not of the token that predicts it): a response token that
  follows an observation is trained, the first observation token after a
  response is not.

  Args:
    input_ids: `[B, T]` token ids.
    loss_mask: `[B, T]` 1 where the token is a model (assistant) token.

  Returns:
    `(targets [B, T-1], mask [B, T-1])`, aligned with `logits[:, :-1]`.
  """
  return input_ids[:, 1:], loss_mask[:, 1:]


def _safe_div(num: Array, den: Array) -> Array:
  """num / den, and 0 where den == 0 (no NaN in the value or the gradient)."""
  den_ok = den > 0
  return jnp.where(den_ok, num / jnp.where(den_ok, den, 1.0), 0.0)


# ----------------------------------------------------------------------------
# SFT.
# ----------------------------------------------------------------------------


def sft_loss(logits: Array,
             targets: Array,
             mask: Array,
             normalizer: Array | float | None = None,
             *,
             sequence_mean: bool = False) -> tuple[Array, Metrics]:
  """Cross-entropy over the masked (model-turn) tokens.

  Token mean (default): sum of masked NLL / `normalizer`, where the default
  normaliser is the number of masked tokens in the (global) batch. Pass an
  explicit `normalizer` (e.g. the token count of the whole accumulated batch)
  when gradients are accumulated over micro-batches, so that every token
  weighs the same.

  Sequence mean (`sequence_mean=True`, the alternative): mean NLL per
  sequence, then the mean over sequences that have at least one masked token;
  long trajectories then weigh as much as short ones. `normalizer`, if given,
  replaces the number of such sequences.

  Args:
    logits: `[B, T, V]` already aligned with `targets` (see
      `next_token_targets`).
    targets: `[B, T]` int.
    mask: `[B, T]` loss mask.
    normalizer: optional scalar divisor (see above). Zero gives loss 0.
    sequence_mean: average per sequence first.

  Returns:
    `(loss, aux)`; aux has `num_tokens`, `accuracy` and `nll` (mean NLL per
    masked token, independent of the normaliser), all float32 scalars.
  """
  mask = mask.astype(jnp.float32)
  nll = -token_logprobs(logits, targets)  # [B, T]
  nll = jnp.where(mask > 0, nll, 0.0)  # Drop garbage at padding positions.
  num_tokens = jnp.sum(mask)
  if sequence_mean:
    tokens_per_seq = jnp.sum(mask, axis=-1)  # [B]
    seq_nll = _safe_div(jnp.sum(nll * mask, axis=-1), tokens_per_seq)  # [B]
    den = (jnp.sum((tokens_per_seq > 0).astype(jnp.float32))
           if normalizer is None else jnp.asarray(normalizer, jnp.float32))
    loss = _safe_div(jnp.sum(seq_nll), den)
  else:
    den = (num_tokens if normalizer is None
           else jnp.asarray(normalizer, jnp.float32))
    loss = _safe_div(jnp.sum(nll * mask), den)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  aux = {
      'num_tokens': num_tokens,
      'accuracy': _safe_div(jnp.sum(correct * mask), num_tokens),
      'nll': jax.lax.stop_gradient(_safe_div(jnp.sum(nll * mask), num_tokens)),
  }
  return loss, aux


# ----------------------------------------------------------------------------
# GRPO advantages.
# ----------------------------------------------------------------------------


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
  mean = _safe_div(seg_sum(rewards * member), count)  # [G]
  centred = rewards - mean[group_ids]  # [N]
  var = _safe_div(seg_sum(jnp.square(centred) * member), count - 1.0)  # [G]
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
      'degenerate_group_fraction': _safe_div(
          jnp.sum(degenerate.astype(jnp.float32) * nonempty), jnp.sum(nonempty)),
      'reward_mean': jnp.mean(rewards),
  }
  return adv, metrics


# ----------------------------------------------------------------------------
# GRPO policy loss.
# ----------------------------------------------------------------------------


def overturn_loss_mask(response_mask: Array, overturn: Array,
                       enabled: bool) -> Array:
  """The token loss mask after over-turn masking.

  Args:
    response_mask: `[B, T]` 1 on the model's own tokens (observations 0).
    overturn: `[B]` True for trajectories cut off by the turn / context
      limit without an answer.
    enabled: apply the masking (the paper's method); False is the ablation.

  Returns:
    `[B, T]` float32: `response_mask * (1 - overturn)` if enabled, else
    `response_mask`. Masked trajectories thus carry no loss AND are left out
    of the token normaliser.
  """
  response_mask = response_mask.astype(jnp.float32)
  if not enabled:
    return response_mask
  keep = 1.0 - jnp.asarray(overturn).astype(jnp.float32)  # [B]
  return response_mask * keep[:, None]


def grpo_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    response_mask: Array,
    overturn: Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    clip_ratio_c: float | None = None,
    ref_logprobs: Array | None = None,
    kl_coef: float = 0.0,
    entropy: Array | None = None,
    entropy_coef: float = 0.0,
    overturn_masking: bool = True,
    normalizer: Array | float | None = None,
    aggregation: str = 'token_mean',
) -> tuple[Array, Metrics]:
  """PPO clipped surrogate with asymmetric clipping and over-turn masking.

  Per token, with ratio = exp(logp - old_logp) and A the trajectory advantage:
    pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)).
  If `clip_ratio_c` is set, tokens with A < 0 are additionally capped at
  -A * clip_ratio_c (verl's dual clip; verl's default is 3.0, off here).
  Aggregation (`aggregation`):
    'token_mean': sum over loss tokens / `normalizer`, default the number of
      loss tokens in the (global) batch;
    'seq_mean_token_mean' (the original's, a micro-batch of one trajectory):
      each trajectory's token mean over its loss tokens, summed and divided by
      `normalizer`, default the number of trajectories (rows with response
      tokens) in the batch — over-turn rows stay in that count with a zero
      term, so a mostly-masked batch takes a proportionally smaller step.
  Zero loss tokens give loss 0 and an exactly zero gradient.

    loss = pg + kl_coef * k3(ref || pi) - entropy_coef * entropy
  with the same aggregation for every term; k3 = exp(ref - logp) -
  (ref - logp) - 1 (unbiased, non-negative KL estimator).

  Args:
    logprobs: `[B, T]` current-policy token log-probs (differentiable).
    old_logprobs: `[B, T]` behaviour-policy log-probs (rollout time).
    advantages: `[B]` per-trajectory advantages.
    response_mask: `[B, T]` model tokens (observation tokens 0).
    overturn: `[B]` bool over-turn flags.
    clip_low: ratio lower bound is 1 - clip_low.
    clip_high: ratio upper bound is 1 + clip_high.
    clip_ratio_c: optional dual-clip constant (> 1) for negative advantages.
    ref_logprobs: optional `[B, T]` reference-policy log-probs for the KL term.
    kl_coef: weight of the KL term.
    entropy: optional `[B, T]` token entropies (e.g. `token_entropy`), for the
      bonus and the metric.
    entropy_coef: weight of the entropy bonus.
    overturn_masking: drop over-turn trajectories (see `overturn_loss_mask`).
    normalizer: optional token count ('token_mean') or trajectory count
      ('seq_mean_token_mean'), e.g. over all micro-batches of a
      gradient-accumulated mini-batch.
    aggregation: 'token_mean' | 'seq_mean_token_mean'.

  Returns:
    `(loss, metrics)`. Metrics (float32 scalars, token means over the loss
    tokens of this call): `pg_loss` (the pg term as in the loss), `clip_fraction`
    (tokens where the clipped branch is taken, i.e. clipping zeroes the
    gradient), `approx_kl` (mean of old_logp - logp, verl's ppo_kl),
    `masked_fraction` (over-turn trajectories among those with response
    tokens, reported even when masking is off), `num_loss_tokens`, and, when
    the inputs are given, `kl_ref` (mean k3), `entropy` and
    `dual_clip_fraction`.
  """
  mask = overturn_loss_mask(response_mask, overturn, overturn_masking)  # [B,T]
  on = mask > 0
  logprobs = logprobs.astype(jnp.float32)
  old_logprobs = old_logprobs.astype(jnp.float32)
  adv = jnp.asarray(advantages, jnp.float32)[:, None]  # [B, 1]

  num_tokens = jnp.sum(mask)
  if aggregation == 'token_mean':
    weights = mask  # [B, T]
    default_den = num_tokens
  elif aggregation == 'seq_mean_token_mean':
    row_tokens = jnp.sum(mask, axis=-1, keepdims=True)  # [B, 1]
    weights = mask * _safe_div(jnp.ones_like(row_tokens), row_tokens)
    default_den = jnp.sum(jnp.sum(response_mask.astype(jnp.float32), -1) > 0)
  else:
    raise ValueError(f'aggregation={aggregation!r}; expected token_mean | '
                     'seq_mean_token_mean')
  den = (default_den if normalizer is None
         else jnp.asarray(normalizer, jnp.float32))

  def agg(x: Array) -> Array:
    return _safe_div(jnp.sum(jnp.where(on, x, 0.0) * weights), den)

  def token_mean(x: Array) -> Array:
    return jax.lax.stop_gradient(
        _safe_div(jnp.sum(jnp.where(on, x, 0.0) * mask), num_tokens))

  # Double-where: off-mask positions may hold -inf/garbage log-probs; zeroing
  # the log-ratio there keeps both the value and the gradient finite.
  log_ratio = jnp.where(on, logprobs - old_logprobs, 0.0)  # [B, T]
  ratio = jnp.exp(log_ratio)
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  pg = jnp.maximum(pg1, pg2)
  clipped = (pg2 > pg1).astype(jnp.float32)
  dual_clipped = None
  if clip_ratio_c is not None:
    pg3 = -adv * clip_ratio_c
    dual = (adv < 0) & (pg3 < pg)
    dual_clipped = dual.astype(jnp.float32)
    pg = jnp.where(dual, pg3, pg)
  pg_loss = agg(pg)
  loss = pg_loss

  metrics = {
      'pg_loss': jax.lax.stop_gradient(pg_loss),
      'clip_fraction': token_mean(clipped),
      'approx_kl': token_mean(-log_ratio),
      'num_loss_tokens': num_tokens,
  }
  if dual_clipped is not None:
    metrics['dual_clip_fraction'] = token_mean(dual_clipped)

  if ref_logprobs is not None:
    ref_diff = jnp.where(on, ref_logprobs.astype(jnp.float32) - logprobs, 0.0)
    kl = jnp.exp(ref_diff) - ref_diff - 1.0  # k3, [B, T]
    if kl_coef:
      loss = loss + kl_coef * agg(kl)
    metrics['kl_ref'] = token_mean(kl)
  if entropy is not None:
    ent = jnp.where(on, entropy.astype(jnp.float32), 0.0)
    if entropy_coef:
      loss = loss - entropy_coef * agg(ent)
    metrics['entropy'] = token_mean(ent)

  has_tokens = (jnp.sum(response_mask.astype(jnp.float32), axis=-1) > 0)
  has_tokens = has_tokens.astype(jnp.float32)  # [B]
  metrics['masked_fraction'] = _safe_div(
      jnp.sum(jnp.asarray(overturn).astype(jnp.float32) * has_tokens),
      jnp.sum(has_tokens))
  return loss, metrics


__all__ = [
    'token_logprobs', 'token_entropy', 'next_token_targets', 'sft_loss',
    'group_advantages', 'overturn_loss_mask', 'grpo_loss',
]
