"""Qwen2.5-VL and Qwen3-VL configurations as plain frozen dataclasses, read from / written to HF `config.json`.

One `VLMConfig` describes either family: its `vision` is a `VisionConfig` (Qwen2.5-VL's windowed ViT) or
a `Qwen3VisionConfig` (Qwen3-VL's ViT with a learned position table and DeepStack mergers), and its
`text` carries the decoder switches that differ (per-head q/k norms, attention biases, explicit
`head_dim`, interleaved M-RoPE). `model_type` names the family.

Both layouts of `config.json` are read: the flat one of the hub checkpoints (transformers 4.x: text fields at
the top level, `rope_scaling.mrope_section`) and the nested one transformers 5 writes (`text_config`,
`rope_parameters`). We write the nested v5 layout, which transformers 5.x (and 4.5x, which reads `text_config`) loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import transformers

from mini_o3_jax.model import attention

_DTYPES = ("float32", "bfloat16", "float16")


class _PatchGeometry:
  """Sizes derived from a ViT config's fields (shared by both families' vision configs)."""
  hidden_size: int
  num_heads: int
  in_channels: int
  temporal_patch_size: int
  patch_size: int
  spatial_merge_size: int

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


@dataclasses.dataclass(frozen=True)
class VisionConfig(_PatchGeometry):
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
  # Experimental, not in Qwen2.5-VL (HF export refuses them; docs/miniature.md measures them):
  # learned row / column embeddings of this many patch positions added to the patch embeddings;
  position_table: int = 0
  # a fixed 2-D sin-cos code of each patch's (row, column), times this, added to the patch embeddings
  # (absolute position inside the tower: what lets it emit a position only where a shape is, issue 13);
  position_sincos: float = 0.0
  # the merger output centred per image (its mean token subtracted), rescaled so each image's token RMS
  # is `output_rms` (0 = not rescaled), plus a fixed 2-D sin-cos code of each token's cell of norm
  # ~`output_position_code` / sqrt(2) (0 = none): what made the tiny model ground (issue 13, H5S / H7S).
  output_centre: bool = False
  output_rms: float = 0.0
  output_position_code: float = 0.0

  @property
  def experimental(self) -> tuple[str, ...]:
    """The experimental (non-Qwen2.5-VL) options in use."""
    return tuple(n for n in EXPERIMENTAL_VISION_OPTIONS if getattr(self, n))

  @property
  def deepstack_levels(self) -> int:
    return 0

  @property
  def window_merged(self) -> int:
    """Window side in merged tokens."""
    return self.window_size // self.spatial_merge_size // self.patch_size


# `VisionConfig`'s options that are not Qwen2.5-VL (the demo's `model` section names them `vision_<option>`).
EXPERIMENTAL_VISION_OPTIONS = ("position_table", "position_sincos", "output_centre", "output_rms",
                               "output_position_code")


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig(_PatchGeometry):
  """The ViT of Qwen3-VL: a learned position table resampled to each grid, 2-D rotary, full attention
  per image, LayerNorm, a GELU MLP, the 2x2 merger, and DeepStack mergers after `deepstack_visual_indexes`."""
  depth: int = 27
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_heads: int = 16
  out_hidden_size: int = 4096
  in_channels: int = 3
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  hidden_act: str = "gelu_pytorch_tanh"
  num_position_embeddings: int = 2304  # a square table: 48 x 48
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-6  # fixed in the reference implementation
  initializer_range: float = 0.02

  @property
  def grid_per_side(self) -> int:
    return int(round(self.num_position_embeddings**0.5))

  @property
  def deepstack_levels(self) -> int:
    """How many DeepStack features each image token carries besides its embedding."""
    return len(self.deepstack_visual_indexes)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder with M-RoPE; the Qwen3 decoder with `qk_norm`, no biases and interleaved M-RoPE."""
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
  # Where the two decoders differ (defaults: Qwen2).
  explicit_head_dim: int | None = None  # HF `head_dim`; None = hidden_size / num_attention_heads
  qk_norm: bool = False                 # RMSNorm over each head's query and key (Qwen3)
  qkv_bias: bool = True
  o_bias: bool = False
  mrope_interleaved: bool = False       # Qwen3-VL: frequencies cycle t, h, w instead of blocks

  @property
  def head_dim(self) -> int:
    return self.explicit_head_dim or self.hidden_size // self.num_attention_heads


MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """The whole model, plus how we run it (dtypes, rematerialisation)."""
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  vision: VisionConfig | Qwen3VisionConfig = dataclasses.field(default_factory=VisionConfig)
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tie_word_embeddings: bool = False
  # Not part of the HF config: how this port runs.
  dtype: str = "float32"        # activation / matmul dtype
  param_dtype: str = "float32"  # stored parameter dtype (fp32 master weights for training)
  remat: str = "none"           # none | full | dots (see model.layers.remat_policy)
  attention: str = "auto"       # auto | dense | blockwise | splash | cudnn (see model.attention)
  attention_block: int = 512    # tile of the blockwise implementation (queries and keys)

  @property
  def model_type(self) -> str:
    return "qwen3_vl" if isinstance(self.vision, Qwen3VisionConfig) else "qwen2_5_vl"

  @property
  def embed_levels(self) -> int:
    """Vectors per image token handed to the decoder: its embedding and its DeepStack features."""
    return 1 + self.vision.deepstack_levels

  def __post_init__(self):
    t, v = self.text, self.vision
    if t.num_attention_heads % t.num_key_value_heads:
      raise ValueError(f"num_attention_heads {t.num_attention_heads} not divisible by "
                       f"num_key_value_heads {t.num_key_value_heads}")
    if t.explicit_head_dim is None and t.hidden_size % t.num_attention_heads:
      raise ValueError(f"text hidden_size {t.hidden_size} not divisible by heads {t.num_attention_heads}")
    if t.head_dim % 2 or sum(t.mrope_section) != t.head_dim // 2:
      raise ValueError(f"sum(mrope_section)={sum(t.mrope_section)} must equal head_dim/2={t.head_dim // 2}")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      raise ValueError(f"vision head_dim {v.hidden_size}/{v.num_heads} must be an integer divisible by 4")
    if v.out_hidden_size != t.hidden_size:
      raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
    if isinstance(v, Qwen3VisionConfig):
      if v.grid_per_side**2 != v.num_position_embeddings:
        raise ValueError(f"num_position_embeddings {v.num_position_embeddings} is not a square")
      if list(v.deepstack_visual_indexes) != sorted(set(v.deepstack_visual_indexes)):
        raise ValueError(f"deepstack_visual_indexes {v.deepstack_visual_indexes} must be increasing")
      if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
        raise ValueError(f"deepstack_visual_indexes {v.deepstack_visual_indexes} out of range for depth {v.depth}")
      if v.deepstack_levels > t.num_hidden_layers:
        raise ValueError(f"{v.deepstack_levels} DeepStack levels but only {t.num_hidden_layers} decoder layers")
    else:
      if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
        raise ValueError(f"fullatt_block_indexes {v.fullatt_block_indexes} out of range for depth {v.depth}")
      if v.window_merged < 1:
        raise ValueError(f"window_size {v.window_size} smaller than one merged token")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {_DTYPES}")
    attention.check_impl(self.attention)
    if self.attention_block <= 0 or self.attention_block % 8:
      raise ValueError(f"attention_block={self.attention_block}; expected a positive multiple of 8")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}; expected none | full | dots")

  def replace(self, **kw) -> VLMConfig:
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- HF config.json

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], **overrides) -> VLMConfig:
    """Builds a config from a parsed HF `config.json` (Qwen2.5-VL v4 flat or v5 nested, Qwen3-VL)."""
    d = dict(d)
    model_type = d.get("model_type", "qwen2_5_vl")
    if model_type not in ("qwen2_5_vl", "qwen2_5_vl_text", "qwen3_vl"):
      raise ValueError(f"config.json has model_type={model_type!r}; expected one of {MODEL_TYPES}")
    qwen3 = model_type == "qwen3_vl"
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
    if qwen3:
      bias = bool(text.get("attention_bias", False))
      text.update(qk_norm=True, qkv_bias=bias, o_bias=bias,
                  mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
                  explicit_head_dim=text.get("head_dim", 128))
      text.setdefault("mrope_section", (24, 20, 20))
      text.setdefault("rope_theta", 5000000.0)
      for name in ("bos_token_id", "eos_token_id"):
        text.setdefault(name, None)
    text_cfg = TextConfig(**_known(TextConfig, text, "text_config"))

    vis = dict(d.get("vision_config") or {})
    if "in_chans" in vis and "in_channels" not in vis:
      vis["in_channels"] = vis["in_chans"]
    vrope = vis.get("rope_parameters") or {}
    if "rope_theta" in vrope:
      vis["rope_theta"] = vrope["rope_theta"]
    for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
      if name in vis:
        vis[name] = tuple(vis[name])
    vision_cls = Qwen3VisionConfig if qwen3 else VisionConfig
    vision_cfg = vision_cls(**_known(vision_cls, vis, "vision_config"))

    top = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if d.get(k) is not None}
    tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return cls(text=text_cfg, vision=vision_cfg, tie_word_embeddings=bool(tie), **top, **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers-5 nested layout (Qwen2.5-VL: readable by transformers 4.5x too, flat `rope_scaling` kept)."""
    t, v = self.text, self.vision
    if getattr(v, "experimental", ()):
      raise ValueError(f"vision.{', '.join(v.experimental)}: experimental extensions with no Qwen2.5-VL "
                       "equivalent; a model with them cannot be saved as an HF Qwen2.5-VL checkpoint")
    text = {
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": t.hidden_act, "initializer_range": t.initializer_range,
        "attention_dropout": 0.0, "pad_token_id": t.pad_token_id, "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
    }
    if self.model_type == "qwen3_vl":
      if not t.qk_norm or t.qkv_bias != t.o_bias or not t.mrope_interleaved:
        raise ValueError("a Qwen3-VL text config needs qk_norm, one attention_bias for q/k/v/o and interleaved "
                         f"M-RoPE; got qk_norm={t.qk_norm}, qkv_bias={t.qkv_bias}, o_bias={t.o_bias}, "
                         f"mrope_interleaved={t.mrope_interleaved}")
      text.update(model_type="qwen3_vl_text", head_dim=t.head_dim, attention_bias=t.qkv_bias,
                  rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                   "mrope_section": list(t.mrope_section), "mrope_interleaved": True})
      vision = {
          "model_type": "qwen3_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size,
          "in_channels": v.in_channels, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
          "spatial_merge_size": v.spatial_merge_size, "hidden_act": v.hidden_act,
          "num_position_embeddings": v.num_position_embeddings,
          "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "initializer_range": v.initializer_range,
          "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
      }
      architecture = "Qwen3VLForConditionalGeneration"
    else:
      if t.qk_norm or not t.qkv_bias or t.o_bias or t.mrope_interleaved or t.explicit_head_dim not in (None, t.hidden_size // t.num_attention_heads):
        raise ValueError("a Qwen2.5-VL text config has q/k/v biases, no o_proj bias, no qk_norm, block M-RoPE "
                         "and head_dim = hidden_size / heads")
      rope = {"rope_type": "default", "type": "mrope", "mrope_section": list(t.mrope_section),
              "rope_theta": t.rope_theta}
      text.update(model_type="qwen2_5_vl_text", rope_parameters=rope, rope_theta=t.rope_theta,
                  use_sliding_window=False)
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
      architecture = "Qwen2_5_VLForConditionalGeneration"
    return {
        "architectures": [architecture], "model_type": self.model_type,
        "text_config": text, "vision_config": vision,
        "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
        "torch_dtype": self.param_dtype, "dtype": self.param_dtype,
    }

  @classmethod
  def from_pretrained(cls, path: str, **overrides) -> VLMConfig:
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

  def to_hf_config(self) -> transformers.PretrainedConfig:
    """The config as transformers' own class (`Qwen2_5_VLConfig` / `Qwen3VLConfig`), with every field
    transformers itself fills in (layer_types, max_window_layers, use_cache, ...)."""
    hf_class = transformers.Qwen3VLConfig if self.model_type == "qwen3_vl" else transformers.Qwen2_5_VLConfig
    d = self.to_hf_dict()
    return hf_class(**{k: v for k, v in d.items() if k not in ("model_type", "torch_dtype")})

  def save_pretrained(self, path: str) -> None:
    """config.json as transformers writes it, plus the legacy keys of `to_hf_dict` (flat `rope_theta`,
    `torch_dtype`) that older readers (transformers 4.5x, vLLM) look for."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(_merged(self.to_hf_dict(), self.to_hf_config().to_dict()), f, indent=2, sort_keys=True)


def _merged(base: dict, over: dict) -> dict:
  """`over` with `base`'s keys it lacks added (recursively into nested dicts)."""
  out = dict(over)
  for k, v in base.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = _merged(v, out[k])
  return out


# The name the rest of the code base and users knew first; the class describes both families.
Qwen25VLConfig = VLMConfig


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

def qwen25vl_7b(**overrides) -> VLMConfig:
  """Qwen2.5-VL-7B-Instruct (about 8.3B parameters)."""
  return VLMConfig(
      text=TextConfig(), vision=VisionConfig(tokens_per_second=2), **overrides)


def qwen25vl_3b(**overrides) -> VLMConfig:
  """Qwen2.5-VL-3B-Instruct (about 3.8B parameters, tied embeddings)."""
  return VLMConfig(
      text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                      num_attention_heads=16, num_key_value_heads=2),
      vision=VisionConfig(out_hidden_size=2048), tie_word_embeddings=True, **overrides)


def tiny(vocab_size: int = 512, *, image_token_id: int | None = None, vision_start_token_id: int | None = None,
         vision_end_token_id: int | None = None, video_token_id: int | None = None, **overrides) -> VLMConfig:
  """A ~1M-parameter model with Qwen2.5-VL's exact structure, for tests and the CPU demo."""
  ids = dict(image_token_id=image_token_id, vision_start_token_id=vision_start_token_id,
             vision_end_token_id=vision_end_token_id, video_token_id=video_token_id)
  ids = {k: v for k, v in ids.items() if v is not None}
  text = TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6), rope_theta=10000.0,
                    max_position_embeddings=4096, bos_token_id=None, eos_token_id=None)
  vision = VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                        fullatt_block_indexes=(1,), window_size=56)
  return VLMConfig(text=text, vision=vision, tie_word_embeddings=True, **{**ids, **overrides})


def qwen3vl_8b(**overrides) -> VLMConfig:
  """Qwen3-VL-8B-Instruct (about 8.8B parameters)."""
  text = TextConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, explicit_head_dim=128, rope_theta=5000000.0,
                    mrope_section=(24, 20, 20), max_position_embeddings=262144, qk_norm=True, qkv_bias=False,
                    o_bias=False, mrope_interleaved=True)
  return VLMConfig(text=text, vision=Qwen3VisionConfig(out_hidden_size=4096), **overrides)


def tiny_qwen3(vocab_size: int = 512, *, image_token_id: int | None = None, vision_start_token_id: int | None = None,
               vision_end_token_id: int | None = None, video_token_id: int | None = None, **overrides) -> VLMConfig:
  """A ~1M-parameter model with Qwen3-VL's exact structure (DeepStack after vision blocks 0 and 1)."""
  ids = dict(image_token_id=image_token_id, vision_start_token_id=vision_start_token_id,
             vision_end_token_id=vision_end_token_id, video_token_id=video_token_id)
  ids = {k: v for k, v in ids.items() if v is not None}
  text = TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, explicit_head_dim=32, mrope_section=(6, 5, 5),
                    rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                    qk_norm=True, qkv_bias=False, o_bias=False, mrope_interleaved=True)
  vision = Qwen3VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                             num_position_embeddings=64, deepstack_visual_indexes=(0, 1))
  return VLMConfig(text=text, vision=vision, tie_word_embeddings=True, **{**ids, **overrides})
