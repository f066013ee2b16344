"""The GRPO step's options, as plain frozen data."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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
