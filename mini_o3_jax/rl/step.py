"""GRPO step with over-turn masking, sharded and jitted.

One call = one optimizer update on a batch of whole GRPO groups:
  1. rewards of over-turn trajectories are forced to 0 (with masking off they are then ordinary wrong
     answers, the paper's ablation);
  2. advantages are normalised within each group over the GLOBAL batch (`rl.advantages`);
     as in the original, an over-turn rollout enters its group's mean / std with reward 0 unless
     `exclude_masked_from_stats` is set;
  3. the policy's log-probs are recomputed, and the PPO clipped surrogate against the behaviour
     log-probs (asymmetric clip), optional k3 KL to the frozen reference and optional entropy bonus
     are aggregated over the global batch (`rl.objective`): a token mean, or the original's mean
     over trajectories of each trajectory's token mean (`loss_aggregation`);
  4. over-turn masking happens here, inside the jitted loss: the per-trajectory `overturn` flag that
     travels with the batch zeroes that trajectory's response mask, so its tokens carry no loss AND
     leave the token normaliser (computed once over the whole global batch, before the micro-batch
     split). `overturn_masking=False` turns it off.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mini_o3_jax.rl import advantages as advantages_lib
from mini_o3_jax.rl.config import RLConfig
from mini_o3_jax.rl import objective
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import forward as forward_lib
from mini_o3_jax.train import losses
from mini_o3_jax.train import state as state_lib
from mini_o3_jax.train.state import Metrics, Params, TrainState


def rl_loss_and_grads(config: RLConfig, graphdef, params: Params, batch: batch_lib.RLBatch,
                      ref_params: Params | None = None, mesh: Mesh | None = None,
                      grad_shardings: Params | None = None) -> tuple[jax.Array, Metrics, Params]:
  """Loss, metrics and gradients of one GRPO batch (pure, jit-able)."""
  rewards, adv, adv_metrics = advantages_lib.trajectory_advantages(config, batch.rewards, batch.group_ids, batch.overturn)
  # The normaliser over the whole global batch (before the micro-batch split): its loss tokens after
  # over-turn masking, or its trajectories (rows with response tokens, over-turn ones included).
  _, resp_all = losses.next_token_targets(batch.inputs.input_ids, batch.response_mask)
  if config.loss_aggregation == "seq_mean_token_mean":
    normalizer = jnp.sum((jnp.sum(resp_all, axis=-1) > 0).astype(jnp.float32))
  else:
    normalizer = jnp.sum(objective.overturn_loss_mask(resp_all, batch.overturn, config.overturn_masking))
  use_ref = batch.ref_logprobs is not None or (ref_params is not None and config.kl_coef > 0)
  want_entropy = config.entropy_metric or config.entropy_coef > 0

  def micro_loss(p: Params, xs) -> tuple[jax.Array, Metrics]:
    micro, micro_adv = xs
    model = nnx.merge(graphdef, p)
    hidden = forward_lib.hidden_states(model, micro.inputs, train_vision=config.train_vision, mesh=mesh)[:, :-1]
    targets, resp = losses.next_token_targets(micro.inputs.input_ids, micro.response_mask)
    old = micro.old_logprobs[:, 1:]
    bias = config.logit_bias(model.config.text.vocab_size)
    st = forward_lib.head_token_stats(model, hidden, targets, chunk=config.logits_chunk, entropy=want_entropy,
                              temperature=config.temperature, logit_bias=bias)
    ref = None
    if micro.ref_logprobs is not None:
      ref = micro.ref_logprobs[:, 1:]
    elif use_ref:
      ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(ref_params))
      ref_hidden = forward_lib.hidden_states(ref_model, micro.inputs, train_vision=False, mesh=mesh)[:, :-1]
      ref = jax.lax.stop_gradient(
          forward_lib.head_token_stats(ref_model, ref_hidden, targets, chunk=config.logits_chunk,
                               temperature=config.temperature, logit_bias=bias)["logprobs"])
    entropy = st.get("entropy")
    if entropy is not None and not config.entropy_coef:
      entropy = jax.lax.stop_gradient(entropy)
    loss, m = objective.grpo_loss(
        st["logprobs"], old, micro_adv, resp, micro.overturn, clip_low=config.clip_low,
        clip_high=config.clip_high, clip_ratio_c=config.clip_ratio_c, ref_logprobs=ref,
        kl_coef=config.kl_coef, entropy=entropy, entropy_coef=config.entropy_coef,
        overturn_masking=config.overturn_masking, normalizer=normalizer, aggregation=config.loss_aggregation)
    n = m["num_loss_tokens"]
    # Token means of this micro-batch -> sums, so micro-batches combine into global token means.
    aux = {"pg_loss": m["pg_loss"], "num_loss_tokens": n,
           "num_tokens": jnp.sum(micro.inputs.attention_mask.astype(jnp.float32))}
    for key in ("clip_fraction", "approx_kl", "kl_ref", "entropy", "dual_clip_fraction"):
      if key in m:
        aux[key + "_sum"] = m[key] * n
    return loss, aux

  k = config.grad_accum_steps
  micro = batch_lib.split_microbatches((batch, adv), k)
  constrain = (lambda x: batch_lib.constrain_batch(x, mesh)) if mesh is not None else (lambda x: x)
  loss, aux, grads = state_lib.accumulate_gradients(micro_loss, params, micro, k, constrain, grad_shardings)

  n = aux.pop("num_loss_tokens")
  safe = jnp.maximum(n, 1.0)
  metrics = {"loss": loss, "pg_loss": aux.pop("pg_loss"), "num_loss_tokens": n,
             "num_tokens": aux.pop("num_tokens")}
  for key in list(aux):
    metrics[key[:-len("_sum")]] = aux[key] / safe
  real = jnp.any(batch.inputs.attention_mask > 0, axis=-1).astype(jnp.float32)        # [batch]
  has_response = (jnp.sum(batch.response_mask, axis=-1) > 0).astype(jnp.float32)      # [batch]
  overturn = batch.overturn.astype(jnp.float32)
  metrics.update(
      reward_mean=jnp.sum(rewards * real) / jnp.maximum(jnp.sum(real), 1.0),
      masked_fraction=jnp.sum(overturn * has_response) / jnp.maximum(jnp.sum(has_response), 1.0),
      zero_adv_group_fraction=adv_metrics["degenerate_group_fraction"],
      adv_abs_mean=jnp.sum(jnp.abs(adv) * real) / jnp.maximum(jnp.sum(real), 1.0),
  )
  return loss, metrics, grads


def make_rl_step(config: RLConfig, tx: optax.GradientTransformation, mesh: Mesh, state_shardings: TrainState,
                 *, learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                 donate: bool = True) -> state_lib.ShardedStep:
  """The jitted GRPO step `(state, RLBatch) -> (state, metrics)` on `mesh`.

  Metrics: loss, pg_loss, clip_fraction, approx_kl (behaviour vs current), kl_ref (k3 to the
  reference, when used), entropy, grad_norm, reward_mean, masked_fraction (over-turn trajectories
  among those with response tokens), zero_adv_group_fraction (groups whose rewards are all equal),
  adv_abs_mean, num_loss_tokens, num_tokens (tokens/s via `state.timed_step`), learning_rate.
  """

  def step(state: TrainState, batch: batch_lib.RLBatch) -> tuple[TrainState, Metrics]:
    loss, metrics, grads = rl_loss_and_grads(config, state.graphdef, state.params, batch, state.ref_params,
                                             mesh, state_shardings.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    return state_lib.apply_gradients(state, grads, tx), metrics

  return state_lib.ShardedStep(step, mesh, state_shardings, donate=donate)


def make_logprob_fn(config: RLConfig, graphdef: nnx.GraphDef, mesh: Mesh | None = None):
  """The jitted `(params, RLBatch) -> log-probs float32 [batch, seq]` of the training forward.

  Aligned as `RLBatch.old_logprobs` (entry t scores token t given tokens < t; 0 at t = 0 and off the
  response), at the step's temperature. `rl.recompute_old_logprobs` uses it as the behaviour log-probs,
  as verl does, so the first update's ratio is exactly 1 whatever the sampler's rounding.
  """

  def logprobs(params: Params, batch: batch_lib.RLBatch) -> jax.Array:
    model = nnx.merge(graphdef, params)
    hidden = forward_lib.hidden_states(model, batch.inputs, train_vision=False, mesh=mesh)[:, :-1]
    targets, resp = losses.next_token_targets(batch.inputs.input_ids, batch.response_mask)
    lp = forward_lib.head_token_stats(model, hidden, targets, chunk=config.logits_chunk, temperature=config.temperature,
                              logit_bias=config.logit_bias(model.config.text.vocab_size))["logprobs"]
    return jax.lax.stop_gradient(jnp.pad(jnp.where(resp > 0, lp, 0.0), ((0, 0), (1, 0))))

  return jax.jit(logprobs)


def run_updates(state, step_fn, batches: list, epochs: int, logprob_fn=None):
  """`epochs` passes of GRPO updates over the mini-batches of one rollout batch -> (state, metrics).

  With `logprob_fn` (`rl.make_logprob_fn`) the behaviour log-probs are first recomputed by the training
  forward at the parameters the rollouts used, and `sampler_logprob_gap` (mean sampler minus training
  log-prob over response tokens) is logged. The metrics are the last update's, plus the first update's
  `first_approx_kl` / `first_clip_fraction` (drift between behaviour and training policy shows there)
  and `updates`.
  """
  extra = {}
  if logprob_fn is not None:
    recomputed = [logprob_fn(state.params, b) for b in batches]
    gaps = [jax.device_get(jnp.sum((b.old_logprobs - r) * (b.response_mask > 0))
                           / jnp.maximum(jnp.sum(b.response_mask > 0), 1)) for b, r in zip(batches, recomputed)]
    extra["sampler_logprob_gap"] = float(np.mean(gaps))
    batches = [dataclasses.replace(b, old_logprobs=r) for b, r in zip(batches, recomputed)]
  metrics = {}
  for update in range(epochs * len(batches)):
    state, metrics = state_lib.timed_step(step_fn, state, batches[update % len(batches)])
    if update == 0:
      extra.update(first_approx_kl=metrics.get("approx_kl"), first_clip_fraction=metrics.get("clip_fraction"))
  return state, {**metrics, **extra, "updates": float(epochs * len(batches))}
