"""Qwen2.5-VL configuration as plain frozen dataclasses, read from / written to HF `config.json`.

Both layouts of `config.json` are read: the flat one of the hub checkpoints (transformers 4.x: text fields at
the top level, `rope_scaling.mrope_section`) and the nested one transformers 5 writes (`text_config`,
`rope_parameters`). We write the nested v5 layout, which transformers 5.x (and 4.5x, which reads `text_config`) loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The ViT of Qwen2.5-VL (window attention, 2-D rotary, 2x2 patch merger)."""
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  out_hidden_size: int = 3584
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112  # in pixels: 112 px = 4 merged tokens per window side
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  tokens_per_second: int = 2
  rms_norm_eps: float = 1e-6  # fixed in the reference implementation
  initializer_range: float = 0.02
  # Experimental, not in Qwen2.5-VL (HF export refuses it): learned row / column embeddings of this
  # many patch positions added to the patch embeddings (absolute position in the value stream).
  position_table: int = 0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: channels x temporal x patch x patch."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2

  @property
  def window_merged(self) -> int:
    """Window side in merged tokens."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder with M-RoPE."""
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"
  initializer_range: float = 0.02
  bos_token_id: int | None = 151643
  eos_token_id: int | None = 151645
  pad_token_id: int | None = None

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """The whole model, plus how we run it (dtypes, rematerialisation)."""
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tie_word_embeddings: bool = False
  # Not part of the HF config: how this port runs.
  dtype: str = "float32"        # activation / matmul dtype
  param_dtype: str = "float32"  # stored parameter dtype (fp32 master weights for training)
  remat: str = "none"           # none | full | dots (see model.layers.remat_policy)

  def __post_init__(self):
    t, v = self.text, self.vision
    if t.hidden_size % t.num_attention_heads:
      raise ValueError(f"text hidden_size {t.hidden_size} not divisible by heads {t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
      raise ValueError(f"num_attention_heads {t.num_attention_heads} not divisible by "
                       f"num_key_value_heads {t.num_key_value_heads}")
    if t.head_dim % 2 or sum(t.mrope_section) != t.head_dim // 2:
      raise ValueError(f"sum(mrope_section)={sum(t.mrope_section)} must equal head_dim/2={t.head_dim // 2}")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      raise ValueError(f"vision head_dim {v.hidden_size}/{v.num_heads} must be an integer divisible by 4")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
      raise ValueError(f"fullatt_block_indexes {v.fullatt_block_indexes} out of range for depth {v.depth}")
    if v.window_merged < 1:
      raise ValueError(f"window_size {v.window_size} smaller than one merged token")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {_DTYPES}")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}; expected none | full | dots")

  def replace(self, **kw) -> Qwen25VLConfig:
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- HF config.json

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], **overrides) -> Qwen25VLConfig:
    """Builds a config from a parsed HF `config.json` (v4 flat or v5 nested layout)."""
    d = dict(d)
    model_type = d.get("model_type", "qwen2_5_vl")
    if model_type not in ("qwen2_5_vl", "qwen2_5_vl_text"):
      raise ValueError(f"config.json has model_type={model_type!r}; expected 'qwen2_5_vl'")
    text = dict(d.get("text_config") or {})
    # v4 hub layout keeps the text fields at the top level; nested values win where both exist.
    for f in dataclasses.fields(TextConfig):
      if f.name not in text and f.name in d:
        text[f.name] = d[f.name]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or d.get("rope_parameters") or d.get("rope_scaling") or {}
    if "mrope_section" in rope:
      text["mrope_section"] = tuple(rope["mrope_section"])
    theta = rope.get("rope_theta", text.get("rope_theta", d.get("rope_theta")))
    if theta is not None:
      text["rope_theta"] = theta
    if text.get("use_sliding_window") or d.get("use_sliding_window"):
      raise NotImplementedError("use_sliding_window=True is not supported (Qwen2.5-VL checkpoints use full attention)")
    if text.get("num_key_value_heads") is None:
      text["num_key_value_heads"] = text.get("num_attention_heads", TextConfig.num_attention_heads)
    text_cfg = TextConfig(**_known(TextConfig, text, "text_config"))

    vis = dict(d.get("vision_config") or {})
    if "in_chans" in vis and "in_channels" not in vis:
      vis["in_channels"] = vis["in_chans"]
    vrope = vis.get("rope_parameters") or {}
    if "rope_theta" in vrope:
      vis["rope_theta"] = vrope["rope_theta"]
    if "fullatt_block_indexes" in vis:
      vis["fullatt_block_indexes"] = tuple(vis["fullatt_block_indexes"])
    vision_cfg = VisionConfig(**_known(VisionConfig, vis, "vision_config"))

    top = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if d.get(k) is not None}
    tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return cls(text=text_cfg, vision=vision_cfg, tie_word_embeddings=bool(tie), **top, **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers-5 nested layout, readable by transformers 4.5x too (flat `rope_scaling` kept)."""
    t, v = self.text, self.vision
    if v.position_table:
      raise ValueError("vision.position_table is an experimental extension with no Qwen2.5-VL equivalent: "
                       "a model with it cannot be saved as an HF Qwen2.5-VL checkpoint")
    rope = {"rope_type": "default", "type": "mrope", "mrope_section": list(t.mrope_section),
            "rope_theta": t.rope_theta}
    text = {
        "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": t.hidden_act, "initializer_range": t.initializer_range, "rope_parameters": rope,
        "rope_theta": t.rope_theta, "use_sliding_window": False,
        "attention_dropout": 0.0, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id, "tie_word_embeddings": self.tie_word_embeddings,
    }
    vision = {
        "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size,
        "in_channels": v.in_channels, "in_chans": v.in_channels, "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "hidden_act": v.hidden_act, "tokens_per_second": v.tokens_per_second,
        "initializer_range": v.initializer_range,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    out = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "text_config": text, "vision_config": vision,
        "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
        "torch_dtype": self.param_dtype, "dtype": self.param_dtype,
    }
    return out

  @classmethod
  def from_pretrained(cls, path: str, **overrides) -> Qwen25VLConfig:
    """Reads `path/config.json` (or `path` itself if it is a file)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise FileNotFoundError(f"no config.json at {file!r}")
    with open(file) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
      raise ValueError(f"{file} must hold a JSON object, got {type(d).__name__}")
    try:
      return cls.from_hf_dict(d, **overrides)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{file}: {e}") from e

  def save_pretrained(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# A field's annotation (a string: the module uses postponed annotations) -> (test, what it wants).
_TYPE_CHECKS = {
    "int": (_is_int, "an integer"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer or null"),
    "float": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


def _known(cls, d: dict[str, Any], section: str) -> dict[str, Any]:
  """The entries of `d` that are fields of `cls`, each checked against the field's type.

  A value of the wrong type ("hidden_size": "128") would otherwise fail far away, inside a shape.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  out = {}
  for name, value in d.items():
    if name not in fields:
      continue
    annotation = str(fields[name].type)
    check = _TYPE_CHECKS.get(annotation)
    if annotation.startswith("tuple[int"):
      check = (lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)), "a list of integers")
    if check is not None and not check[0](value):
      raise ValueError(f"{section}.{name} must be {check[1]}, got {value!r} ({type(value).__name__})")
    out[name] = value
  return out


# ------------------------------------------------------------------------ presets

def qwen25vl_7b(**overrides) -> Qwen25VLConfig:
  """Qwen2.5-VL-7B-Instruct (about 8.3B parameters)."""
  return Qwen25VLConfig(
      text=TextConfig(), vision=VisionConfig(tokens_per_second=2), **overrides)


def qwen25vl_3b(**overrides) -> Qwen25VLConfig:
  """Qwen2.5-VL-3B-Instruct (about 3.8B parameters, tied embeddings)."""
  return Qwen25VLConfig(
      text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                      num_attention_heads=16, num_key_value_heads=2),
      vision=VisionConfig(out_hidden_size=2048), tie_word_embeddings=True, **overrides)


def tiny(vocab_size: int = 512, *, image_token_id: int | None = None, vision_start_token_id: int | None = None,
         vision_end_token_id: int | None = None, video_token_id: int | None = None, **overrides) -> Qwen25VLConfig:
  """A ~1M-parameter model with Qwen2.5-VL's exact structure, for tests and the CPU demo."""
  ids = dict(image_token_id=image_token_id, vision_start_token_id=vision_start_token_id,
             vision_end_token_id=vision_end_token_id, video_token_id=video_token_id)
  ids = {k: v for k, v in ids.items() if v is not None}
  text = TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6), rope_theta=10000.0,
                    max_position_embeddings=4096, bos_token_id=None, eos_token_id=None)
  vision = VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                        fullatt_block_indexes=(1,), window_size=56)
  return Qwen25VLConfig(text=text, vision=vision, tie_word_embeddings=True, **{**ids, **overrides})
