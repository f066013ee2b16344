"""Single-turn batched generation: `transformers`-shaped inputs in, new tokens and log-probs out."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from mini_o3_jax.model import rope, vlm
from mini_o3_jax.sampler import engine as engine_lib
from mini_o3_jax.sampler import programs as programs_lib
from mini_o3_jax.sampler.sampling import SamplingParams
from mini_o3_jax.sampler.stops import StopMatcher


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """tokens int32 [batch, max_new_tokens] (pad_token_id after each row's end); logprobs /
  sample_logprobs float32 [batch, max_new_tokens] (0 on padding; see `sampling` for the convention);
  lengths int32 [batch]; finish_reasons: "stop_token" | "stop_string" | "length" per row."""
  tokens: np.ndarray
  logprobs: np.ndarray
  sample_logprobs: np.ndarray
  lengths: np.ndarray
  finish_reasons: tuple[str, ...]


def split_rows(config, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values, image_grid_thw):
  """Per row: (real token ids [n], pixel_values [patches, dim] | None, grids [images, 3] | None).

  Images are listed in row-major order of their placeholder runs, as `transformers` expects.
  """
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  grids = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  merge = config.vision.spatial_merge_size
  counts = [] if grids is None else list(rope.image_token_counts(grids, merge))
  pv = None if pixel_values is None else np.asarray(pixel_values, np.float32)
  rows, next_image, next_patch = [], 0, 0
  for r in range(ids.shape[0]):
    real = ids[r][mask[r] != 0].astype(np.int32)
    n_tokens = int(np.sum(real == config.image_token_id))
    row_grids, taken = [], 0
    while taken < n_tokens:
      if next_image >= len(counts):
        raise ValueError(f"row {r} has more image tokens than image_grid_thw describes")
      row_grids.append(grids[next_image])
      taken += counts[next_image]
      next_image += 1
    if taken != n_tokens:
      raise ValueError(f"row {r}: {n_tokens} image tokens do not match its images' {taken}")
    if row_grids:
      g = np.stack(row_grids)
      n = int(np.prod(g, -1).sum())
      rows.append((real, pv[next_patch:next_patch + n], g))
      next_patch += n
    else:
      rows.append((real, None, None))
  if grids is not None and next_image != len(grids):
    raise ValueError(f"image_grid_thw describes {len(grids)} images, the input ids hold {next_image}")
  return rows


def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
             max_new_tokens: int = 16, temperature: float = 0.0, *, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
             tokenizer=None, pad_token_id: int = 0, decode_steps: int = 32, window_min: int = 64,
             mesh=None) -> GenerateOutput:
  """Generates up to `max_new_tokens` per row (greedy when temperature == 0).

  Inputs mean what they mean in `transformers` (left or right padding both work: each row's real
  tokens are packed into its own cache slot). Stops a row at any of `stop_token_ids` (default: the
  config's eos token, if any) or, given `tokenizer`, at any of `stop_strings`; the stop token / string
  is kept. Row r samples with key fold_in(PRNGKey(seed), r).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  config = model.config
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
  vlm.check_token_ids(ids, config.text.vocab_size)
  rows = split_rows(config, ids, attention_mask, pixel_values, image_grid_thw)
  batch = len(rows)
  if stop_token_ids is None:
    eos = config.text.eos_token_id
    stop_token_ids = () if eos is None else (eos,)
  vocab = config.text.vocab_size
  if stop_strings:
    if tokenizer is None:
      raise ValueError("stop_strings need a tokenizer")
    matcher = StopMatcher.build(tokenizer, stop_strings, vocab)
  else:
    matcher = StopMatcher.none(vocab)
  longest = max(len(r[0]) for r in rows)
  chunk = -(-longest // 16) * 16   # one prefill piece; multiples of 16 keep the padding small
  max_context = -(-(longest + max_new_tokens) // 64) * 64
  cfg = engine_lib.EngineConfig(num_slots=batch, max_context=max_context, chunk_buckets=(chunk,),
                                decode_steps=decode_steps, window_min=window_min,
                                sampling=SamplingParams(temperature, top_k, top_p),
                                # Every chunk is written at length 0, so one free slot past the context suffices.
                                cache_len=-(-max(max_context + 1, chunk) // 64) * 64)
  eng = engine_lib.Engine(model, cfg, stop_token_ids=stop_token_ids, matcher=matcher, mesh=mesh)
  base = jax.random.PRNGKey(seed)
  chunks = {}
  for r, (real, pv, grids) in enumerate(rows):
    pos, next_pos = engine_lib.chunk_positions(real, grids, 0, image_token_id=config.image_token_id,
                                               merge=config.vision.spatial_merge_size)
    chunks[r] = engine_lib.Chunk(ids=real, positions=pos, next_pos=next_pos, turn_limit=max_new_tokens,
                                 pixel_values=pv, grids=grids, reset=True,
                                 key=np.asarray(jax.random.fold_in(base, r), np.uint32))
  out, _ = eng.append(chunks)
  tokens = np.full((batch, max_new_tokens), pad_token_id, np.int32)
  logprobs = np.zeros((batch, max_new_tokens), np.float32)
  sample_logprobs = np.zeros((batch, max_new_tokens), np.float32)
  lengths = np.zeros((batch,), np.int32)
  reasons = [programs_lib.RUNNING] * batch

  def take(out):
    for r in range(batch):
      c = int(out.count[r])
      if not c:
        continue
      n = lengths[r]
      tokens[r, n:n + c] = out.tokens[r, :c]
      logprobs[r, n:n + c] = out.logprobs[r, :c]
      sample_logprobs[r, n:n + c] = out.sample_logprobs[r, :c]
      lengths[r] += c
      if out.reason[r] != programs_lib.RUNNING:
        reasons[r] = int(out.reason[r])

  take(out)
  while any(rsn == programs_lib.RUNNING for rsn in reasons):
    take(eng.decode())
  return GenerateOutput(tokens=tokens, logprobs=logprobs, sample_logprobs=sample_logprobs, lengths=lengths,
                        finish_reasons=tuple(programs_lib.REASON_NAMES[r] for r in reasons))
