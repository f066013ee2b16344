"""GRPO step with over-turn masking, sharded and jitted.

One call = one optimizer update on a batch of whole GRPO groups:
  1. rewards of over-turn trajectories are forced to 0 (with masking off they are then ordinary wrong
     answers, the paper's ablation);
  2. advantages are normalised within each group over the GLOBAL batch (`losses.group_advantages`);
     as in the original, an over-turn rollout enters its group's mean / std with reward 0 unless
     `exclude_masked_from_stats` is set;
  3. the policy's log-probs are recomputed, and the PPO clipped surrogate against the behaviour
     log-probs (asymmetric clip), optional k3 KL to the frozen reference and optional entropy bonus
     are aggregated over the global batch (`losses.grpo_loss`): a token mean, or the original's mean
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
import optax
from flax import nnx
from jax.sharding import Mesh

from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import losses
from mini_o3_jax.train import sft
from mini_o3_jax.train import state as state_lib
from mini_o3_jax.train.state import Metrics, Params, TrainState


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """GRPO step options (defaults: the original recipe, no KL, no entropy bonus).

  Attributes:
    clip_low / clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    clip_ratio_c: optional dual-clip bound for negative advantages.
    kl_coef: weight of the k3 KL to the reference (reference log-probs from the batch, else from
      `state.ref_params`; one extra forward per micro-batch).
    entropy_coef: weight of the entropy bonus.
    overturn_masking: the paper's over-turn mask (False = ablation).
    exclude_masked_from_stats: leave over-turn rollouts out of the group mean / std (off: as the
      original, they count with reward 0).
    normalize_adv_std: divide advantages by the group std (else only centre them).
    adv_eps: added to the group std.
    grad_accum_steps: micro-batches per update (rows must divide by it).
    logits_chunk: see `sft.SFTConfig.logits_chunk`.
    entropy_metric: report the policy entropy (one extra softmax pass over the vocabulary).
    train_vision: see `sft.SFTConfig.train_vision`.
    temperature: the rollout's sampling temperature; the policy's (and reference's) log-probs are
      computed from logits / temperature so they match the behaviour log-probs.
    loss_aggregation: "token_mean" (every loss token of the batch weighs the same) or
      "seq_mean_token_mean" (the original's: each trajectory's token mean, averaged over the batch's
      trajectories, over-turn ones included with a zero term).
    suppressed_token_ids: tokens the sampler never samples (`rollout.vision_token_ids`); their logits
      are masked here too, so the policy's log-probs are those of the behaviour policy.
  """
  clip_low: float = 0.2
  clip_high: float = 0.3
  clip_ratio_c: float | None = None
  kl_coef: float = 0.0
  entropy_coef: float = 0.0
  overturn_masking: bool = True
  exclude_masked_from_stats: bool = False
  normalize_adv_std: bool = True
  adv_eps: float = 1e-6
  grad_accum_steps: int = 1
  logits_chunk: int | None = None
  entropy_metric: bool = True
  train_vision: bool = True
  temperature: float = 1.0
  loss_aggregation: str = "token_mean"
  suppressed_token_ids: tuple[int, ...] = ()

  def logit_bias(self, vocab_size: int) -> jax.Array | None:
    if not self.suppressed_token_ids:
      return None
    bias = jnp.zeros((vocab_size,), jnp.float32)
    return bias.at[jnp.asarray(self.suppressed_token_ids)].set(-1e9)


def rl_advantages(config: RLConfig, rewards: jax.Array, group_ids: jax.Array,
                  overturn: jax.Array) -> tuple[jax.Array, jax.Array, Metrics]:
  """Effective rewards [batch] (0 for over-turn), advantages [batch] and group metrics (pure).

  group_ids int [batch] in [0, batch); -1 (padding rows) belongs to no group.
  """
  overturn = overturn.astype(bool)
  rewards = jnp.where(overturn, 0.0, rewards.astype(jnp.float32))
  masking = config.overturn_masking
  adv, metrics = losses.group_advantages(
      rewards, group_ids, valid=~overturn if masking else None, num_groups=rewards.shape[0],
      normalize_std=config.normalize_adv_std, eps=config.adv_eps,
      exclude_masked_from_stats=config.exclude_masked_from_stats and masking)
  return rewards, adv, metrics


def rl_loss_and_grads(config: RLConfig, graphdef, params: Params, batch: batch_lib.RLBatch,
                      ref_params: Params | None = None, mesh: Mesh | None = None,
                      grad_shardings: Params | None = None) -> tuple[jax.Array, Metrics, Params]:
  """Loss, metrics and gradients of one GRPO batch (pure, jit-able)."""
  rewards, adv, adv_metrics = rl_advantages(config, batch.rewards, batch.group_ids, batch.overturn)
  # The normaliser over the whole global batch (before the micro-batch split): its loss tokens after
  # over-turn masking, or its trajectories (rows with response tokens, over-turn ones included).
  _, resp_all = losses.next_token_targets(batch.inputs.input_ids, batch.response_mask)
  if config.loss_aggregation == "seq_mean_token_mean":
    normalizer = jnp.sum((jnp.sum(resp_all, axis=-1) > 0).astype(jnp.float32))
  else:
    normalizer = jnp.sum(losses.overturn_loss_mask(resp_all, batch.overturn, config.overturn_masking))
  use_ref = batch.ref_logprobs is not None or (ref_params is not None and config.kl_coef > 0)
  want_entropy = config.entropy_metric or config.entropy_coef > 0

  def micro_loss(p: Params, xs) -> tuple[jax.Array, Metrics]:
    micro, micro_adv = xs
    model = nnx.merge(graphdef, p)
    hidden = sft.hidden_states(model, micro.inputs, train_vision=config.train_vision, mesh=mesh)[:, :-1]
    targets, resp = losses.next_token_targets(micro.inputs.input_ids, micro.response_mask)
    old = micro.old_logprobs[:, 1:]
    bias = config.logit_bias(model.config.text.vocab_size)
    st = sft.head_token_stats(model, hidden, targets, chunk=config.logits_chunk, entropy=want_entropy,
                              temperature=config.temperature, logit_bias=bias)
    ref = None
    if micro.ref_logprobs is not None:
      ref = micro.ref_logprobs[:, 1:]
    elif use_ref:
      ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(ref_params))
      ref_hidden = sft.hidden_states(ref_model, micro.inputs, train_vision=False, mesh=mesh)[:, :-1]
      ref = jax.lax.stop_gradient(
          sft.head_token_stats(ref_model, ref_hidden, targets, chunk=config.logits_chunk,
                               temperature=config.temperature, logit_bias=bias)["logprobs"])
    entropy = st.get("entropy")
    if entropy is not None and not config.entropy_coef:
      entropy = jax.lax.stop_gradient(entropy)
    loss, m = losses.grpo_loss(
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
    hidden = sft.hidden_states(model, batch.inputs, train_vision=False, mesh=mesh)[:, :-1]
    targets, resp = losses.next_token_targets(batch.inputs.input_ids, batch.response_mask)
    lp = sft.head_token_stats(model, hidden, targets, chunk=config.logits_chunk, temperature=config.temperature,
                              logit_bias=config.logit_bias(model.config.text.vocab_size))["logprobs"]
    return jax.lax.stop_gradient(jnp.pad(jnp.where(resp > 0, lp, 0.0), ((0, 0), (1, 0))))

  return jax.jit(logprobs)
