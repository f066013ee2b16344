"""Token sampling: greedy, temperature, top-k, top-p, with per-slot PRNG keys and forced tokens.

Log-prob convention (both are returned for every sampled token):
  * `logprobs`: log softmax(logits / T) over the *whole* vocabulary (T = 1 when greedy). This is the
    quantity the RL learner recomputes from its own forward pass, so it is the behaviour log-prob for
    PPO/GRPO importance ratios. It ignores top-k / top-p truncation.
  * `sample_logprobs`: log-prob under the distribution actually sampled from (temperature, then top-k,
    then top-p, renormalised; the order `transformers` and vLLM use). 0 for the greedy choice. Equals
    `logprobs` when no truncation is configured.
A forced token (see `forced`) gets both log-probs of that token, so a scripted turn still carries the
model's log-probs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -jnp.inf


def suppression_bias(vocab_size: int, token_ids) -> np.ndarray:
  """float32 [vocab]: 0, and -1e9 at `token_ids` (added to the logits: those tokens are never sampled).

  Finite, so softmax entropies stay finite (0 * -1e9 = 0 where -inf would give NaN)."""
  bias = np.zeros((vocab_size,), np.float32)
  ids = np.asarray(list(token_ids), np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"suppressed token ids {sorted(ids.tolist())} outside the vocabulary [0, {vocab_size})")
  bias[ids] = -1e9
  return bias


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is chosen. Hashable: passed to jit as a static argument.

  temperature: 0 means greedy (argmax); otherwise logits are divided by it.
  top_k: keep the k most likely tokens (0 = off).
  top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1.0 = off).
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  @property
  def truncates(self) -> bool:
    return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def truncation_threshold(scaled: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Smallest kept logit per row after top-k then top-p. scaled [rows, vocab] -> [rows, 1].

  Tokens tied with the threshold are kept too (as in `transformers`' top-k warper).
  """
  vocab = scaled.shape[-1]
  if 0 < top_k < vocab:
    # top_k avoids a full sort of a 150k vocabulary when k is small.
    cand = jax.lax.top_k(scaled, top_k)[0]                                  # [rows, k] descending
  else:
    cand = -jnp.sort(-scaled, axis=-1)                                       # [rows, vocab] descending
  if top_p < 1.0:
    probs = jax.nn.softmax(cand, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The first candidate always survives (mass_before = 0 < top_p).
    keep = mass_before < top_p
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
  else:
    n_keep = jnp.full(cand.shape[:-1] + (1,), cand.shape[-1])
  return jnp.take_along_axis(cand, n_keep - 1, axis=-1)


def sample(logits: jax.Array, keys: jax.Array, params: SamplingParams,
           forced: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Chooses one token per row.

  Args:
    logits: float [rows, vocab].
    keys: uint32 [rows, 2], one raw PRNG key per row; each row's key is split independently, so a
      row's samples depend only on its own key (not on batch composition or sharding).
    params: static sampling parameters.
    forced: int32 [rows]; a value >= 0 replaces the sampled token (scripted turns).

  Returns:
    tokens int32 [rows], logprobs [rows], sample_logprobs [rows] (see the module docstring) and
    the advanced keys [rows, 2].
  """
  logits = logits.astype(jnp.float32)
  if params.greedy:
    scaled = logits
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    new_keys = keys
    sample_logits = None
  else:
    scaled = logits / params.temperature
    sample_logits = scaled
    if params.truncates:
      threshold = truncation_threshold(scaled, params.top_k, params.top_p)
      sample_logits = jnp.where(scaled >= threshold, scaled, _NEG_INF)
    split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)                # [rows, 2, 2]
    new_keys, subkeys = split[:, 0], split[:, 1]
    tokens = jax.vmap(lambda k, l: jax.random.categorical(k, l))(subkeys, sample_logits).astype(jnp.int32)
  if forced is not None:
    tokens = jnp.where(forced >= 0, forced.astype(jnp.int32), tokens)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
  if params.greedy:
    best = jnp.argmax(logits, axis=-1)
    sample_logprobs = jnp.where(tokens == best, 0.0, _NEG_INF)
  elif params.truncates:
    sample_logprobs = jnp.take_along_axis(jax.nn.log_softmax(sample_logits, axis=-1), tokens[:, None],
                                          axis=-1)[:, 0]
  else:
    sample_logprobs = logprobs
  return tokens, logprobs, sample_logprobs, new_keys


def target_distribution(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """The exact distribution `sample` draws from, as probabilities [rows, vocab] (for tests/analysis)."""
  logits = logits.astype(jnp.float32)
  if params.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1])
  scaled = logits / params.temperature
  if params.truncates:
    threshold = truncation_threshold(scaled, params.top_k, params.top_p)
    scaled = jnp.where(scaled >= threshold, scaled, _NEG_INF)
  return jax.nn.softmax(scaled, axis=-1)
