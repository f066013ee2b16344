"""The smoke stage: every piece of the model path once, end to end, in seconds on a CPU.

A synthetic visual-search scene -> Qwen2.5-VL image processing -> chat template with the agent prompt
-> a tiny random Qwen2.5-VL forward and a few greedy tokens from the sampler -> HF export and
reload -> the same logits. Writes `smoke.json` and `hf_export/` in the work directory.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from flax import nnx

from mini_o3_jax import agent
from mini_o3_jax.data import synthetic
from mini_o3_jax.model.hf import load_pretrained, save_pretrained
from mini_o3_jax.model import VLM, config as config_lib
from mini_o3_jax.processing import chat, image as image_lib, tokenizer as tok_lib
from mini_o3_jax.sampler import generate

log = logging.getLogger(__name__)


def run_smoke(config, workdir: str) -> dict:
  task = synthetic.make_task(config.tier, 0, synthetic.SyntheticConfig(), split="test")
  corpus = [agent.question_prompt(task.question), agent.observation_turn(0, 1), "<think>zoom</think>"] * 4
  tokenizer = tok_lib.build_small_tokenizer(corpus, vocab_size=config.vocab_size)
  ids = tok_lib.special_token_ids(tokenizer)
  model_cfg = config_lib.tiny(vocab_size=len(tokenizer), image_token_id=ids["image_token_id"],
                              vision_start_token_id=ids["vision_start_token_id"],
                              vision_end_token_id=ids["vision_end_token_id"], video_token_id=ids["video_token_id"])
  model = VLM(model_cfg, rngs=nnx.Rngs(config.seed))
  pixel_values, grid = image_lib.preprocess_image(task.image, min_pixels=config.min_pixels,
                                                  max_pixels=config.max_pixels)
  messages = [agent.user_message(task.question)]
  tokens = chat.tokenize_conversation(tokenizer, messages, [grid], add_generation_prompt=True)
  input_ids = tokens["input_ids"][None]
  logits = np.asarray(model(input_ids, pixel_values, grid[None]))
  out = generate(model, input_ids, None, pixel_values, grid[None], max_new_tokens=config.new_tokens)
  generated = out.tokens[0, :out.lengths[0]].tolist()

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
