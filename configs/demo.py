"""The embedded default: the whole Mini-o3 method in miniature on a laptop CPU.

  python -m mini_o3_jax.main --config configs/demo.py --workdir /tmp/mini_o3_demo

Synthetic visual-search tasks -> scripted cold-start trajectories -> SFT of a ~1M-parameter
Qwen2.5-VL -> GRPO with over-turn masking (training turn limit 6), and the same RL without the mask ->
evaluation at 1..32 max turns -> report.md, turn_scaling.png, metrics.json, an HF export.
`--config.quick=True` runs every stage at toy sizes (for tests): `quick_preset` below.
"""

import ml_collections

from mini_o3_jax.pipeline import coldstart_stage


def quick_preset() -> ml_collections.ConfigDict:
  """Toy sizes: every stage runs in seconds (tests, smoke checks of the whole pipeline).

  Applied over the config when `quick` is set, and flags typed on the command line win over it
  (`pipeline.common.resolve`). Compiles are most of such a run, and XLA's -O0 halves them; the few
  steps run slower, which costs less.
  """
  return ml_collections.ConfigDict(dict(
      xla_flags="--xla_backend_optimization_level=0",
      data=dict(sft_tasks=dict(easy=6, medium=6, hard=8)),
      # One length bucket: one shape per step function, since compiles, not steps, dominate here.
      sft=dict(steps=6, batch_size=4, checkpoint_every=3, log_every=2, length_buckets=(768,)),
      rl=dict(steps=2, prompts_per_step=2, group_size=2, checkpoint_every=1, log_every=1, max_turn_tokens=48,
              max_context=768, length_buckets=(768,)),
      eval=dict(n_per_tier=2, budgets=(1, 2, 4), num_slots=4, max_turn_tokens=48, max_context=1024,
                viewer_examples=1, skills_per_tier=2),
      coldstart=dict(n_per_tier=2, samples_per_question=2, num_exemplars=1, max_turn_tokens=48, num_slots=4,
                     questions_per_batch=2)))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stages = ("data", "sft", "rl", "rl_no_mask", "eval", "report", "export")
  c.quick = False  # apply quick_preset: toy sizes for every stage
  c.quick_preset = quick_preset()
  c.seed = 0
  c.xla_flags = ""  # added to XLA_FLAGS before the backend starts (the quick preset compiles at -O0)
  c.view_pixels = 112 * 112  # every image (scene and crop) is shown at this budget: 8x8 patches
  c.label_shade = 0.0  # labels this much darker than their shapes (data.scene.SyntheticConfig.label_shade)

  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=1024))
  c.model = ml_collections.ConfigDict(dict(
      # "qwen2_5_vl" or "qwen3_vl" (its tower: a learned position table of vision_position_grid^2 entries,
      # DeepStack after the vision blocks vision_deepstack names), either with transformers' structure.
      family="qwen2_5_vl",
      hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
      vision_hidden_size=64, vision_intermediate_size=128, vision_depth=2, vision_heads=4, vision_patch_size=14,
      vision_position_grid=8, vision_deepstack=(),
      # Experimental, not Qwen2.5-VL (model/config.py; docs/miniature.md): a position table on the patch
      # embeddings, and the merger output centred / rescaled per image with a post-merger cell code.
      vision_position_table=0, vision_position_sincos=0.0, vision_output_centre=False, vision_output_rms=0.0,
      vision_output_position_code=0.0,
      # Start from these weights: an HF directory (its config.json gives the sizes) or an Orbax checkpoint
      # directory of a run with the sizes above (e.g. WORKDIR/ckpt/pretrain); "" = a fresh init.
      init_from=""))

  c.data = ml_collections.ConfigDict(dict(
      source="synthetic",  # or "collected": the `coldstart` stage's output in collected_dir
      collected_dir="",
      sft_tasks=dict(easy=150, medium=300, hard=450),  # scripted cold-start trajectories per tier
      max_tokens=768,  # longer trajectories (rare 10-turn searches) are dropped
      # The scripted explorer's first crop (data/coldstart.py): "region" (a shape's zoom path) or
      # "cell_window" (its 3 x 3 cell named, then that cell's half-size window: the pretrained base's answer).
      first_crop="region"))

  c.sft = ml_collections.ConfigDict(dict(
      steps=200, batch_size=16, lr=2e-3, warmup_steps=10, end_lr_ratio=0.05, weight_decay=0.01,
      # Similar lengths per batch and patches padded to the length bucket: one compile per bucket.
      group_by_length=True, length_buckets=(160, 256, 384, 512, 768), patches_follow_length=True,
      patch_buckets=(768,), checkpoint_every=50, log_every=10,
      train_vision=True))  # False: the tower frozen (no backward through it)

  c.rl = ml_collections.ConfigDict(dict(
      steps=4, prompts_per_step=4, group_size=4, tiers=("medium", "hard"), max_turns=6, max_context=1024,
      max_turn_tokens=96, temperature=1.0, lr=2e-4, warmup_steps=1, clip_low=0.2, clip_high=0.3,
      exclude_masked_from_stats=False, checkpoint_every=2, log_every=1,
      # The original's choices where they cost nothing here (docs/rl_recipe.md); dynamic sampling, old
      # log-probs recomputed and several updates per batch are switches (fp32 on a CPU: the sampler's
      # log-probs already equal the training forward's).
      length_stop="wrong", loss_aggregation="seq_mean_token_mean", dynamic_sampling=False,
      dynamic_sampling_max_rounds=4, recompute_old_logprobs=False, ppo_epochs=1, mini_batches=1,
      length_buckets=(512, 1024), patch_buckets=(448,),  # 7 images x 64 patches: one vision shape
      train_vision=True,  # False: the tower frozen (no backward through it), as SFT's train_vision
      # The sampler (`run_config.rollout_config`; unset keys keep `sampler.RolloutConfig`'s defaults).
      chunk_buckets=(32, 64, 128), patch_buckets_per_image=(64,), decode_steps=8))

  # Model-driven cold start (not in the default stages): after `sft`, `--config.stages=coldstart`
  # collects few-shot trajectories with the SFT model into WORKDIR/coldstart (correct ones kept); then
  # `--config.data.source=collected --config.data.collected_dir=WORKDIR/coldstart` trains on them.
  c.coldstart = coldstart_stage.default_config()

  c.eval = ml_collections.ConfigDict(dict(
      # Greedy: one deterministic trajectory per task (the paper reports Avg@K at temperature 1.0).
      # The claims need medium and hard; add "easy" with --config.eval.tiers (about 30 s per model).
      tiers=("medium", "hard"), n_per_tier=20, budgets=(1, 2, 4, 8, 16, 32), max_context=3072,
      max_turn_tokens=96, temperature=0.0, num_slots=20, viewer_examples=3,
      chunk_buckets=(32, 64, 128), patch_buckets_per_image=(64,), decode_steps=8,
      skills_per_tier=16))  # scripted test trajectories per tier for the skills table (pipeline/probe.py)
  return c
