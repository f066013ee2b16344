"""Tiny random `transformers` Qwen2.5-VL and Qwen3-VL models used as the reference oracle in tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig

VOCAB = 300
IMAGE, VISION_START, VISION_END, VIDEO = 290, 291, 292, 293


def hf_config(*, tie: bool = False, kv_heads: int = 2, heads: int = 4, hidden: int = 64, layers: int = 2,
              vision_depth: int = 3, fullatt=(1,), window_size: int = 56, mrope=(2, 3, 3)) -> Qwen2_5_VLConfig:
  return Qwen2_5_VLConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                       rope_scaling={"type": "mrope", "mrope_section": list(mrope)}, rope_theta=10000.0,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None),
      vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=48, num_heads=2,
                         out_hidden_size=hidden, fullatt_block_indexes=list(fullatt), window_size=window_size),
      image_token_id=IMAGE, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
      video_token_id=VIDEO, tie_word_embeddings=tie)


def hf_qwen3_config(*, tie: bool = False, kv_heads: int = 2, heads: int = 4, hidden: int = 64, layers: int = 3,
                    head_dim: int = 16, vision_depth: int = 3, deepstack=(0, 2), positions: int = 16,
                    mrope=(2, 3, 3)) -> Qwen3VLConfig:
  """A tiny Qwen3-VL: DeepStack at two depths; a 4 x 4 position table, so every grid resamples it."""
  return Qwen3VLConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       rms_norm_eps=1e-6, pad_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "mrope_section": list(mrope), "mrope_interleaved": True}),
      vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=48, num_heads=2,
                         out_hidden_size=hidden, num_position_embeddings=positions,
                         deepstack_visual_indexes=list(deepstack), patch_size=16),
      image_token_id=IMAGE, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
      video_token_id=VIDEO, tie_word_embeddings=tie)


def hf_model(config, seed: int = 0, std: float = 0.1):
  """A reference model (either family, by its config) with weights ~ N(0, std), norm scales around 1."""
  torch.manual_seed(seed)
  cls = transformers.AutoModelForImageTextToText
  model = cls.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, std)
  return model


def build_batch(rows, grids, rng: np.random.Generator, pad_side: str = "left"):
  """rows: list of segment lists; an int is that many random text tokens, ("img", i) is image i.

  Returns input_ids, attention_mask [batch, seq] int64 and the grids of the images in order.
  """
  merged = [int(np.prod(g)) // 4 for g in grids]
  seqs = []
  for segs in rows:
    ids = []
    for s in segs:
      if isinstance(s, tuple):
        ids += [VISION_START] + [IMAGE] * merged[s[1]] + [VISION_END]
      else:
        ids += list(rng.integers(0, 280, s))
    seqs.append(ids)
  t = max(map(len, seqs))
  input_ids = np.zeros((len(seqs), t), np.int64)
  mask = np.zeros((len(seqs), t), np.int64)
  for i, ids in enumerate(seqs):
    sl = slice(t - len(ids), t) if pad_side == "left" else slice(0, len(ids))
    input_ids[i, sl] = ids
    mask[i, sl] = 1
  return input_ids, mask


def pixel_values(grids, rng: np.random.Generator, patch: int = 14) -> np.ndarray:
  n = int(sum(np.prod(g) for g in grids))
  return rng.normal(size=(n, 3 * 2 * patch * patch)).astype(np.float32)


def hf_logits(model, input_ids, mask, pv=None, grids=None) -> np.ndarray:
  kw = {}
  if pv is not None:
    kw = dict(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(np.asarray(grids)))
  ids, mm = torch.tensor(input_ids), (torch.tensor(input_ids) == IMAGE).int()
  with torch.no_grad():
    # Explicit 3-D positions: without images transformers would otherwise ignore left padding.
    positions, _ = model.model.get_rope_index(ids, mm, image_grid_thw=kw.get("image_grid_thw"),
                                              attention_mask=torch.tensor(mask))
    out = model(input_ids=ids, attention_mask=torch.tensor(mask), position_ids=positions,
                mm_token_type_ids=mm, **kw)
  return out.logits.float().numpy()
