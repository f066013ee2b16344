"""Flax NNX port of Qwen2.5-VL."""

from mini_o3_jax.model.config import Qwen25VLConfig, TextConfig, VisionConfig
from mini_o3_jax.model.text import KVCache
from mini_o3_jax.model.vision import VisionInputs
from mini_o3_jax.model.vlm import ModelInputs, Qwen25VL, prepare_inputs

__all__ = ["Qwen25VLConfig", "TextConfig", "VisionConfig", "Qwen25VL", "KVCache", "VisionInputs",
           "ModelInputs", "prepare_inputs"]
