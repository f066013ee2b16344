"""Multi-turn visual-search rollouts: the agent protocol on top of the slot engine.

The host loop keeps every slot busy (continuous batching): a slot that finishes its trajectory takes
the next task; a slot that stops at `</grounding>` gets its tool call parsed and run by
`agent.execute_turn` (crop from the full-resolution source image), the crop preprocessed at the
configured pixel budget, and the observation turn appended to *its* cache at its current length by a
chunked prefill (the prefix is never recomputed). All slots that need an append at the same moment
share one `append` call; the others keep their state.

Few-shot context: a `Task` may carry `context`, messages (e.g. exemplar trajectories with their images
embedded) that the prompt puts before the question, after the system turn. They are part of the token
stream (and of `pixel_values` / `image_grid_thw`, first, counted by `num_context_images`) but not of the
trajectory: `trajectory.images[0]` is still the question's image and "observation_i" names the
question's own crops, so the model's turns are written out as SFT data without the exemplars.

Token bookkeeping per trajectory (what the RL step and the SFT writer consume):
  token_ids: prompt (with any context), then each assistant turn's sampled tokens, then each user turn
    (observation or error) as the chat template renders it: `<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n
    <|im_start|>assistant\\n` (with `<|vision_start|><|image_pad|>*n<|vision_end|>` for a crop).
  response_mask: 1 on sampled tokens (including a sampled `<|im_end|>`), 0 elsewhere. The
    `<|im_end|>` that closes a turn stopped by a stop string was not sampled: it belongs to the user
    turn and has mask 0.
  logprobs / sample_logprobs: see `sampling` (0 where the mask is 0).

Limits and stop reasons follow `agent.trajectory` exactly:
  answer / no_action   the turn ends in a well-formed answer / with neither answer nor call;
  max_turns            the max_turns-th turn ends in a tool call (even a malformed one);
  max_response         a turn runs out of tokens (per-turn limit or the context) before stopping;
  image_limit          a successful crop would exceed max_images (the original counts);
  max_context          the next observation (or error) turn would not leave room for one more token,
                       or the prompt alone does not fit.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from mini_o3_jax.agent import prompts
from mini_o3_jax.agent.task import Task
from mini_o3_jax.agent import tools
from mini_o3_jax.agent.trajectory import Trajectory, Turn, execute_turn
from mini_o3_jax.processing import chat
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tokenizer_lib
from mini_o3_jax.sampler import engine as engine_lib
from mini_o3_jax.sampler import programs as programs_lib
from mini_o3_jax.sampler.sampling import SamplingParams
from mini_o3_jax.sampler.stops import StopMatcher

_log = logging.getLogger(__name__)

# policy(task_index, trajectory so far) -> what the next assistant turn is forced to start with: text
# (tokenized), token ids, or None to let the model sample.
Policy = Callable[[int, Trajectory], "str | Sequence[int] | None"]


def vision_token_ids(model_config) -> tuple[int, ...]:
  """The vision placeholder ids of a model (image / video pads, vision start / end) in its vocabulary."""
  ids = {model_config.image_token_id, model_config.video_token_id, model_config.vision_start_token_id,
         model_config.vision_end_token_id}
  return tuple(sorted(i for i in ids if 0 <= i < model_config.text.vocab_size))


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Protocol limits, image budget and engine shapes of a rollout.

  max_context counts every token of a trajectory (prompt, turns, observations). max_turn_tokens caps
  one assistant turn. min_pixels / max_pixels bound every image (original and crops) before the
  vision tower. max_forced_tokens sizes the scripted-turn buffer (needed only with a `policy`).
  The other fields set the engine's shapes (see `engine.EngineConfig`). window_min > 0 (default 512)
  makes attention read only a power-of-two window covering the live context, so a turn costs what its
  context needs, at the price of one program per window size used; 0 reads the whole cache every
  step (fewest programs, cost independent of the context, wasteful when contexts are short).
  """
  num_slots: int = 8
  max_turns: int = 6
  max_context: int = 4096
  max_turn_tokens: int = 1024
  max_images: int = 12
  min_pixels: int = image_lib.DEFAULT_MIN_PIXELS
  max_pixels: int = image_lib.DEFAULT_MAX_PIXELS
  sampling: SamplingParams = SamplingParams(temperature=1.0)
  decode_steps: int = 16
  window_min: int = 512
  chunk_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
  patch_buckets: tuple[int, ...] | None = None
  image_row_buckets: tuple[int, ...] | None = None
  stop_strings: tuple[str, ...] = prompts.STOP_STRINGS
  add_default_system: bool = True
  crop_min_side: int = tools.MIN_SIDE
  crop_max_aspect: float = tools.MAX_ASPECT
  max_forced_tokens: int = 0
  # Never sample the vision placeholders (<|image_pad|>, <|vision_start|>, ...): a sampled one would be
  # taken for an image slot when the trajectory is trained on. The RL step masks the same logits
  # (`rl.RLConfig.suppressed_token_ids`), so behaviour and training policy stay equal.
  suppress_vision_tokens: bool = True

  def __post_init__(self):
    if self.max_turns < 1 or self.max_images < 1 or self.max_turn_tokens < 1:
      raise ValueError(f"bad rollout limits in {self}")

  def engine_config(self) -> engine_lib.EngineConfig:
    return engine_lib.EngineConfig(num_slots=self.num_slots, max_context=self.max_context,
                                   chunk_buckets=self.chunk_buckets, patch_buckets=self.patch_buckets,
                                   image_row_buckets=self.image_row_buckets,
                                   decode_steps=self.decode_steps, window_min=self.window_min,
                                   max_forced_tokens=self.max_forced_tokens,
                                   sampling=self.sampling)


@dataclasses.dataclass
class RolloutResult:
  """One finished trajectory; arrays are aligned over its T tokens."""
  task_index: int
  trajectory: Trajectory
  token_ids: np.ndarray        # int32 [T]
  response_mask: np.ndarray    # int32 [T]: 1 = sampled by the model
  logprobs: np.ndarray         # float32 [T]: behaviour log softmax(logits / T) of sampled tokens, else 0
  sample_logprobs: np.ndarray  # float32 [T]: under the truncated (top-k / top-p) distribution, else 0
  prompt_length: int
  pixel_values: list[np.ndarray]  # per image: float32 [patches, patch_dim]
  image_grid_thw: np.ndarray   # int64 [images, 3], in token order
  num_context_images: int = 0  # the first images of pixel_values / image_grid_thw belong to Task.context

  @property
  def images(self) -> list[Image.Image]:
    return self.trajectory.images

  @property
  def num_turns(self) -> int:
    return self.trajectory.num_turns

  @property
  def final_answer(self) -> str | None:
    return self.trajectory.final_answer

  @property
  def stop_reason(self) -> str:
    return self.trajectory.stop_reason

  @property
  def overturn(self) -> bool:
    return self.trajectory.overturn


@dataclasses.dataclass
class _Slot:
  """Host-side bookkeeping of the trajectory a slot is running."""
  task_index: int
  traj: Trajectory
  tokens: list[int]
  mask: list[int]
  logprobs: list[float]
  sample_logprobs: list[float]
  pixel_values: list[np.ndarray]
  grids: list[np.ndarray]
  prompt_length: int
  num_context_images: int = 0
  pos: int = 0                  # M-RoPE position of the last sampled token (pending, not yet cached)
  turn: list[int] = dataclasses.field(default_factory=list)


class Sampler:
  """Rollout engine for one model + tokenizer; reusable across batches (compiled programs persist)."""

  def __init__(self, model, tokenizer, config: RolloutConfig, *, mesh=None):
    self.config = config
    self.tokenizer = tokenizer
    self.model_config = model.config
    ids = tokenizer_lib.special_token_ids(tokenizer)
    if ids["image_token_id"] != model.config.image_token_id:
      raise ValueError(f"tokenizer's <|image_pad|> is {ids['image_token_id']} but the model expects "
                       f"{model.config.image_token_id}")
    if len(tokenizer) > model.config.text.vocab_size:
      raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                       f"{model.config.text.vocab_size}: its ids past that would wrap or give NaN logits")
    # Checked once here: every id the sampler feeds the model comes from this tokenizer.
    self.special_ids = ids
    stop_ids = {ids["im_end_token_id"], ids["eos_token_id"], ids["endoftext_token_id"]}
    vocab = model.config.text.vocab_size
    self.matcher = StopMatcher.build(tokenizer, config.stop_strings, vocab)
    suppressed = vision_token_ids(model.config) if config.suppress_vision_tokens else ()
    self.engine = engine_lib.Engine(model, config.engine_config(), stop_token_ids=sorted(stop_ids),
                                    matcher=self.matcher, mesh=mesh, suppressed_token_ids=suppressed)
    # What closes an assistant turn that ended on a stop string, before the next user turn.
    self._turn_close = list(tokenizer.encode(tokenizer_lib.IM_END + "\n", add_special_tokens=False))
    # id(context) -> (context, its preprocessed images): the K samples of a question, and every question
    # of a few-shot run, share one context, whose images need preprocessing once.
    self._context_cache: dict[int, tuple[Any, list[tuple[np.ndarray, np.ndarray]]]] = {}

  def set_params(self, model) -> None:
    self.engine.set_params(model)

  # ---------------------------------------------------------------- helpers

  def _preprocess(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    return image_lib.preprocess_image(image, self.config.min_pixels, self.config.max_pixels,
                                      **image_lib.settings_for(self.model_config))

  def _tokenize(self, message: Mapping[str, Any], grids: Sequence[np.ndarray], first: bool,
                context: Sequence[Mapping[str, Any]] = ()) -> list[int]:
    enc = chat.tokenize_conversation(self.tokenizer, [*context, message], grids,
                                     self.model_config.vision.spatial_merge_size, add_generation_prompt=True,
                                     add_default_system=first and self.config.add_default_system)
    return enc["input_ids"].tolist()

  def _context_images(self, context: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pixel_values, grid) of every image item of `context`, in order (cached per context object)."""
    hit = self._context_cache.get(id(context))
    if hit is not None and hit[0] is context:
      return hit[1]
    # An image part as the chat template sees it (its type, or an "image" / "image_url" key).
    images = [part.get("image") for m in context if not isinstance(m.get("content"), str)
              for part in m["content"]
              if part.get("type") == "image" or "image" in part or "image_url" in part]
    if any(not isinstance(im, Image.Image) for im in images):
      raise ValueError("every image item of Task.context must embed a PIL image under 'image'")
    processed = [self._preprocess(im) for im in images]
    if len(self._context_cache) >= 8:
      self._context_cache.clear()
    self._context_cache[id(context)] = (context, processed)
    return processed

  def _positions(self, ids: Sequence[int], grid: np.ndarray | None, offset: int):
    """Positions of a chunk; `grid` is one image's [3] grid or several images' [n, 3]."""
    return engine_lib.chunk_positions(np.asarray(ids, np.int32), None if grid is None else np.reshape(grid, (-1, 3)),
                                      offset,
                                      image_token_id=self.model_config.image_token_id,
                                      merge=self.model_config.vision.spatial_merge_size)

  def _forced(self, policy: Policy | None, slot: _Slot) -> list[int]:
    if policy is None:
      return []
    forced = policy(slot.task_index, slot.traj)
    if forced is None or len(forced) == 0:
      return []
    if isinstance(forced, str):
      return list(self.tokenizer.encode(forced, add_special_tokens=False))
    return [int(t) for t in forced]

  def _result(self, slot: _Slot, stop_reason: str) -> RolloutResult:
    slot.traj.stop_reason = stop_reason
    slot.traj.validate()
    grids = np.stack(slot.grids).astype(np.int64) if slot.grids else np.zeros((0, 3), np.int64)
    return RolloutResult(task_index=slot.task_index, trajectory=slot.traj,
                         token_ids=np.asarray(slot.tokens, np.int32), response_mask=np.asarray(slot.mask, np.int32),
                         logprobs=np.asarray(slot.logprobs, np.float32),
                         sample_logprobs=np.asarray(slot.sample_logprobs, np.float32),
                         prompt_length=slot.prompt_length, pixel_values=slot.pixel_values, image_grid_thw=grids,
                         num_context_images=slot.num_context_images)

  # ---------------------------------------------------------------- protocol steps

  def _start(self, index: int, task: Task, key, policy):
    """A new trajectory: (slot, prompt chunk), or (slot, None) if the prompt alone does not fit."""
    cfg = self.config
    traj = Trajectory(question=task.question, images=[task.image], options=None if task.options is None
                      else list(task.options), prompt=task.prompt, gold=task.gold, id=task.id)
    context = list(task.context or ())
    processed = (self._context_images(task.context) if context else []) + [self._preprocess(task.image)]
    pvs, grids = [p for p, _ in processed], [g for _, g in processed]
    ids = self._tokenize(prompts.prompt_message(traj.prompt_text), grids, first=True, context=context)
    slot = _Slot(task_index=index, traj=traj, tokens=list(ids), mask=[0] * len(ids), logprobs=[0.0] * len(ids),
                 sample_logprobs=[0.0] * len(ids), pixel_values=pvs, grids=grids, prompt_length=len(ids),
                 num_context_images=len(grids) - 1)
    if len(ids) + 1 > cfg.max_context:
      _log.warning("task %d: prompt of %d tokens does not fit max_context=%d", index, len(ids), cfg.max_context)
      return slot, None
    pos, next_pos = self._positions(ids, np.stack(grids), 0)
    slot.pos = next_pos
    chunk = engine_lib.Chunk(ids=np.asarray(ids, np.int32), positions=pos, next_pos=next_pos,
                             turn_limit=min(cfg.max_turn_tokens, cfg.max_context - len(ids)),
                             pixel_values=np.concatenate(pvs), grids=np.stack(grids), reset=True,
                             key=np.asarray(key, np.uint32),
                             forced=self._forced(policy, slot))
    return slot, chunk

  def _end_turn(self, slot: _Slot, reason: int, policy) -> tuple[str | None, engine_lib.Chunk | None]:
    """Closes the turn the slot just stopped; returns (stop reason, None) or (None, next chunk)."""
    cfg = self.config
    turn_ids = slot.turn
    slot.turn = []
    text_ids = turn_ids[:-1] if reason == programs_lib.STOP_TOKEN else turn_ids
    text = tools.truncate_at_stop(
        self.tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        cfg.stop_strings)
    traj = slot.traj
    if reason == programs_lib.LENGTH:
      traj.turns.append(Turn(text))
      return "max_response", None
    action = tools.parse_action(text)
    if isinstance(action, tools.FinalAnswer):
      traj.turns.append(Turn(text))
      return "answer", None
    if isinstance(action, tools.NoAction):
      traj.turns.append(Turn(text))
      return "no_action", None
    # A tool call, well-formed or not.
    if len(traj.turns) + 1 >= cfg.max_turns:
      traj.turns.append(Turn(text))
      return "max_turns", None
    turn, image = execute_turn(text, traj.images, cfg.crop_min_side, cfg.crop_max_aspect)
    action_index = len(traj.turns)
    pv = grid = None
    if image is not None:
      if len(traj.images) + 1 > cfg.max_images:
        traj.turns.append(Turn(text))
        return "image_limit", None
      try:
        pv, grid = self._preprocess(image)
      except ValueError as e:  # e.g. a crop_max_aspect above the processor's limit: still the model's error
        turn, image = Turn(text, error=f"the zoom-in image cannot be used: {e}"), None
    user = self._turn_close + self._tokenize(turn.followup_message(action_index), [] if grid is None else [grid],
                                             first=False)
    total = len(slot.tokens) + len(user)
    if total + 1 > cfg.max_context:
      traj.turns.append(Turn(text))
      return "max_context", None
    traj.turns.append(turn)
    if image is not None:
      traj.images.append(image)
      slot.pixel_values.append(pv)
      slot.grids.append(grid)
    # The pending token (the turn's last, not yet in the cache) opens the chunk.
    chunk_ids = [slot.tokens[-1]] + user
    pos, next_pos = self._positions(chunk_ids, grid, slot.pos)
    slot.tokens += user
    slot.mask += [0] * len(user)
    slot.logprobs += [0.0] * len(user)
    slot.sample_logprobs += [0.0] * len(user)
    slot.pos = next_pos
    chunk = engine_lib.Chunk(ids=np.asarray(chunk_ids, np.int32), positions=pos, next_pos=next_pos,
                             turn_limit=min(cfg.max_turn_tokens, cfg.max_context - total), pixel_values=pv,
                             grids=None if grid is None else grid[None], forced=self._forced(policy, slot))
    return None, chunk

  # ---------------------------------------------------------------- the loop

  def rollout(self, tasks: Sequence[Task], *, seed: int = 0, policy: Policy | None = None,
              key_ids: Sequence[int] | None = None) -> list[RolloutResult]:
    """Runs every task to the end of its trajectory; results in task order.

    Task i samples with key fold_in(PRNGKey(seed), key_ids[i]) (default key_ids[i] = i; pass global
    indices when tasks are split across hosts), advanced only by its own steps, so a trajectory does
    not depend on the number of slots, the order slots free up, or the sharding.
    `policy` (optional) forces the opening text of turns: called before every assistant turn with the
    task index and the trajectory so far; a returned string is tokenized and forced (then sampling
    resumes if it did not stop), None lets the model sample.
    """
    eng = self.engine
    num_slots = self.config.num_slots
    base_key = jax.random.PRNGKey(seed)
    key_ids = list(range(len(tasks))) if key_ids is None else [int(k) for k in key_ids]
    if len(key_ids) != len(tasks):
      raise ValueError(f"{len(key_ids)} key_ids for {len(tasks)} tasks")
    queue = collections.deque(range(len(tasks)))
    slots: list[_Slot | None] = [None] * num_slots
    running = [False] * num_slots
    results: list[RolloutResult | None] = [None] * len(tasks)
    pending: dict[int, engine_lib.Chunk] = {}
    eng.reset()

    def finish(s: int, reason: str):
      results[slots[s].task_index] = self._result(slots[s], reason)
      slots[s] = None
      running[s] = False

    def take(s: int, out: programs_lib.StepOutput, decoded: bool):
      slot, c = slots[s], int(out.count[s])
      toks = out.tokens[s, :c].tolist()
      slot.tokens += toks
      slot.mask += [1] * c
      slot.logprobs += out.logprobs[s, :c].tolist()
      slot.sample_logprobs += out.sample_logprobs[s, :c].tolist()
      slot.turn += toks
      if decoded:
        slot.pos += c
      reason = int(out.reason[s])
      if reason == programs_lib.RUNNING:
        return
      running[s] = False
      stop, chunk = self._end_turn(slot, reason, policy)
      if stop is not None:
        finish(s, stop)
      else:
        pending[s] = chunk

    while True:
      for s in range(num_slots):
        while slots[s] is None and s not in pending and queue:
          i = queue.popleft()
          slots[s], chunk = self._start(i, tasks[i], jax.random.fold_in(base_key, key_ids[i]), policy)
          if chunk is None:
            finish(s, "max_context")
          else:
            pending[s] = chunk
      if pending:
        chunks = dict(pending)
        pending.clear()
        out, _ = eng.append(chunks)
        for s in chunks:
          running[s] = True
          take(s, out, decoded=False)
        continue
      live = [s for s in range(num_slots) if running[s]]
      if not live:
        break
      out = eng.decode()
      for s in live:
        take(s, out, decoded=True)
    return results


def rollout(model, tokenizer, tasks: Sequence[Task], config: RolloutConfig, *, seed: int = 0,
            policy: Policy | None = None, key_ids: Sequence[int] | None = None, mesh=None) -> list[RolloutResult]:
  """One-shot convenience: builds a `Sampler` and runs `tasks` (see `Sampler.rollout`)."""
  return Sampler(model, tokenizer, config, mesh=mesh).rollout(tasks, seed=seed, policy=policy, key_ids=key_ids)
