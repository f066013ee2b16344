"""The training forward both SFT and RL run: final hidden states, then the output head's per-token
statistics, chunked over positions so the [batch, seq, vocab] logits never exist at once.

Pure functions of a model and its inputs, sharded by `mini_o3_jax.sharding`'s batch rule.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mini_o3_jax.model.vlm import VLM
from mini_o3_jax import sharding as sharding_lib
from mini_o3_jax.train import losses


def constrain_activation(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """[batch, ...] activations: batch over data x fsdp, the rest replicated."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding_lib.batch_sharding(mesh, x.ndim))


def hidden_states(model: VLM, inputs, *, train_vision: bool = True, mesh: Mesh | None = None) -> jax.Array:
  """Final hidden states [batch, seq, hidden] (as `VLM.hidden_states`, optionally frozen vision)."""
  return forward(model, inputs, train_vision=train_vision, mesh=mesh)[0]


def forward(model: VLM, inputs, *, train_vision: bool = True,
            mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array | None]:
  """(final hidden states [batch, seq, hidden], image embeddings [batch, patches / 4, hidden] or None)."""
  image_embeds = None
  if inputs.pixel_values is not None:
    image_embeds = model.encode_images(inputs.pixel_values, inputs.vision)  # [batch, patches / 4, hidden]
    if not train_vision:
      image_embeds = jax.lax.stop_gradient(image_embeds)
    if image_embeds.ndim == 3:  # per-row images: batch-sharded like the tokens
      image_embeds = constrain_activation(image_embeds, mesh)
  x = constrain_activation(model.embed(inputs.input_ids, image_embeds), mesh)
  h = model.model(x, inputs.positions, inputs.attention_mask)
  return constrain_activation(h, mesh), image_embeds


def head_token_stats(model: VLM, hidden: jax.Array, targets: jax.Array, *, chunk: int | None = None,
                     entropy: bool = False, correct: bool = False,
                     temperature: float = 1.0, logit_bias: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-token statistics of the output head.

  Args:
    model: the model (its `logits` head is used).
    hidden: [batch, seq, hidden] final hidden states aligned with `targets`.
    targets: int [batch, seq] the next tokens.
    chunk: positions per head evaluation (None: one pass). Each chunk is rematerialised in the
      backward pass, so peak memory holds one [batch, chunk, vocab] block instead of the full one.
    entropy: also return the next-token entropy [batch, seq].
    correct: also return float [batch, seq] 1 where argmax == target.
    temperature: logits are divided by it (the sampling temperature, so log-probs match the
      behaviour policy's).
    logit_bias: optional float32 [vocab] added to the logits first (the sampler's suppressed tokens).

  Returns:
    {"logprobs": float32 [batch, seq], and "entropy" / "correct" when asked}.
  """

  def stats(h: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
    logits = model.logits(h)  # [batch, c, vocab]
    if logit_bias is not None:
      logits = logits.astype(jnp.float32) + logit_bias
    if temperature != 1.0:
      logits = logits.astype(jnp.float32) / temperature
    out = {"logprobs": losses.token_logprobs(logits, t)}
    if entropy:
      out["entropy"] = losses.token_entropy(logits)
    if correct:
      out["correct"] = (jnp.argmax(logits, axis=-1) == t).astype(jnp.float32)
    return out

  b, s, d = hidden.shape
  if chunk is None or chunk >= s:
    return stats(hidden, targets)
  n = math.ceil(s / chunk)
  pad = n * chunk - s
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, b, c, d]
  t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)            # [n, b, c]
  out = jax.lax.map(lambda xs: jax.checkpoint(stats)(*xs), (h, t))                         # [n, b, c]
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :s], out)
