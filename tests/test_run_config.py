"""The run config read into typed stage configs: one place for defaults, explicit keys win."""

import dataclasses

import pytest

from configs import demo, pretrain_tiny
from mini_o3_jax import run_config
from mini_o3_jax.data import grounding, scene_levels, synthetic
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.pipeline import common
from mini_o3_jax.rl.config import RLConfig
from mini_o3_jax.sampler.rollout import vision_token_ids
from mini_o3_jax.train.optimizer import OptimizerConfig
from mini_o3_jax.train.sft import SFTConfig
from mini_o3_jax.train.vision_targets import FeatureTargetConfig

IDS = run_config.special_ids("small")


@pytest.fixture(scope="module")
def model():
  return config_lib.tiny(1024, **{k: IDS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                        "vision_end_token_id")})


def test_sft_stage_reads_the_demo_section(model):
  config = demo.get_config()
  stage = run_config.sft_stage(config, model)
  c = config.sft
  assert stage.loop == run_config.Loop(steps=c.steps, log_every=c.log_every, checkpoint_every=c.checkpoint_every)
  assert stage.optimizer == OptimizerConfig(lr=c.lr, warmup_steps=c.warmup_steps, total_steps=c.steps,
                                            end_lr_ratio=c.end_lr_ratio, weight_decay=c.weight_decay,
                                            grad_clip_norm=1.0)
  assert stage.step == SFTConfig()  # the demo sets none of the step's keys: all the dataclass's defaults
  assert stage.batch.batch_size == c.batch_size and stage.batch.length_buckets == tuple(c.length_buckets)
  assert stage.batch.patch_buckets == tuple(c.patch_buckets) and stage.batch.patches_follow_length
  assert stage.batch.pad_token_id == model.text.pad_token_id and stage.group_by_length


def test_unset_keys_take_the_dataclass_defaults_and_set_ones_win(model):
  config = demo.get_config()
  del config.sft["patch_buckets"], config.sft["patches_follow_length"], config.sft["group_by_length"]
  stage = run_config.sft_stage(config, model)
  assert stage.batch.patch_buckets == (256, 768) and not stage.batch.patches_follow_length
  assert not stage.group_by_length
  config.sft.grad_accum_steps, config.sft.logits_chunk, config.sft.train_vision = 4, 128, False
  assert run_config.sft_stage(config, model).step == SFTConfig(grad_accum_steps=4, logits_chunk=128,
                                                                train_vision=False)


def test_rl_stage_reads_the_demo_section(model):
  config = demo.get_config()
  c = config.rl
  for masking in (True, False):
    stage = run_config.rl_stage(config, model, overturn_masking=masking)
    assert stage.step == RLConfig(clip_low=c.clip_low, clip_high=c.clip_high, overturn_masking=masking,
                                  exclude_masked_from_stats=c.exclude_masked_from_stats, temperature=c.temperature,
                                  loss_aggregation=c.loss_aggregation,
                                  suppressed_token_ids=vision_token_ids(model))
  # The RL optimizer holds its lr after warmup and does not decay weights, whatever the section says.
  assert stage.optimizer == OptimizerConfig(lr=c.lr, warmup_steps=c.warmup_steps, total_steps=c.steps,
                                            end_lr_ratio=1.0, weight_decay=0.0, grad_clip_norm=1.0)
  assert stage.draws == run_config.RLDraws(prompts_per_step=c.prompts_per_step, group_size=c.group_size,
                                           tiers=tuple(c.tiers), length_stop=c.length_stop,
                                           dynamic_sampling=c.dynamic_sampling,
                                           dynamic_sampling_max_rounds=c.dynamic_sampling_max_rounds)
  rows = c.prompts_per_step * c.group_size
  assert stage.batch.batch_size == rows // c.mini_batches and stage.batch.patch_buckets == tuple(c.patch_buckets)
  assert stage.rollout.num_slots == rows and stage.rollout.max_turns == c.max_turns
  assert stage.rollout.max_forced_tokens == 32 and stage.rollout.decode_steps == c.decode_steps
  assert (stage.ppo_epochs, stage.mini_batches, stage.recompute_old_logprobs) == (1, 1, False)


def test_rl_stage_refuses_mini_batches_that_do_not_split_the_prompts(model):
  config = demo.get_config()
  config.rl.mini_batches = 3
  with pytest.raises(ValueError, match="mini_batches"):
    run_config.rl_stage(config, model)


def test_pretrain_stage_reads_its_section(model):
  config = common.resolve(pretrain_tiny.get_config())
  c = config.pretrain
  stage = run_config.pretrain_stage(config, model)
  assert stage.loop == run_config.Loop(steps=c.steps, log_every=c.log_every, checkpoint_every=c.checkpoint_every,
                                       eval_every=c.eval_every)
  assert stage.curriculum == scene_levels.Curriculum.parse(c.curriculum)
  assert stage.questions == grounding.GroundingConfig(**c.questions.to_dict())
  assert stage.step == SFTConfig(objectness_weight=c.objectness_weight, objectness_scale=c.objectness_scale,
                                 train_vision=not c.freeze_vision)
  assert stage.optimizer.freeze_vision == c.freeze_vision and stage.optimizer.lr == c.lr
  assert stage.from_stage == c.from_stage
  assert stage.probe_levels == tuple(c.probe_levels) and stage.probe_scenes == c.probe_scenes
  assert stage.batch.patch_buckets == tuple(c.patch_buckets) and stage.objectness_power == c.objectness_power
  del c["objectness_power"], c.questions["question_first"], c["from_stage"], c["freeze_vision"]
  stage = run_config.pretrain_stage(config, model)
  assert stage.objectness_power == run_config.PretrainStage.objectness_power
  assert stage.questions.question_first == grounding.GroundingConfig.question_first
  assert stage.from_stage == "" and stage.step.train_vision and not stage.optimizer.freeze_vision


def test_pretrain_vision_stage_reads_its_section():
  config = common.resolve(pretrain_tiny.get_config())
  c = config.pretrain_vision
  model = config_lib.tiny_qwen3(1024, **{k: IDS[k] for k in ("image_token_id", "video_token_id",
                                                             "vision_start_token_id", "vision_end_token_id")})
  stage = run_config.pretrain_vision_stage(config, model)
  assert stage.position_table_sincos == c.position_table_sincos
  assert stage.loop == run_config.Loop(steps=c.steps, log_every=c.log_every, checkpoint_every=c.checkpoint_every)
  assert stage.optimizer.train_only_vision and not stage.optimizer.freeze_vision and stage.optimizer.lr == c.lr
  assert stage.curriculum == scene_levels.Curriculum.parse(c.curriculum)
  palette = run_config.task_config(config).palette
  assert stage.palette == tuple(tuple(v / 255 for v in rgb) for _, rgb in palette)
  assert stage.targets == FeatureTargetConfig(num_colours=len(palette),
                                              num_shapes=len(run_config.task_config(config).shapes),
                                              position_scale=c.targets.position_scale,
                                              object_scale=c.targets.object_scale,
                                              colour_scale=c.targets.colour_scale, shape_scale=c.targets.shape_scale,
                                              shape_by_saliency=c.targets.shape_by_saliency)
  assert (stage.chroma_floor, stage.saliency_power, stage.shape_tokens, stage.shape_on_crops) == (
      c.targets.chroma_floor, c.targets.saliency_power, c.targets.shape_tokens, c.targets.shape_on_crops)
  assert (stage.read_jitter, stage.search_rows) == (c.read_jitter, c.search_rows)
  c.search_rows = 1
  c.targets.shape_on_crops = True
  again = run_config.pretrain_vision_stage(config, model)
  assert (again.search_rows, again.shape_on_crops) == (1, True)


def test_an_orbax_init_from_keeps_the_configs_own_sizes(tmp_path):
  """`model.init_from` without a config.json (an Orbax checkpoint of a run) builds the config's own sizes;
  an HF directory's config.json wins; an unknown preset is refused."""
  config = demo.get_config()
  sized = run_config.model_config_for_vocabulary(config, 1024, IDS)
  config.model.init_from = str(tmp_path / "ckpt" / "pretrain")
  assert run_config.model_config_for_vocabulary(config, 1024, IDS) == sized
  hf_dir = tmp_path / "hf"
  bigger = sized.replace(text=dataclasses.replace(sized.text, num_hidden_layers=sized.text.num_hidden_layers + 1))
  bigger.save_pretrained(str(hf_dir))
  config.model.init_from = str(hf_dir)
  assert run_config.model_config_for_vocabulary(config, 1024, IDS).text.num_hidden_layers == bigger.text.num_hidden_layers
  config.model.preset = "qwen25vl_70b"
  config.model.init_from = ""
  with pytest.raises(ValueError, match="expected one of"):
    run_config.model_config_for_vocabulary(config, 1024, IDS)


def test_task_config_is_the_runs_world():
  config = demo.get_config()
  config.seed, config.label_shade = 3, 0.25
  world = run_config.task_config(config)
  assert (world.seed, world.label_shade) == (3, 0.25)
  assert (world.view_min_pixels, world.view_max_pixels) == (config.view_pixels, config.view_pixels)
  del config.view_pixels
  assert run_config.task_config(config) == synthetic.SyntheticConfig(seed=3, label_shade=0.25)
