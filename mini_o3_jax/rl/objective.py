"""The GRPO policy loss with over-turn masking: PPO's clipped surrogate over the masked response tokens.

Pure, jit-able; reductions in float32. Sums run over the whole (logical) array, so under `jax.jit` with
sharded inputs the default normalisers are over the GLOBAL batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mini_o3_jax.train import losses

Array = jax.Array
Metrics = dict[str, Array]


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
    weights = mask * losses.safe_div(jnp.ones_like(row_tokens), row_tokens)
    default_den = jnp.sum(jnp.sum(response_mask.astype(jnp.float32), -1) > 0)
  else:
    raise ValueError(f'aggregation={aggregation!r}; expected token_mean | '
                     'seq_mean_token_mean')
  den = (default_den if normalizer is None
         else jnp.asarray(normalizer, jnp.float32))

  def agg(x: Array) -> Array:
    return losses.safe_div(jnp.sum(jnp.where(on, x, 0.0) * weights), den)

  def token_mean(x: Array) -> Array:
    return jax.lax.stop_gradient(
        losses.safe_div(jnp.sum(jnp.where(on, x, 0.0) * mask), num_tokens))

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
  metrics['masked_fraction'] = losses.safe_div(
      jnp.sum(jnp.asarray(overturn).astype(jnp.float32) * has_tokens),
      jnp.sum(has_tokens))
  return loss, metrics
