"""Evaluation of a Qwen2.5-VL-7B Mini-o3 model: VisualProbe easy / medium / hard, V* Bench, HR-Bench 4K / 8K.

  python -m mini_o3_jax.main --config configs/qwen25vl_7b_eval.py --workdir gs://.../runs/eval \\
      --config.data_dir=/mnt/data --config.model.init_from=gs://.../runs/rl/ckpt/rl

The paper's protocol: Avg@K at temperature 1.0 (K = 32 for VisualProbe and V*, 8 for HR-Bench), a
32,768-token context, every image within 40,000 / 2,000,000 pixels, turn budgets up to 32 (one rollout
at 32 turns, scored at every budget by exact truncation), V* options shuffled with a fixed seed,
HR-Bench's 800 rows all kept. Judge: the offline rule judge (normalised exact match, option letters);
the paper judges VisualProbe with gpt-4o, so VisualProbe numbers are not directly comparable.
Writes metrics.json and eval/<model>/<benchmark>.jsonl (every trajectory, images as stubs).
Mesh: FSDP over every chip, 64 sampler slots (v5p-32: 4 per chip); on v4-8 / v5e slices use
--config.eval.num_slots=8 --config.eval.chunk_buckets="(256,)" (docs/scaling.md).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stages = ("eval",)
  c.seed = 0
  c.mesh = (1, -1, 1)  # (data, fsdp, tensor); -1 = the remaining chips (slots shard over data x fsdp)
  c.min_pixels = 40_000
  c.max_pixels = 2_000_000

  c.data_dir = "/mnt/data"
  c.datasets = ml_collections.ConfigDict(dict(visualprobe="VisualProbe", vstar="vstar_bench", hrbench="HR-Bench"))
  c.tokenizer = ml_collections.ConfigDict(dict(kind="qwen", vocab_size=0))
  c.model = ml_collections.ConfigDict(dict(
      preset="qwen25vl_7b", init_from="/mnt/gcs/runs/qwen25vl_7b_rl/ckpt/rl",
      dtype="bfloat16", param_dtype="bfloat16", remat="none"))

  c.eval = ml_collections.ConfigDict(dict(
      model_name="mini_o3_7b",
      benchmarks=("visualprobe/easy", "visualprobe/medium", "visualprobe/hard", "vstar/test",
                  "hrbench_4k/test", "hrbench_8k/test"),
      samples_per_task=dict(visualprobe=32, vstar=32, hrbench_4k=8, hrbench_8k=8),
      option_seed=0, n_per_tier=0,  # 0 = every question
      budgets=(1, 2, 4, 8, 16, 32), max_context=32768, max_turn_tokens=2048, temperature=1.0,
      num_slots=64, chunk=16,  # questions per rollout call (x K samples each)
      chunk_buckets=(256, 1024), patch_buckets_per_image=(1024, 4096, 10240), decode_steps=16,
      viewer_examples=3))
  return c
