"""The device side of the sampler: a fixed batch of slots over one static-shape KV cache.

Each slot holds one sequence. Three jitted programs act on all slots at once:

  * `encode`: the vision tower over the images of the slots that append one now
    ([rows, patches, patch_dim] -> per-slot image embeddings [slots, patches / 4, hidden]);
  * `append`: a right-padded chunk per slot (a prompt, or an observation turn) written into the cache at
    the slot's current length (a prompt first clears the slot), then the first token of the next turn is
    sampled from the chunk's last position. Slots with nothing to append take part with an all-padding
    chunk: they write nothing valid and do not advance. Long chunks are cut into pieces of the largest
    chunk bucket, so one program serves any length. The piece's image embeddings come in aligned to its
    tokens ([slots, C, hidden], cut by a tiny gather program), so this program depends on C only;
  * `decode`: up to `decode_steps` single-token steps in one `lax.while_loop`, leaving early once every
    slot has stopped, so the host sees one round trip per `decode_steps` tokens.

State per slot (all device arrays, see `programs.SlotState`): the cache rows, the last sampled token (not yet in
the cache: the next step or chunk writes it first), its M-RoPE position, a PRNG key, the stop-string
automaton state, the turn's token count and limit, and optional forced tokens.

Cache layout: `decoder.SlotCache`, keys [layers, slots, kv_heads, head_dim, cache_len] and values
[layers, slots, kv_heads, cache_len, head_dim] (see `decoder` for why), updated in place. `cache_len`
is `max_context + largest chunk bucket`: a slot never holds more than `max_context` tokens, so every
write, padded or idle, lands past the slot's content and inside the cache (writes past the end would
be dropped, never clamped onto real entries). Attention reads only a power-of-two window of the cache
when `window_min` is set.

Shapes that vary (chunk length, patch count, image rows) are rounded up to buckets, so the number of
compiled programs is bounded by the bucket lists (see `Engine.programs`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mini_o3_jax.model import rope
from mini_o3_jax.model.vision import VisionInputs
from mini_o3_jax.sampler.decoder import SlotCache
from mini_o3_jax.sampler import programs as programs_lib
from mini_o3_jax.sampler import sampling as sampling_lib
from mini_o3_jax.sampler.sampling import SamplingParams
from mini_o3_jax.sampler.stops import StopMatcher
from mini_o3_jax import shapes
from mini_o3_jax import sharding as shard_lib

_log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Static shape and sampling settings of an engine.

  num_slots: sequences decoded together (shard over data x fsdp: must divide by that mesh size).
  max_context: most tokens one slot may hold (prompt + every turn).
  chunk_buckets: allowed append chunk lengths; chunks longer than the largest are split into pieces.
  patch_buckets: allowed per-slot patch counts for the vision tower (None: powers of two >= 16).
  image_row_buckets: allowed numbers of slots encoded by one vision call (None: powers of two up to
    num_slots).
  decode_steps: decode steps per host round trip.
  window_min: 0 = attention always reads the whole cache (one program per chunk bucket and one
    decode program; cost independent of how full the cache is); W > 0 = attention reads only the
    smallest of W, 2W, 4W, ... (or the whole cache) that holds every participating slot's context
    (for decode: after `decode_steps` more tokens): cheaper while contexts are short, one program
    per window used.
  max_forced_tokens: width of the per-slot forced-token buffer (scripted turns); 0 disables forcing.
  cache_len: override of the cache length (default max_context + largest chunk bucket, rounded to 8);
    only safe when no chunk is appended past `cache_len - largest bucket`.
  """
  num_slots: int = 8
  max_context: int = 2048
  chunk_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
  patch_buckets: tuple[int, ...] | None = None
  image_row_buckets: tuple[int, ...] | None = None
  decode_steps: int = 16
  window_min: int = 0
  max_forced_tokens: int = 0
  sampling: SamplingParams = SamplingParams()
  cache_len: int | None = None

  def __post_init__(self):
    if self.num_slots < 1 or self.max_context < 2 or self.decode_steps < 1 or not self.chunk_buckets:
      raise ValueError(f"bad engine config {self}")

  @property
  def piece_len(self) -> int:
    return max(self.chunk_buckets)

  @property
  def capacity(self) -> int:
    if self.cache_len is not None:
      return self.cache_len
    return -(-(self.max_context + self.piece_len) // 8) * 8


# ----------------------------------------------------------------------------- host side


@dataclasses.dataclass
class Chunk:
  """Tokens to append to one slot, and how the turn that follows starts.

  ids: int [n] (n >= 1); positions: int [3, n] absolute M-RoPE positions; next_pos: position of the
  token sampled after the chunk; turn_limit: tokens the turn may sample; pixel_values / grids: the
  chunk's images in order ([patches, patch_dim], [images, 3]); reset: the chunk starts a new sequence;
  key: uint32 [2], the slot's new PRNG key (required with reset); forced: token ids that open the turn.
  """
  ids: np.ndarray
  positions: np.ndarray
  next_pos: int
  turn_limit: int
  pixel_values: np.ndarray | None = None
  grids: np.ndarray | None = None
  reset: bool = False
  key: np.ndarray | None = None
  forced: Sequence[int] = ()


def chunk_positions(ids: np.ndarray, grids: np.ndarray | None, offset: int, *, image_token_id: int,
                    merge: int) -> tuple[np.ndarray, int]:
  """M-RoPE positions [3, n] of a chunk that starts at position `offset`, and the position after it."""
  ids = np.asarray(ids).reshape(1, -1)
  grids = None if grids is None or len(grids) == 0 else np.asarray(grids).reshape(-1, 3)
  pos, delta = rope.get_rope_index(ids, grids, None, image_token_id=image_token_id, spatial_merge_size=merge)
  return pos[:, 0] + offset, int(offset + ids.shape[1] + delta[0])


def slot_state_shardings(mesh: Mesh, state: programs_lib.SlotState) -> programs_lib.SlotState:
  """Slots over data x fsdp; KV heads over tensor when they divide; everything else replicated."""

  def spec(x):
    return shard_lib.batch_sharding(mesh, x.ndim)

  c = state.cache
  cache = SlotCache(
      k=shard_lib.named_sharding(mesh, ("layers", "cache_slots", "cache_kv_heads", "cache_head_dim",
                                        "cache_length"), c.k.shape),
      v=shard_lib.named_sharding(mesh, ("layers", "cache_slots", "cache_kv_heads", "cache_length",
                                        "cache_head_dim"), c.v.shape),
      valid=spec(c.valid), length=spec(c.length))
  rest = {f.name: spec(getattr(state, f.name)) for f in dataclasses.fields(state) if f.name != "cache"}
  return programs_lib.SlotState(cache=cache, **rest)


class Engine:
  """Host wrapper: owns the device slot state and turns per-slot requests into bucketed calls."""

  def __init__(self, model, config: EngineConfig, *, stop_token_ids: Sequence[int] = (),
               matcher: StopMatcher | None = None, mesh: Mesh | None = None,
               suppressed_token_ids: Sequence[int] = ()):
    """suppressed_token_ids: tokens never sampled (their logits are -inf; the recorded log-probs are
    those of this masked policy, which `losses.suppression_bias` reproduces in training)."""
    self.config = config
    self.model_config = model.config
    self.mesh = mesh
    self.graphdef, params = nnx.split(model)
    vocab = self.model_config.text.vocab_size
    self.matcher = matcher if matcher is not None else StopMatcher.none(vocab)
    if self.matcher.table.shape[1] != vocab:
      raise ValueError(f"stop matcher covers {self.matcher.table.shape[1]} tokens, the model {vocab}")
    # Every array handed to the jitted programs is committed to a device (or mesh): jit keys its
    # cache on committedness, and a mix of fresh host arrays and program outputs would compile each
    # program twice (measured).
    self._device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    self._batch_ways = 1
    if mesh is not None:
      self._batch_ways = shard_lib.batch_ways(mesh)
      if config.num_slots % self._batch_ways:
        raise ValueError(f"num_slots={config.num_slots} must be divisible by data x fsdp = {self._batch_ways}")
    self.params = self._place_params(params)
    self.table = self._replicated(np.asarray(self.matcher.table, np.int32))
    stop_ids = sorted(set(int(t) for t in stop_token_ids))
    # Padded with -1 (never sampled) to a multiple of 4, so the count rarely changes the program.
    stop_ids += [-1] * (-len(stop_ids) % 4 or (4 if not stop_ids else 0))
    self.stop_ids = self._replicated(np.asarray(stop_ids, np.int32))
    self.logit_bias = self._replicated(np.asarray(sampling_lib.suppression_bias(vocab, suppressed_token_ids)))
    self.state = self._init_state()
    self.lengths = np.zeros((config.num_slots,), np.int64)   # host mirror of state.cache.length
    self._active = np.zeros((config.num_slots,), bool)       # host mirror of state.active
    self.state_sharding = None if mesh is None else slot_state_shardings(mesh, self.state)
    self.state = jax.device_put(self.state, self._device if mesh is None else self.state_sharding)
    self._no_images: dict[int, jax.Array] = {}   # chunk bucket -> zeros [slots, C, hidden]
    self._oversized: collections.Counter[int] = collections.Counter()  # patches past patch_buckets -> images
    # Distinct (program, bucketed shape) pairs this engine has run: each is one compile in a fresh
    # process. ("slice", N, C) programs are tiny gathers; the others hold the model.
    self.programs: set[tuple] = set()

  # ---------------------------------------------------------------- placement

  def _place_params(self, params):
    if self.mesh is None:
      return jax.device_put(params, self._device)
    return jax.device_put(params, shard_lib.state_shardings(params, self.mesh))

  def set_params(self, model) -> None:
    """Swaps in new weights (same structure), e.g. after an RL update; compiled programs are reused."""
    graphdef, params = nnx.split(model)
    if graphdef != self.graphdef:
      raise ValueError("set_params needs a model of the same structure")
    self.params = self._place_params(params)

  def _replicated(self, x):
    return jax.device_put(x, self._device if self.mesh is None else NamedSharding(self.mesh, P()))

  def _put_slots(self, x, axis: int = 0):
    """Host array with a slot axis -> device, sharded over data x fsdp when there is a mesh."""
    if self.mesh is None:
      return jax.device_put(x, self._device)
    return jax.device_put(x, shard_lib.batch_sharding(self.mesh, np.ndim(x), axis))

  def _init_state(self) -> programs_lib.SlotState:
    cfg, s = self.config, self.config.num_slots
    cache = SlotCache.zeros(self.model_config.text, s, cfg.capacity, jnp.dtype(self.model_config.dtype))
    # Distinct buffers per field: the state is donated, and one buffer must not be donated twice.
    zeros = lambda: jnp.zeros((s,), jnp.int32)  # noqa: E731
    return programs_lib.SlotState(cache=cache, token=zeros(), pos=zeros(), key=jnp.zeros((s, 2), jnp.uint32),
                     stop_state=zeros(), turn_len=zeros(), turn_limit=jnp.ones((s,), jnp.int32),
                     active=jnp.zeros((s,), bool),
                     forced=jnp.full((s, max(1, cfg.max_forced_tokens)), -1, jnp.int32))

  def reset(self) -> None:
    """Drops every slot's sequence (the cache memory is reused)."""
    self.state = dataclasses.replace(self.state, active=jnp.zeros_like(self.state.active))
    self._active = np.zeros((self.config.num_slots,), bool)

  def _window(self, need: int) -> int:
    """Attention window covering `need` cache entries (the whole cache when windows are off)."""
    cfg = self.config
    if cfg.window_min <= 0:
      return cfg.capacity
    w = cfg.window_min
    while w < need:
      w *= 2
    return min(w, cfg.capacity)

  @property
  def num_programs(self) -> int:
    return len(self.programs)

  # ---------------------------------------------------------------- calls

  @property
  def _slot_sharding(self):
    if self.mesh is None:
      return None
    return shard_lib.batch_sharding(self.mesh, 1)

  def _zeros_embeds(self, width: int):
    if width not in self._no_images:
      hidden = self.model_config.text.hidden_size * self.model_config.embed_levels
      self._no_images[width] = self._put_slots(np.zeros((self.config.num_slots, width, hidden),
                                                        jnp.dtype(self.model_config.dtype)))
    return self._no_images[width]

  def _encode(self, chunks: Mapping[int, Chunk]):
    """Image embeddings [slots, N, hidden] for the chunks' images in order, or None if there are none."""
    vcfg = self.model_config.vision
    rows = [s for s, c in chunks.items() if c.grids is not None and len(c.grids)]
    if not rows:
      return None
    counts = [int(np.prod(np.asarray(chunks[s].grids).reshape(-1, 3), -1).sum()) for s in rows]
    most = max(counts)
    buckets = self.config.patch_buckets
    if buckets and most > max(buckets):
      # Rare shapes (e.g. a thin crop upscaled past max_pixels) get a power-of-two program of their own.
      # Reported once per size, then at 10, 100, ... occurrences, so a log stays readable.
      self._oversized[most] += 1
      seen = self._oversized[most]
      if seen == 10 ** round(np.log10(seen)):
        _log.warning("an image of %d patches exceeds patch_buckets %s (%d time%s so far)", most, buckets, seen,
                     "" if seen == 1 else "s")
      buckets = None
    p = shapes.bucket(most, buckets, what="patches of an image", minimum=16)
    r = min(shapes.bucket(len(rows), self.config.image_row_buckets, what="image rows"), self.config.num_slots)
    pv = np.zeros((r, p, vcfg.patch_dim), np.float32)
    layouts, slot_of_row = [], np.full((r,), self.config.num_slots, np.int32)
    for i in range(r):
      if i < len(rows):
        c = chunks[rows[i]]
        pv[i, :counts[i]] = c.pixel_values
        layouts.append(VisionInputs.build(np.asarray(c.grids).reshape(-1, 3), vcfg, pad_to=p))
        slot_of_row[i] = rows[i]
      else:
        layouts.append(VisionInputs.build(np.zeros((0, 3), np.int64), vcfg, pad_to=p))
    vision = jax.tree.map(lambda *xs: np.stack(xs), *layouts)
    self.programs.add(("encode", r, p))
    inputs = self._replicated((pv.astype(jnp.dtype(self.model_config.dtype)), vision, slot_of_row))
    return programs_lib.encode(self.graphdef, self.params, *inputs, num_slots=self.config.num_slots,
                   out_sharding=self._slot_sharding)

  def append(self, chunks: Mapping[int, Chunk]) -> tuple[programs_lib.StepOutput, jax.Array]:
    """Appends `chunks` (slot -> Chunk) and samples each appended slot's first token.

    Returns the StepOutput (numpy; rows not in `chunks` have count 0) and the device logits
    [slots, vocab] at each appended slot's last chunk token.
    """
    cfg, s = self.config, self.config.num_slots
    width = max(1, cfg.max_forced_tokens)
    image_token = self.model_config.image_token_id
    for slot, c in chunks.items():
      if not 0 <= slot < s:
        raise ValueError(f"slot {slot} out of range")
      if len(c.ids) < 1:
        raise ValueError("a chunk needs at least one token")
      if c.reset and c.key is None:
        raise ValueError("a chunk that starts a sequence needs a PRNG key")
      if len(c.forced) > cfg.max_forced_tokens:
        raise ValueError(f"{len(c.forced)} forced tokens but max_forced_tokens={cfg.max_forced_tokens}")
      start = 0 if c.reset else int(self.lengths[slot])
      if start + len(c.ids) > cfg.max_context:
        raise ValueError(f"slot {slot}: {start} + {len(c.ids)} tokens exceed max_context={cfg.max_context}")
    starts = {slot: 0 if c.reset else int(self.lengths[slot]) for slot, c in chunks.items()}
    embeds = self._encode(chunks)
    n_pieces = max(-(-len(c.ids) // cfg.piece_len) for c in chunks.values())
    outs = []
    state = self.state
    for p in range(n_pieces):
      lo = p * cfg.piece_len
      n_real = {slot: int(np.clip(len(c.ids) - lo, 0, cfg.piece_len)) for slot, c in chunks.items()}
      width_c = shapes.bucket(max(max(n_real.values()), 1), cfg.chunk_buckets, what="chunk length")
      ids = np.zeros((s, width_c), np.int32)
      pos = np.zeros((3, s, width_c), np.int32)
      mask = np.zeros((s, width_c), np.int32)
      img_offset = np.zeros((s,), np.int32)
      has_image = False
      reset = np.zeros((s,), bool)
      sample = np.zeros((s,), bool)
      last = np.zeros((s,), np.int32)
      next_pos = np.zeros((s,), np.int32)
      turn_limit = np.ones((s,), np.int32)
      forced = np.full((s, width), -1, np.int32)
      new_key = np.zeros((s,), bool)
      key = np.zeros((s, 2), np.uint32)
      for slot, c in chunks.items():
        n = n_real[slot]
        ids[slot, :n] = c.ids[lo:lo + n]
        pos[:, slot, :n] = c.positions[:, lo:lo + n]
        mask[slot, :n] = 1
        img_offset[slot] = int(np.sum(np.asarray(c.ids[:lo]) == image_token))
        has_image |= bool(np.any(np.asarray(c.ids[lo:lo + n]) == image_token))
        reset[slot] = c.reset and p == 0
        if lo < len(c.ids) <= lo + cfg.piece_len:
          sample[slot] = True
          last[slot] = n - 1
          next_pos[slot] = c.next_pos
          turn_limit[slot] = c.turn_limit
          forced[slot, :len(c.forced)] = c.forced
          if c.key is not None:
            new_key[slot] = True
            key[slot] = c.key
      if has_image:
        self.programs.add(("slice", embeds.shape[1], width_c))
        piece_embeds = programs_lib.slice_embeds(embeds, self._put_slots(img_offset), width=width_c,
                                     out_sharding=self._slot_sharding)
      else:
        piece_embeds = self._zeros_embeds(width_c)
      piece = programs_lib.Piece(ids=self._put_slots(ids), positions=self._put_slots(pos, axis=1), mask=self._put_slots(mask),
                    reset=self._put_slots(reset),
                    sample=self._put_slots(sample), last=self._put_slots(last), next_pos=self._put_slots(next_pos),
                    turn_limit=self._put_slots(turn_limit), forced=self._put_slots(forced),
                    new_key=self._put_slots(new_key), key=self._put_slots(key))
      window = self._window(max(starts[slot] + lo + n_real[slot] for slot in chunks))
      self.programs.add(("append", width_c, window))
      state, out, piece_logits = programs_lib.append(self.graphdef, self.params, state, piece, piece_embeds, self.table,
                                         self.stop_ids, self.logit_bias, sampling=cfg.sampling, window=window,
                                         match_state=self.matcher.match_state, state_sharding=self.state_sharding)
      outs.append((sample, out, piece_logits))
    self.state = state
    for slot, c in chunks.items():
      self.lengths[slot] = (0 if c.reset else self.lengths[slot]) + len(c.ids)
    # Each slot sampled in exactly one piece; read the outputs only now so the pieces run back to back.
    results, logits = None, None
    for sample, out, piece_logits in outs:
      out = jax.tree.map(np.asarray, out)
      if results is None:
        results, logits = out, piece_logits
      else:
        pick = lambda a, b: np.where(sample.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)  # noqa: E731
        results = jax.tree.map(pick, results, out)
        logits = jnp.where(jnp.asarray(sample)[:, None], piece_logits, logits)
    for slot in chunks:
      self._active[slot] = results.reason[slot] == programs_lib.RUNNING
    return results, logits

  def decode(self) -> programs_lib.StepOutput:
    """Runs up to `decode_steps` tokens for every active slot; numpy StepOutput."""
    cfg = self.config
    window = self._window(int(self.lengths[self._active].max(initial=0)) + cfg.decode_steps)
    self.programs.add(("decode", cfg.decode_steps, window))
    self.state, out = programs_lib.decode(self.graphdef, self.params, self.state, self.table, self.stop_ids, self.logit_bias,
                              sampling=cfg.sampling, steps=cfg.decode_steps, window=window,
                              match_state=self.matcher.match_state, state_sharding=self.state_sharding)
    out = jax.tree.map(np.asarray, out)
    # Each decode step first writes the slot's pending token, so the cache grows by the count.
    self.lengths += out.count
    self._active &= out.reason == programs_lib.RUNNING
    return out

  def active(self) -> np.ndarray:
    """Which slots are still generating their turn (host copy; no device sync)."""
    return self._active.copy()
