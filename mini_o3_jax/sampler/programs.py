"""The sampler's jitted programs over all slots at once, and the device pytrees they pass around.

`encode` (the vision tower over the rows that append images), `slice_embeds` (a piece's image
embeddings aligned to its tokens), `append` (a right-padded chunk written into the cache, then the
next token sampled) and `decode` (up to `steps` tokens in one while loop). `sampler.engine.Engine` owns
the state and calls them; the module docstring there describes the scheme.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mini_o3_jax.sampler import decoder
from mini_o3_jax.sampler.decoder import SlotCache
from mini_o3_jax.sampler import sampling as sampling_lib
from mini_o3_jax.sampler.sampling import SamplingParams

# Why a slot stopped (StepOutput.reason).
RUNNING, STOP_TOKEN, STOP_STRING, LENGTH = 0, 1, 2, 3
REASON_NAMES = {RUNNING: "running", STOP_TOKEN: "stop_token", STOP_STRING: "stop_string", LENGTH: "length"}




@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
  """Everything the device keeps per slot (leading axis: slots)."""
  cache: SlotCache
  token: jax.Array       # int32 [slots]: last sampled token, not yet written to the cache
  pos: jax.Array         # int32 [slots]: its M-RoPE position (text: equal on all three axes)
  key: jax.Array         # uint32 [slots, 2]: PRNG key, advanced only when the slot samples
  stop_state: jax.Array  # int32 [slots]: stop-string automaton state since the turn began
  turn_len: jax.Array    # int32 [slots]: tokens sampled in this turn
  turn_limit: jax.Array  # int32 [slots]: the turn stops with LENGTH when turn_len reaches it
  active: jax.Array      # bool [slots]: still generating this turn
  forced: jax.Array      # int32 [slots, forced_width]: token i of the turn is forced[i] if >= 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Piece:
  """One append call's inputs (leading axis: slots; chunk axis C is bucketed)."""
  ids: jax.Array          # int32 [slots, C], right-padded
  positions: jax.Array    # int32 [3, slots, C]
  mask: jax.Array         # int32 [slots, C]: 1 on real tokens
  reset: jax.Array        # bool [slots]: start a new sequence (length 0) before writing
  sample: jax.Array       # bool [slots]: the slot's chunk ends in this piece; sample its next token
  last: jax.Array         # int32 [slots]: index of the chunk's last real token in this piece
  next_pos: jax.Array     # int32 [slots]: position of the token sampled next
  turn_limit: jax.Array   # int32 [slots]
  forced: jax.Array       # int32 [slots, forced_width]
  new_key: jax.Array      # bool [slots]: replace the slot's key by `key`
  key: jax.Array          # uint32 [slots, 2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
  """Tokens sampled by one call. Row s produced tokens[s, :count[s]]; reason[s] != RUNNING if it stopped."""
  tokens: jax.Array           # int32 [slots, steps]
  logprobs: jax.Array         # float32 [slots, steps]: log softmax(logits / T) of the token
  sample_logprobs: jax.Array  # float32 [slots, steps]: under the truncated sampling distribution
  count: jax.Array            # int32 [slots]
  reason: jax.Array           # int32 [slots]


# ----------------------------------------------------------------------------- jitted programs


def sample_step(state: SlotState, logits: jax.Array, rows: jax.Array, table: jax.Array, stop_ids: jax.Array,
                 sampling: SamplingParams, match_state: int):
  """Samples for `rows` (bool [slots]) from logits [slots, vocab]; other rows keep their state."""
  width = state.forced.shape[1]
  forced = jnp.take_along_axis(state.forced, jnp.clip(state.turn_len, 0, width - 1)[:, None], axis=1)[:, 0]
  forced = jnp.where(state.turn_len < width, forced, -1)
  tok, lp, slp, key = sampling_lib.sample(logits, state.key, sampling, forced)
  stop_state = table[state.stop_state, tok]
  turn_len = state.turn_len + 1
  hit_token = jnp.isin(tok, stop_ids)
  hit_string = stop_state == match_state
  hit_limit = turn_len >= state.turn_limit
  # A token that ends a stop string on the turn's last allowed step is a clean stop, not a cut-off.
  reason = jnp.where(hit_token, STOP_TOKEN, jnp.where(hit_string, STOP_STRING, jnp.where(hit_limit, LENGTH, RUNNING)))
  reason = jnp.where(rows, reason, RUNNING).astype(jnp.int32)
  new = dataclasses.replace(
      state,
      token=jnp.where(rows, tok, state.token),
      key=jnp.where(rows[:, None], key, state.key),
      stop_state=jnp.where(rows, stop_state, state.stop_state),
      turn_len=jnp.where(rows, turn_len, state.turn_len),
      active=jnp.where(rows, reason == RUNNING, state.active),
  )
  return new, tok, lp, slp, reason


def constrain(tree, shardings):
  return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots", "out_sharding"))
def encode(graphdef, params, pixel_values, vision, rows, *, num_slots, out_sharding):
  """pixel_values [R, P, D] of slots `rows` [R] (num_slots = padding row) -> embeds [slots, P/4, hidden]."""
  model = nnx.merge(graphdef, params)
  emb = model.encode_images(pixel_values, vision)                                   # [R, P/4, hidden]
  out = jnp.zeros((num_slots,) + emb.shape[1:], emb.dtype).at[rows].set(emb, mode="drop")
  return constrain(out, out_sharding)


@functools.partial(jax.jit, static_argnames=("width", "out_sharding"))
def slice_embeds(embeds, offset, *, width, out_sharding):
  """embeds [slots, N, hidden], offset [slots] -> the `width` embeddings from each offset [slots, width, hidden].

  A separate (cheap) program, so the expensive prefill program depends on the chunk bucket only,
  not on the image-size bucket as well.
  """
  idx = jnp.clip(offset[:, None] + jnp.arange(width)[None], 0, embeds.shape[1] - 1)
  return constrain(jnp.take_along_axis(embeds, idx[:, :, None], axis=1), out_sharding)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "window", "match_state", "state_sharding"),
                   donate_argnames=("state",))
def append(graphdef, params, state: SlotState, piece: Piece, piece_embeds, table, stop_ids, logit_bias, *,
            sampling, window, match_state, state_sharding):
  """Writes one piece into every slot's cache and samples for the slots whose chunk ends here.

  piece_embeds [slots, C, hidden]: the image embeddings of the piece's image tokens, in order.
  Returns the new state, a StepOutput of one step and the last real position's logits
  [slots, vocab] (for tests and scoring; never copied to the host unless read).
  """
  model = nnx.merge(graphdef, params)
  cache = state.cache
  cache = dataclasses.replace(cache, length=jnp.where(piece.reset, 0, cache.length),
                              valid=cache.valid & ~piece.reset[:, None])
  x = model.embed(piece.ids, piece_embeds)
  h, new_cache = decoder.cached_forward(model, x, piece.positions, piece.mask, cache, window)
  h_last = jnp.take_along_axis(h, piece.last[:, None, None], axis=1)[:, 0]               # [slots, hidden]
  logits = model.logits(h_last).astype(jnp.float32) + logit_bias                        # [slots, vocab]
  rows = piece.sample
  state = dataclasses.replace(
      state, cache=new_cache,
      pos=jnp.where(rows, piece.next_pos, state.pos),
      key=jnp.where((rows & piece.new_key)[:, None], piece.key, state.key),
      stop_state=jnp.where(rows, 0, state.stop_state),
      turn_len=jnp.where(rows, 0, state.turn_len),
      turn_limit=jnp.where(rows, piece.turn_limit, state.turn_limit),
      forced=jnp.where(rows[:, None], piece.forced, state.forced))
  state, tok, lp, slp, reason = sample_step(state, logits, rows, table, stop_ids, sampling, match_state)
  out = StepOutput(tokens=tok[:, None], logprobs=lp[:, None], sample_logprobs=slp[:, None],
                   count=rows.astype(jnp.int32), reason=reason)
  return constrain(state, state_sharding), out, logits


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "steps", "window", "match_state",
                                             "state_sharding"), donate_argnames=("state",))
def decode(graphdef, params, state: SlotState, table, stop_ids, logit_bias, *, sampling, steps, window,
            match_state, state_sharding):
  """Up to `steps` decode steps for the active slots; stops early when none is active.

  window: attend over the first `window` cache entries (every active slot's length + steps fits).
  """
  model = nnx.merge(graphdef, params)
  slots = state.token.shape[0]
  out = StepOutput(tokens=jnp.zeros((slots, steps), jnp.int32), logprobs=jnp.zeros((slots, steps), jnp.float32),
                   sample_logprobs=jnp.zeros((slots, steps), jnp.float32), count=jnp.zeros((slots,), jnp.int32),
                   reason=jnp.zeros((slots,), jnp.int32))

  def cond(carry):
    i, st, _ = carry
    return (i < steps) & jnp.any(st.active)

  def body(carry):
    i, st, out = carry
    rows = st.active
    positions = jnp.broadcast_to(st.pos[None, :, None], (3, slots, 1))
    x = model.embed(st.token[:, None])
    # Idle slots write one invalid entry at their length and do not advance.
    h, cache = decoder.cached_forward(model, x, positions, rows[:, None].astype(jnp.int32), st.cache, window)
    logits = model.logits(h[:, 0]).astype(jnp.float32) + logit_bias
    st = dataclasses.replace(st, cache=cache, pos=st.pos + rows.astype(jnp.int32))
    st, tok, lp, slp, reason = sample_step(st, logits, rows, table, stop_ids, sampling, match_state)
    col = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(rows, v, 0)[:, None].astype(buf.dtype),
                                                             i, axis=1)
    out = StepOutput(tokens=col(out.tokens, tok), logprobs=col(out.logprobs, lp),
                     sample_logprobs=col(out.sample_logprobs, slp), count=out.count + rows.astype(jnp.int32),
                     reason=jnp.where(rows, reason, out.reason))
    return i + 1, st, out

  _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
  return constrain(state, state_sharding), out


def jit_cache_sizes() -> dict[str, int]:
  """Compiled programs held by the sampler's jitted functions in this process (all engines)."""
  return {"encode": encode._cache_size(), "slice": slice_embeds._cache_size(), "append": append._cache_size(),
          "decode": decode._cache_size()}
