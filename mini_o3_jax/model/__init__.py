"""Flax NNX ports of Qwen2.5-VL and Qwen3-VL (one `VLM` class; the config picks the family)."""

from mini_o3_jax.model.config import Qwen25VLConfig, Qwen3VisionConfig, TextConfig, VisionConfig, VLMConfig
from mini_o3_jax.model.vision import VisionInputs
from mini_o3_jax.model.vlm import VLM, ModelInputs, Qwen25VL, Qwen3VL, prepare_inputs

__all__ = ["VLMConfig", "Qwen25VLConfig", "TextConfig", "VisionConfig", "Qwen3VisionConfig", "VLM", "Qwen25VL",
           "Qwen3VL", "VisionInputs", "ModelInputs", "prepare_inputs"]
