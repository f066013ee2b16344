"""A run's ConfigDict read into the typed configs the package runs on: model, pixel budget, scenes,
sampler, and each training stage's loop, optimizer, step and batches.

A leaf under `pipeline/`, `export` and the tools: they read run configs through it, and nothing below
`pipeline/` imports it. Defaults for a key live here or in the dataclass it fills (`RolloutConfig`,
`OptimizerConfig`, `SFTConfig`, `RLConfig`, `GroundingConfig`, ...) and nowhere else: a key the section
leaves unset takes the dataclass's default.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from mini_o3_jax.data import coldstart, grounding, scene_levels, synthetic
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.rl.config import RLConfig
from mini_o3_jax.sampler.rollout import RolloutConfig, vision_token_ids
from mini_o3_jax.sampler.sampling import SamplingParams
from mini_o3_jax.train.batch import BatchConfig
from mini_o3_jax.train.optimizer import OptimizerConfig
from mini_o3_jax.train.sft import SFTConfig
from mini_o3_jax.train.vision_targets import FeatureTargetConfig

PRESETS = {"qwen25vl_7b": config_lib.qwen25vl_7b, "qwen25vl_3b": config_lib.qwen25vl_3b,
           "qwen3vl_8b": config_lib.qwen3vl_8b}
# Tiny presets take the tokenizer's vocabulary size and special-token ids.
TINY_PRESETS = {"tiny": config_lib.tiny, "tiny_qwen3": config_lib.tiny_qwen3}


# ----------------------------------------------------------------------------- images and scenes

def sets_pixel_budget(config) -> bool:
  """Whether the run config names its images' pixel budget (else the processor's defaults apply)."""
  return bool(config.get("view_pixels") or config.get("min_pixels") or config.get("max_pixels"))


def pixel_budget(config, section=None) -> tuple[int, int]:
  """(min_pixels, max_pixels) of every image: `section`'s own non-zero min / max_pixels, else the demo's
  single `view_pixels`, else the config's min / max_pixels, else the image processor's defaults."""
  view = config.get("view_pixels")
  own_lo = section.get("min_pixels") if section is not None else None
  own_hi = section.get("max_pixels") if section is not None else None
  lo = own_lo or view or config.get("min_pixels") or image_lib.DEFAULT_MIN_PIXELS
  hi = own_hi or view or config.get("max_pixels") or image_lib.DEFAULT_MAX_PIXELS
  return int(lo), int(hi)


def task_config(config) -> synthetic.SyntheticConfig:
  """The synthetic world's config: scenes drawn from the run's seed, labels shaded by its `label_shade`, viewed at
  the demo's `view_pixels` (the generator's own view budget when the run has none)."""
  world = dict(seed=config.get("seed", 0), label_shade=config.get("label_shade", 0.0))
  if "view_pixels" in config:
    world.update(view_min_pixels=config.view_pixels, view_max_pixels=config.view_pixels)
  return synthetic.SyntheticConfig(**world)


def explorer_config(config) -> coldstart.ExplorerConfig:
  """The scripted cold start's explorer: its first crop as `data.first_crop` says (the pattern mix fixed)."""
  return coldstart.ExplorerConfig(**_given(config.get("data", {}), "first_crop"))


# ----------------------------------------------------------------------------- the sampler

def rollout_config(config, section, *, max_turns: int | None = None, **overrides: Any) -> RolloutConfig:
  """The sampler of a stage's `section` (`config.rl`, `config.eval`, `config.coldstart`).

  The keys the section sets win (num_slots, max_turns, max_context, max_turn_tokens, max_images,
  temperature, chunk_buckets, patch_buckets_per_image (empty = any), decode_steps, window_min); the
  rest keep `RolloutConfig`'s defaults; `overrides` (RolloutConfig fields) win over both. `max_turns`
  also sets the default image budget (max_turns + 1). The pixel budget is `pixel_budget(config, section)`.
  """
  defaults = RolloutConfig()

  def get(key: str, default):
    value = section.get(key)
    return default if value is None else value

  max_turns = max_turns if max_turns is not None else get("max_turns", defaults.max_turns)
  lo, hi = pixel_budget(config, section)
  patches = get("patch_buckets_per_image", defaults.patch_buckets)
  kwargs = dict(
      num_slots=get("num_slots", defaults.num_slots),
      max_turns=max_turns, max_context=get("max_context", defaults.max_context),
      max_turn_tokens=get("max_turn_tokens", defaults.max_turn_tokens),
      max_images=get("max_images", max_turns + 1), min_pixels=lo, max_pixels=hi,
      sampling=SamplingParams(temperature=get("temperature", defaults.sampling.temperature)),
      chunk_buckets=tuple(get("chunk_buckets", defaults.chunk_buckets)),
      patch_buckets=None if patches is None else (tuple(patches) or None),
      decode_steps=get("decode_steps", defaults.decode_steps), window_min=get("window_min", defaults.window_min))
  return RolloutConfig(**{**kwargs, **overrides})


# ----------------------------------------------------------------------------- tokenizer and model

def special_ids(kind: str) -> dict[str, int]:
  """The special ids of a tokenizer kind without building it (ids follow `QWEN_ADDED_TOKENS` order)."""
  offset = tok_lib.QWEN_NUM_BPE_TOKENS if kind == "qwen" else 0
  index = {c: offset + i for i, (c, _) in enumerate(tok_lib.QWEN_ADDED_TOKENS)}
  return {"image_token_id": index[tok_lib.IMAGE_PAD], "video_token_id": index[tok_lib.VIDEO_PAD],
          "vision_start_token_id": index[tok_lib.VISION_START], "vision_end_token_id": index[tok_lib.VISION_END],
          "eos_token_id": index[tok_lib.IM_END], "pad_token_id": index[tok_lib.ENDOFTEXT]}


def hf_config_file(path: str) -> str | None:
  """config.json of an HF directory, or of a Checkpointer directory's `hf_assets/` (tools/import_hf.py)."""
  for d in (path, os.path.join(path, "hf_assets")):
    if os.path.isfile(os.path.join(d, "config.json")):
      return os.path.join(d, "config.json")
  return None


def model_config(config, tokenizer) -> config_lib.VLMConfig:
  """The run's model for `tokenizer` (its vocabulary size and special ids)."""
  return model_config_for_vocabulary(config, len(tokenizer), tok_lib.special_token_ids(tokenizer))


def model_config_for_vocabulary(config, vocab_size: int, ids: dict[str, int]) -> config_lib.VLMConfig:
  """The run's model: `model.init_from`'s config.json, a `model.preset`, or the config's own sizes (also for an
  `init_from` that is an Orbax checkpoint directory: a run of those sizes).

  The tokenizer must fit it (its ids inside the vocabulary, its image tokens the model's).
  """
  m = config.model
  run = dict(dtype=m.get("dtype", "float32"), param_dtype=m.get("param_dtype", "float32"),
             remat=m.get("remat", "none"), attention=m.get("attention", "auto"),
             attention_block=m.get("attention_block", 512))
  hf_file = hf_config_file(m.get("init_from") or "")
  if hf_file is not None:
    mcfg = config_lib.VLMConfig.from_pretrained(hf_file, **run)
  elif m.get("preset") in TINY_PRESETS:
    mcfg = TINY_PRESETS[m.preset](vocab_size, **{k: ids[k] for k in ("image_token_id", "video_token_id",
                                                             "vision_start_token_id", "vision_end_token_id")}, **run)
    mcfg = mcfg.replace(text=dataclasses.replace(mcfg.text, eos_token_id=ids["eos_token_id"],
                                                 pad_token_id=ids["pad_token_id"]))
  elif m.get("preset") in PRESETS:
    mcfg = PRESETS[m.preset](**run)
  elif m.get("preset"):
    raise ValueError(f"model.preset={m.get('preset')!r}: expected one of {sorted([*PRESETS, *TINY_PRESETS])}, or an "
                     "init_from directory with a config.json")
  else:  # the config's own sizes (an init_from without config.json is an Orbax checkpoint of such a run)
    mcfg = _sized_model(m, vocab_size, ids, run)
  if vocab_size > mcfg.text.vocab_size:
    raise ValueError(f"the tokenizer has {vocab_size} tokens, more than the model's vocabulary {mcfg.text.vocab_size}")
  if ids["image_token_id"] != mcfg.image_token_id:
    raise ValueError(f"the tokenizer's <|image_pad|> is {ids['image_token_id']}, the model's "
                     f"{mcfg.image_token_id}: config.tokenizer.kind does not match the model")
  return mcfg


FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def _sized_model(m, vocab_size: int, ids: dict[str, int], run: dict) -> config_lib.VLMConfig:
  """The demo's model, sized by the `model` section (hidden_size, num_layers, vision_depth, ...), with the
  structure of `model.family`: Qwen2.5-VL (the default) or Qwen3-VL (qk-norm, interleaved M-RoPE, a tower
  with a learned absolute position table of `vision_position_grid`^2 entries and DeepStack after the
  blocks `vision_deepstack` names)."""
  family = m.get("family", "qwen2_5_vl")
  if family not in FAMILIES:
    raise ValueError(f"model.family={family!r}: expected one of {FAMILIES}")
  head_dim = m.hidden_size // m.num_heads
  half = head_dim // 2
  common_text = dict(
      vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
      rope_theta=10000.0, max_position_embeddings=8192, bos_token_id=None, eos_token_id=ids["eos_token_id"],
      pad_token_id=ids["pad_token_id"])
  patch = m.get("vision_patch_size", 14)
  common_vision = dict(depth=m.vision_depth, hidden_size=m.vision_hidden_size,
                       intermediate_size=m.vision_intermediate_size, num_heads=m.vision_heads,
                       out_hidden_size=m.hidden_size, patch_size=patch)
  if family == "qwen3_vl":
    # The demo's Qwen2.5-VL tower options (model/config.py); none has a Qwen3-VL meaning.
    used = [f"vision_{k}" for k in config_lib.EXPERIMENTAL_VISION_OPTIONS if m.get(f"vision_{k}")]
    if used:
      raise ValueError(f"model.family='qwen3_vl' has no {used}: they are options of the Qwen2.5-VL tower "
                       "(Qwen3-VL's tower has its own learned position table, vision_position_grid)")
    # Qwen3-VL's (24, 20, 20) split of the rotary half, interleaved: 3/8 temporal, the rest height / width.
    t_sec = half * 3 // 8
    h_sec = (half - t_sec) // 2
    text = config_lib.TextConfig(**common_text, mrope_section=(t_sec, h_sec, half - t_sec - h_sec),
                                 explicit_head_dim=head_dim, qk_norm=True, qkv_bias=False, o_bias=False,
                                 mrope_interleaved=True)
    grid = m.get("vision_position_grid", 8)
    vision = config_lib.Qwen3VisionConfig(**common_vision, num_position_embeddings=grid * grid,
                                          deepstack_visual_indexes=tuple(m.get("vision_deepstack", ())))
  else:
    # Qwen's (16, 24, 24) split of the rotary half: a quarter temporal, the rest height / width.
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    text = config_lib.TextConfig(**common_text, mrope_section=(t_sec, h_sec, half - t_sec - h_sec))
    vision = config_lib.VisionConfig(
        **common_vision, fullatt_block_indexes=(m.vision_depth - 1,), window_size=4 * patch,  # 2 x 2 tokens
        position_table=m.get("vision_position_table", 0), position_sincos=m.get("vision_position_sincos", 0.0),
        output_centre=m.get("vision_output_centre", False), output_rms=m.get("vision_output_rms", 0.0),
        output_position_code=m.get("vision_output_position_code", 0.0))
  return config_lib.VLMConfig(
      text=text, vision=vision, image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
      vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
      tie_word_embeddings=True, **run)


# ----------------------------------------------------------------------------- training stages

def _given(section, *keys: str) -> dict[str, Any]:
  """The keys among `keys` that `section` sets (not None): the rest keep their dataclass's defaults."""
  return {k: section.get(k) for k in keys if section.get(k) is not None}


@dataclasses.dataclass(frozen=True)
class Loop:
  """A training stage's loop: steps, and how often it logs, checkpoints and probes (0 = never)."""
  steps: int
  log_every: int
  checkpoint_every: int
  eval_every: int = 0


def _loop(section) -> Loop:
  return Loop(steps=section.steps, log_every=section.log_every, checkpoint_every=section.checkpoint_every,
              **_given(section, "eval_every"))


def _optimizer(section, **fixed: Any) -> OptimizerConfig:
  """AdamW over `section.steps` (warmup + cosine), clipped at 1; `fixed` overrides the section."""
  kwargs = dict(lr=section.lr, total_steps=section.steps, grad_clip_norm=1.0,
                **_given(section, "warmup_steps", "end_lr_ratio", "weight_decay", "freeze_vision", "train_only_vision"))
  return OptimizerConfig(**{**kwargs, **fixed})


def _batches(section, rows: int, model: config_lib.VLMConfig, patch_buckets: tuple[int, ...]) -> BatchConfig:
  return BatchConfig(batch_size=rows, length_buckets=tuple(section.length_buckets),
                     patch_buckets=tuple(section.get("patch_buckets") or patch_buckets),
                     pad_token_id=model.text.pad_token_id, **_given(section, "patches_follow_length"))


@dataclasses.dataclass(frozen=True)
class SupervisedStage:
  """What a next-token training stage runs on: its loop, optimizer, step and batches."""
  loop: Loop
  optimizer: OptimizerConfig
  step: SFTConfig
  batch: BatchConfig


@dataclasses.dataclass(frozen=True)
class SFTStage(SupervisedStage):
  """The `sft` stage (`config.sft`): cold-start supervised fine-tuning."""
  group_by_length: bool = False  # batches of similar lengths (small length buckets, fewer padded tokens)


def sft_stage(config, model: config_lib.VLMConfig) -> SFTStage:
  c = config.sft
  return SFTStage(loop=_loop(c), optimizer=_optimizer(c),
                  step=SFTConfig(**_given(c, "grad_accum_steps", "logits_chunk", "train_vision")),
                  batch=_batches(c, c.batch_size, model, patch_buckets=(256, 768)),
                  **_given(c, "group_by_length"))


@dataclasses.dataclass(frozen=True)
class PretrainStage(SupervisedStage):
  """The `pretrain` stage (`config.pretrain`): the grounding base on fresh synthetic scenes.

  from_stage: start from that run's checkpoint in the work directory (e.g. "pretrain_vision", or a phase's
  run name, `pipeline.phases`), else from `model.init_from` or a fresh init.
  vision_from: the tower from that run's checkpoint instead of from_stage's: a tower phase re-tunes only
  the tower, so it can run beside the decoder's phases and join them here (the same weights as in line).
  """
  curriculum: scene_levels.Curriculum
  questions: grounding.GroundingConfig
  objectness_power: float = 4.0  # the saliency's exponent (`processing.image.token_saliency`)
  probe_levels: tuple[str, ...] = ("easy", "medium", "hard")
  probe_scenes: int = 64
  greedy_every_eval: bool = False  # greedy boxes at every probe (else only at the end)
  from_stage: str = ""
  vision_from: str = ""


def pretrain_stage(config, model: config_lib.VLMConfig) -> PretrainStage:
  c = config.pretrain
  frozen = bool(c.get("freeze_vision"))
  # a frozen tower needs no backward pass at all
  step = SFTConfig(train_vision=not frozen, **_given(c, "objectness_weight", "objectness_scale"))
  return PretrainStage(
      loop=_loop(c), optimizer=_optimizer(c), step=step,
      batch=_batches(c, c.batch_size, model, patch_buckets=(128,)),
      curriculum=scene_levels.Curriculum.parse(c.curriculum),
      questions=grounding.GroundingConfig(**_given(c.questions, "locate", "name", "read", "decimals",
                                                   "question_first", "target_first", "cell_first", "cell_only_steps",
                                                   "cell_window", "answer_form", "prompt_form", "zoom",
                                                   "read_jitter", "last_zoom_only_steps")),
      **{k: tuple(v) if isinstance(v, (list, tuple)) else v
         for k, v in _given(c, "objectness_power", "probe_levels", "probe_scenes", "greedy_every_eval",
                            "from_stage", "vision_from").items()})


@dataclasses.dataclass(frozen=True)
class PretrainVisionStage:
  """The `pretrain_vision` stage (`config.pretrain_vision`): the tower alone on feature targets.

  chroma_floor / saliency_power: `processing.image.token_colours`' options (which tokens are canvas,
  how sharply the saliency falls off); palette: the scenes' colours, RGB in [0, 1]; shape_tokens: which
  tokens carry the shape-kind term, "cover" (every token a shape's box covers most of) or "centre" (the
  token holding the shape's centre); position_table_sincos: a fresh Qwen3-VL tower's learned position
  table starts as the sin-cos code of its grid times this (0 = its random init): the absolute position a
  tower needs to bind (docs/miniature.md, session 11), in a form the HF export keeps; from_stage: start
  from that run's checkpoint (the whole model: a phase that re-tunes a trained model's tower), as
  `PretrainStage.from_stage`; digit_tokens: which tokens of a read crop carry its digit, "centre" (the one holding
  the glyph's centre) or "core" (every token the glyph's central half touches: a glyph off the crop's centre
  straddles tokens); read_jitter: how far a read question's crop strays from the legible crop
  (`grounding.GroundingConfig.read_jitter`); shape_on_crops: the kind's term on the shapes a crop shows too (not
  only the scene's); search_rows: 1 or 2, each row is the base's direct search with that many zooms after the window
  (`grounding.GroundingConfig.zoom`): the scene, the window the located shape's call returns (with 2 the shape's own
  zoom inside it) and the legible zoom inside the last, read, so the tower trains on the agent's own observations
  (read_jitter then unused); 0: a scene and a read crop.
  """
  loop: Loop
  optimizer: OptimizerConfig
  batch: BatchConfig
  curriculum: scene_levels.Curriculum
  targets: FeatureTargetConfig
  palette: tuple[tuple[float, float, float], ...]
  chroma_floor: float = 0.08
  saliency_power: float = 4.0
  shape_tokens: str = "cover"
  digit_tokens: str = "centre"
  position_table_sincos: float = 0.0
  from_stage: str = ""
  read_jitter: float = 0.0
  shape_on_crops: bool = False
  search_rows: int = 0

  def __post_init__(self):
    if self.shape_tokens not in ("cover", "centre"):
      raise ValueError(f"pretrain_vision.targets.shape_tokens must be 'cover' or 'centre', got {self.shape_tokens!r}")
    if self.search_rows not in (0, 1, 2):
      raise ValueError(f"pretrain_vision.search_rows must be 0, 1 or 2 (zooms after the window), got {self.search_rows}")
    if self.digit_tokens not in ("centre", "core"):
      raise ValueError(f"pretrain_vision.targets.digit_tokens must be 'centre' or 'core', got {self.digit_tokens!r}")


def pretrain_vision_stage(config, model: config_lib.VLMConfig) -> PretrainVisionStage:
  c = config.pretrain_vision
  world = task_config(config)
  palette = tuple(tuple(v / 255.0 for v in rgb) for _, rgb in world.palette)
  stage = PretrainVisionStage(
      loop=_loop(c), optimizer=_optimizer(c, train_only_vision=True),
      batch=_batches(c, c.batch_size, model, patch_buckets=(128,)),
      curriculum=scene_levels.Curriculum.parse(c.curriculum),
      targets=FeatureTargetConfig(num_colours=len(palette), num_shapes=len(world.shapes),
                                  **_given(c.targets, "position_scale", "object_scale", "colour_scale",
                                           "shape_scale", "shape_by_saliency", "digit_scale", "label_scale",
                                           "centre_scale")),
      palette=palette, **_given(c.targets, "chroma_floor", "saliency_power", "shape_tokens", "digit_tokens",
                                           "shape_on_crops"),
      **_given(c, "position_table_sincos", "from_stage", "read_jitter", "search_rows"))
  if stage.position_table_sincos and model.model_type != "qwen3_vl":
    raise ValueError("pretrain_vision.position_table_sincos initialises Qwen3-VL's learned position table; this "
                     f"model is {model.model_type} (set model.family='qwen3_vl', or vision_position_sincos for the "
                     "Qwen2.5-VL tower's fixed code)")
  return stage


@dataclasses.dataclass(frozen=True)
class RLDraws:
  """Which prompts an RL step draws and how its rollouts become examples (`config.rl`).

  length_stop: "wrong" (a turn cut by its token cap is a reward-0 trajectory) or "overturn" (masked).
  dynamic_sampling: keep drawing until `prompts_per_step` informative groups (at most
    `dynamic_sampling_max_rounds` extra draws).
  """
  prompts_per_step: int
  group_size: int
  tiers: tuple[str, ...] = ("medium", "hard")
  length_stop: str = "overturn"
  dynamic_sampling: bool = False
  dynamic_sampling_max_rounds: int = 4

  @property
  def rollouts_per_step(self) -> int:
    return self.prompts_per_step * self.group_size


def rl_draws(config) -> RLDraws:
  c = config.rl
  given = _given(c, "tiers", "length_stop", "dynamic_sampling", "dynamic_sampling_max_rounds")
  if "tiers" in given:
    given["tiers"] = tuple(given["tiers"])
  return RLDraws(prompts_per_step=c.prompts_per_step, group_size=c.group_size, **given)


@dataclasses.dataclass(frozen=True)
class RLStage:
  """The `rl` / `rl_no_mask` stages (`config.rl`): GRPO from the SFT model.

  batch: the rows of one update (a mini-batch: `draws.rollouts_per_step / mini_batches`).
  ppo_epochs, mini_batches: passes over the step's rollouts, and updates per pass.
  recompute_old_logprobs: the behaviour log-probs recomputed by the training forward (as verl does).
  """
  loop: Loop
  optimizer: OptimizerConfig
  step: RLConfig
  batch: BatchConfig
  draws: RLDraws
  rollout: RolloutConfig
  ppo_epochs: int = 1
  mini_batches: int = 1
  recompute_old_logprobs: bool = False


def rl_stage(config, model: config_lib.VLMConfig, *, overturn_masking: bool = True) -> RLStage:
  """`overturn_masking` is the stage's (the `rl_no_mask` ablation turns it off), not a config key."""
  c = config.rl
  draws = rl_draws(config)
  updates = _given(c, "ppo_epochs", "mini_batches", "recompute_old_logprobs")
  mini_batches = updates.get("mini_batches", 1)
  if draws.prompts_per_step % mini_batches:
    raise ValueError(f"rl.prompts_per_step={draws.prompts_per_step} does not split into rl.mini_batches={mini_batches}")
  # The sampler's behaviour log-probs are log_softmax(logits / T): the step uses the same T.
  step = RLConfig(overturn_masking=overturn_masking, temperature=c.temperature,
                  suppressed_token_ids=vision_token_ids(model),
                  **_given(c, "clip_low", "clip_high", "exclude_masked_from_stats", "grad_accum_steps",
                           "logits_chunk", "train_vision", "loss_aggregation"))
  return RLStage(
      loop=_loop(c), optimizer=_optimizer(c, end_lr_ratio=1.0, weight_decay=0.0), step=step,
      batch=_batches(c, draws.rollouts_per_step // mini_batches, model,
                     patch_buckets=(64 * (c.max_turns + 1),)),
      draws=draws,
      rollout=rollout_config(config, c, num_slots=c.get("num_slots") or draws.rollouts_per_step,
                             max_forced_tokens=32),
      **updates)
