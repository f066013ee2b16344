"""A run's ConfigDict read into the typed configs the package runs on: model, pixel budget, scenes.

A leaf under `pipeline/`, `export` and the tools: they read run configs through it, and it imports only
`model/`, `processing/`, `data/` and the sampler's config. Defaults for a key live here (or, for the
sampler, in `RolloutConfig`) and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from mini_o3_jax.data import synthetic
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.sampler.rollout import RolloutConfig
from mini_o3_jax.sampler.sampling import SamplingParams

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
  """The synthetic world's config: scenes drawn from the run's seed, viewed at the demo's `view_pixels`
  (the generator's own view budget when the run has none)."""
  if "view_pixels" not in config:
    return synthetic.SyntheticConfig(seed=config.get("seed", 0))
  return synthetic.SyntheticConfig(view_min_pixels=config.view_pixels, view_max_pixels=config.view_pixels,
                                   seed=config.get("seed", 0))


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
  """The run's model: `model.init_from`'s config.json, a `model.preset`, or the demo's own sizes.

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
  elif m.get("preset") or m.get("init_from"):
    raise ValueError(f"model.preset={m.get('preset')!r}: expected one of {sorted([*PRESETS, *TINY_PRESETS])}, or an "
                     "init_from directory with a config.json")
  else:
    mcfg = _sized_model(m, vocab_size, ids, run)
  if vocab_size > mcfg.text.vocab_size:
    raise ValueError(f"the tokenizer has {vocab_size} tokens, more than the model's vocabulary {mcfg.text.vocab_size}")
  if ids["image_token_id"] != mcfg.image_token_id:
    raise ValueError(f"the tokenizer's <|image_pad|> is {ids['image_token_id']}, the model's "
                     f"{mcfg.image_token_id}: config.tokenizer.kind does not match the model")
  return mcfg


def _sized_model(m, vocab_size: int, ids: dict[str, int], run: dict) -> config_lib.VLMConfig:
  """The demo's Qwen2.5-VL, sized by the `model` section (hidden_size, num_layers, vision_depth, ...)."""
  half = m.hidden_size // m.num_heads // 2
  # Qwen's (16, 24, 24) split of the rotary half: a quarter temporal, the rest height / width.
  t_sec = half // 4
  h_sec = (half - t_sec) // 2
  text = config_lib.TextConfig(
      vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
      mrope_section=(t_sec, h_sec, half - t_sec - h_sec),
      rope_theta=10000.0, max_position_embeddings=8192, bos_token_id=None, eos_token_id=ids["eos_token_id"],
      pad_token_id=ids["pad_token_id"])
  vision = config_lib.VisionConfig(
      depth=m.vision_depth, hidden_size=m.vision_hidden_size, intermediate_size=m.vision_intermediate_size,
      num_heads=m.vision_heads, out_hidden_size=m.hidden_size, fullatt_block_indexes=(m.vision_depth - 1,),
      window_size=56, position_table=m.get("vision_position_table", 0),
      output_centre=m.get("vision_output_centre", False), output_rms=m.get("vision_output_rms", 0.0),
      output_position_code=m.get("vision_output_position_code", 0.0))
  return config_lib.VLMConfig(
      text=text, vision=vision, image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
      vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
      tie_word_embeddings=True, **run)
