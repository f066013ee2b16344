"""GRPO with over-turn masking for Qwen2.5-VL-7B on the VisualProbe train split (TPU), after cold-start SFT.

  python -m mini_o3_jax.main --config configs/qwen25vl_7b_rl.py --workdir gs://.../runs/rl \\
      --config.data_dir=/mnt/data --config.model.init_from=gs://.../runs/sft/ckpt/sft

`model.init_from` is the SFT run's checkpoint directory (or its HF export). Data: a local copy of
`Mini-o3/VisualProbe_train` under `data_dir/datasets.visualprobe` (the parent of `VisualProbe_train/`).

The paper's recipe: training turn limit 6, at most 12 images, correctness reward only, no KL, no entropy
bonus, asymmetric clipping 0.2 / 0.3, lr 1e-6, 16 rollouts per prompt, a rollout batch of 256 prompts
updated in PPO mini-batches of 32, 8,192 prompt + 8,192 response tokens (a 16,384-token context),
temperature 1.0, over-turn trajectories masked with the group statistics over all rollouts, dynamic
sampling. One step here = 256 prompts x 16 rollouts, then 8 updates of 32 prompts (about 300 updates
in 38 steps); the step count and the 2,048-token cap on one assistant turn are our choices.
Every image within the paper's 40K / 2M pixels. A training row holds at most 65,536 patches (its
16,384-token context at 4 patches per image token), which fits because attention is splash on TPU
(linear memory in the row's patches and tokens; `model.attention`): see docs/scaling.md
(`tools/memory_plan.py`).
Mesh: v5p-32 (16 chips) as (1, 4, 4), one row per chip: 512 rows in 128 micro-batches of 4; on v5p-64
use --config.mesh="(1,-1,2)" --config.rl.grad_accum_steps=32.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stages = ("rl",)
  c.seed = 0
  c.mesh = (1, -1, 4)  # (data, fsdp, tensor); -1 = the remaining chips
  c.min_pixels = 40_000
  c.max_pixels = 2_000_000

  c.data_dir = "/mnt/data"
  c.datasets = ml_collections.ConfigDict(dict(visualprobe="VisualProbe"))
  c.tokenizer = ml_collections.ConfigDict(dict(kind="qwen", vocab_size=0))
  c.model = ml_collections.ConfigDict(dict(
      preset="qwen25vl_7b", init_from="/mnt/gcs/runs/qwen25vl_7b_sft/ckpt/sft",
      dtype="bfloat16", param_dtype="float32", remat="full"))

  c.rl = ml_collections.ConfigDict(dict(
      source="visualprobe", split="train",  # "synthetic": the demo's generated tasks
      steps=38, prompts_per_step=256, group_size=16, max_turns=6,
      # The original's RL recipe (docs/rl_recipe.md): a rollout batch of 256 prompts in 8 PPO mini-batches of
      # 32 (one epoch), a turn cut by its token cap a reward-0 trajectory (not masked), each trajectory's
      # token mean averaged over trajectories, groups of equal rewards dropped and re-drawn, behaviour
      # log-probs recomputed by the training forward (bf16 sampler vs training rounding).
      mini_batches=8, ppo_epochs=1, length_stop="wrong", loss_aggregation="seq_mean_token_mean",
      dynamic_sampling=True, dynamic_sampling_max_rounds=4, recompute_old_logprobs=True,
      max_images=7,  # the question's image + 6 crops: the turn limit binds before the paper's 12
      max_context=16384, max_turn_tokens=2048, temperature=1.0,
      lr=1e-6, warmup_steps=0, clip_low=0.2, clip_high=0.3, exclude_masked_from_stats=False,
      grad_accum_steps=128, logits_chunk=2048, train_vision=True,
      length_buckets=(4096, 8192, 16384), patch_buckets=(4096, 16384, 65536),  # 65,536 = 4 x the context
      num_slots=64, chunk_buckets=(256, 1024), patch_buckets_per_image=(1024, 4096, 10240), decode_steps=16,
      checkpoint_every=10, log_every=1))
  return c
