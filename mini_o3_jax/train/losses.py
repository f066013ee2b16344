"""Token-level quantities every loss is made of: log-probs, entropies, next-token targets.

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


def safe_div(num: Array, den: Array) -> Array:
  """num / den, and 0 where den == 0 (no NaN in the value or the gradient)."""
  den_ok = den > 0
  return jnp.where(den_ok, num / jnp.where(den_ok, den, 1.0), 0.0)
