"""JAX-native sampler: batched slots over a static KV cache, single-turn `generate`, multi-turn rollouts."""

from mini_o3_jax.sampler.engine import Engine, EngineConfig
from mini_o3_jax.sampler.single_turn import GenerateOutput, generate
from mini_o3_jax.sampler.sampling import SamplingParams
from mini_o3_jax.sampler.stops import StopMatcher

__all__ = ["Engine", "EngineConfig", "GenerateOutput", "SamplingParams", "StopMatcher", "generate"]
