"""The smoke stage: every piece of the model path once, end to end, in seconds on a CPU.

A synthetic visual-search scene -> Qwen2.5-VL image processing -> chat template with the agent prompt
-> a tiny random Qwen2.5-VL forward and a few greedy tokens through the KV cache -> HF export and
reload -> the same logits. Writes `smoke.json` and `hf_export/` in the work directory.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mini_o3_jax import agent
from mini_o3_jax.data import synthetic
from mini_o3_jax.model import Qwen25VL, config as config_lib, prepare_inputs
from mini_o3_jax.model.hf import load_pretrained, save_pretrained
from mini_o3_jax.processing import chat, image as image_lib, tokenizer as tok_lib

log = logging.getLogger(__name__)


@nnx.jit
def _prefill(model: Qwen25VL, inputs, cache):
  image_embeds = model.encode_images(inputs.pixel_values, inputs.vision)
  return model.forward_cached(inputs.input_ids, inputs.positions, cache, inputs.attention_mask, image_embeds)


@nnx.jit
def _decode(model: Qwen25VL, ids, positions, cache):
  return model.forward_cached(ids, positions, cache)


def _greedy(model: Qwen25VL, inputs, steps: int) -> list[int]:
  """Greedy continuation of one prompt through the KV cache (prefill once, then one token a step)."""
  t = inputs.input_ids.shape[1]
  cache = model.init_cache(batch=1, max_len=t + steps)
  logits, cache = _prefill(model, inputs, cache)
  next_pos = int(inputs.positions.max()) + 1
  out = []
  for _ in range(steps):
    token = int(jnp.argmax(logits[0, -1]))
    out.append(token)
    ids = jnp.full((1, 1), token, jnp.int32)
    pos = jnp.full((3, 1, 1), next_pos, jnp.int32)
    logits, cache = _decode(model, ids, pos, cache)
    next_pos += 1
  return out


def run_smoke(config, workdir: str) -> dict:
  task = synthetic.make_task(config.tier, 0, synthetic.SyntheticConfig(), split="test")
  corpus = [agent.question_prompt(task.question), agent.observation_turn(0, 1), "<think>zoom</think>"] * 4
  tokenizer = tok_lib.build_small_tokenizer(corpus, vocab_size=config.vocab_size)
  ids = tok_lib.special_token_ids(tokenizer)
  model_cfg = config_lib.tiny(vocab_size=len(tokenizer), image_token_id=ids["image_token_id"],
                              vision_start_token_id=ids["vision_start_token_id"],
                              vision_end_token_id=ids["vision_end_token_id"], video_token_id=ids["video_token_id"])
  model = Qwen25VL(model_cfg, rngs=nnx.Rngs(config.seed))
  pixel_values, grid = image_lib.preprocess_image(task.image, min_pixels=config.min_pixels,
                                                  max_pixels=config.max_pixels)
  messages = [agent.user_message(task.question)]
  tokens = chat.tokenize_conversation(tokenizer, messages, [grid], add_generation_prompt=True)
  input_ids = tokens["input_ids"][None]
  logits = np.asarray(model(input_ids, pixel_values, grid[None]))
  inputs, _ = prepare_inputs(model_cfg, input_ids, None, pixel_values, grid[None])
  generated = _greedy(model, inputs, config.new_tokens)

  export = os.path.join(workdir, "hf_export")
  save_pretrained(model, model_cfg, export)
  tokenizer.save_pretrained(export)
  reloaded, _ = load_pretrained(export)
  reload_diff = float(np.abs(np.asarray(reloaded(input_ids, pixel_values, grid[None])) - logits).max())
  if reload_diff > 1e-5:
    raise RuntimeError(f"HF export round trip changed the logits by {reload_diff}")
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  result = {
      "task": task.id, "question": task.question, "answer": task.answer,
      "image_size": list(task.image.size), "grid_thw": grid.tolist(), "prompt_tokens": int(input_ids.shape[1]),
      "params": int(n_params), "logits_shape": list(logits.shape),
      "greedy_text": tokenizer.decode(generated), "export": export, "export_reload_max_diff": reload_diff,
  }
  with open(os.path.join(workdir, "smoke.json"), "w") as f:
    json.dump(result, f, indent=2)
  log.info("smoke run ok: %d params, prompt of %d tokens, image grid %s", n_params, input_ids.shape[1], grid.tolist())
  return result
