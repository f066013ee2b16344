"""Smoke run of the model path (seconds on a CPU): see mini_o3_jax/pipeline/smoke.py."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stages = ("smoke",)
  c.seed = 0
  c.tier = "medium"
  c.vocab_size = 512
  c.min_pixels = 56 * 56
  c.max_pixels = 112 * 112
  c.new_tokens = 8
  return c
