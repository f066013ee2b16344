"""JAX-native sampler: batched slots over a static KV cache, single-turn `generate`, multi-turn rollouts.

  generate(model, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens, temperature)
      -> GenerateOutput(tokens [B, new], logprobs, sample_logprobs, lengths, finish_reasons)
  Sampler(model, tokenizer, RolloutConfig(...)).rollout(tasks, seed=..., policy=None)
      -> list[RolloutResult] (token ids, response mask, behaviour log-probs, images, agent.Trajectory)
"""

from mini_o3_jax.sampler.engine import Engine, EngineConfig
from mini_o3_jax.sampler.rollout import RolloutConfig, RolloutResult, Sampler
from mini_o3_jax.sampler.sampling import SamplingParams
from mini_o3_jax.sampler.single_turn import GenerateOutput, generate
from mini_o3_jax.sampler.stops import StopMatcher

__all__ = ["Engine", "EngineConfig", "GenerateOutput", "RolloutConfig", "RolloutResult", "Sampler", "SamplingParams",
           "StopMatcher", "generate"]
