"""The demo's RL stages: GRPO from the SFT model, with over-turn masking (`rl`) and without (`rl_no_mask`).

Each step: `prompts_per_step` synthetic tasks, `group_size` sampled trajectories each (training turn
limit 6), reward 1 for a correct answer and 0 otherwise, one jitted GRPO update whose loss masks the
over-turn trajectories (or, in the ablation, treats them as wrong answers), then the sampler gets the
new parameters. Resumes from the stage's latest checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np
from tqdm import tqdm

from mini_o3_jax.data import synthetic
from mini_o3_jax.pipeline import common, sources
from mini_o3_jax.pipeline import train_stages
from mini_o3_jax.sampler import SamplingParams
import mini_o3_jax.sampler.rollout as rollout_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import optimizer as opt_lib
from mini_o3_jax.train import rl as rl_lib
from mini_o3_jax.train import state as state_lib

log = logging.getLogger(__name__)

# RL tasks come from indices far past the cold-start ones, so RL never sees an SFT scene.
RL_INDEX_OFFSET = 1_000_000


def rl_tasks(config, step: int) -> list[rollout_lib.Task]:
  """The prompts of RL step `step`, each repeated group_size times (its GRPO group)."""
  if not sources.is_synthetic(config.rl):
    return sources.rl_tasks(config, step)
  c = config.rl
  tcfg = common.task_config(config)
  tasks = []
  for j in range(c.prompts_per_step):
    k = step * c.prompts_per_step + j
    tier = c.tiers[k % len(c.tiers)]
    task = synthetic.make_task(tier, RL_INDEX_OFFSET + k, tcfg, split="train")
    tasks += [rollout_lib.Task(image=task.image, question=task.question, gold=task.answer, id=task.id)] * c.group_size
  return tasks


def rollout_config(config, section, *, num_slots: int, max_turns: int) -> rollout_lib.RolloutConfig:
  min_pixels, max_pixels = sources.pixel_budget(config)
  return rollout_lib.RolloutConfig(
      num_slots=num_slots, max_turns=max_turns, max_context=section.max_context,
      max_turn_tokens=section.max_turn_tokens, max_images=section.get("max_images", max_turns + 1),
      min_pixels=min_pixels, max_pixels=max_pixels, sampling=SamplingParams(temperature=section.temperature),
      chunk_buckets=tuple(section.get("chunk_buckets", (32, 64, 128))),
      patch_buckets=tuple(section.get("patch_buckets_per_image", (64,))) or None,
      decode_steps=section.get("decode_steps", 8), max_forced_tokens=32)


def rl_examples(results, judge) -> tuple[list[dict], dict]:
  """RolloutResults -> RL examples (reward, group, over-turn flag travel with the tokens)."""
  examples, correct, turns = [], [], []
  for r in results:
    traj = r.trajectory
    ok = traj.final_answer is not None and bool(judge(traj.question, traj.final_answer, traj.gold, None))
    correct.append(ok)
    turns.append(r.num_turns)
    examples.append(batch_lib.example_from_rollout(r, reward=float(ok), group_id=traj.id))
  stats = {"rollout_accuracy": float(np.mean(correct)), "rollout_turns": float(np.mean(turns)),
           "rollout_overturn": float(np.mean([e["overturn"] for e in examples]))}
  return examples, stats


def _run_rl(config, workdir: str, *, name: str, overturn_masking: bool) -> dict:
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  c = config.rl
  if config.model.get("init_from"):  # a model from elsewhere (not needed when resuming)
    sft_params = None if sources.has_checkpoint(workdir, name) else sources.init_params(config, mcfg, mesh)
  else:
    sft_params = train_stages.restore_params(workdir, "sft", config, mcfg, mesh)
  ocfg = opt_lib.OptimizerConfig(lr=c.lr, warmup_steps=c.warmup_steps, total_steps=c.steps, end_lr_ratio=1.0,
                                 weight_decay=0.0, grad_clip_norm=1.0)
  state, shardings, tx = train_stages.make_state(config, mcfg, ocfg, mesh, seed=config.seed, params=sft_params)
  # The sampler's behaviour log-probs are log_softmax(logits / T): the step must use the same T.
  # The ablation runs the *same* compiled step with every over-turn flag cleared, which is the same
  # math as RLConfig(overturn_masking=False) (over-turn trajectories are unanswered, so their reward
  # is 0 either way; tests/test_train_steps.py checks the equality) and reuses the compile cache.
  rl_cfg = rl_lib.RLConfig(clip_low=c.clip_low, clip_high=c.clip_high, overturn_masking=True,
                           exclude_masked_from_stats=c.exclude_masked_from_stats, temperature=c.temperature,
                           grad_accum_steps=c.get("grad_accum_steps", 1), logits_chunk=c.get("logits_chunk"),
                           train_vision=c.get("train_vision", True))
  step_fn = rl_lib.make_rl_step(rl_cfg, tx, mesh, shardings, learning_rate_fn=opt_lib.make_schedule(ocfg))
  batch_size = c.prompts_per_step * c.group_size
  batch_cfg = batch_lib.BatchConfig(batch_size=batch_size, length_buckets=tuple(c.length_buckets),
                                    patch_buckets=tuple(c.get("patch_buckets", (64 * (c.max_turns + 1),))),
                                    patches_follow_length=c.get("patches_follow_length", False),
                                    pad_token_id=mcfg.text.pad_token_id)
  collate = functools.partial(batch_lib.collate_rl, model_config=mcfg, batch_config=batch_cfg)
  sampler = rollout_lib.Sampler(state.model(), tokenizer,
                                rollout_config(config, c, num_slots=c.get("num_slots") or batch_size,
                                               max_turns=c.max_turns), mesh=common.sampler_mesh(config, mesh))
  judge = common.judge()

  ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(os.path.join(workdir, "ckpt", name),
                                                         save_interval_steps=c.checkpoint_every, max_to_keep=2))
  start = 0
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(state_lib.abstract_train_state(shardings, state))
    start = int(jax.device_get(state.step))
    common.check_resume(name, start, c.steps, ckpt.directory)
    sampler.set_params(state.model())
    log.info("%s: resumed from step %d", name, start)
  metrics_log = common.MetricLog(common.path(workdir, "metrics", f"{name}.jsonl"), start)
  metrics = {}
  with tqdm(range(start, c.steps), desc=name, initial=start, total=c.steps) as bar:
    for step in bar:
      tasks = rl_tasks(config, step)
      results = sampler.rollout(tasks, seed=config.seed * 100_003 + step)
      examples, stats = rl_examples(results, judge)
      if not overturn_masking:
        examples = [dict(e, overturn=False, reward=0.0 if e["overturn"] else e["reward"]) for e in examples]
      batch = batch_lib.shard_batch(collate(examples), mesh)
      state, metrics = state_lib.timed_step(step_fn, state, batch)
      metrics.update(stats)
      sampler.set_params(state.model())
      bar.set_postfix_str(common.fmt_metrics(metrics, ("rollout_accuracy", "rollout_turns", "masked_fraction")))
      if (step + 1) % c.log_every == 0 or step + 1 == c.steps:
        metrics_log.write(step + 1, metrics)
        log.info("%s step %d: %s", name, step + 1, common.fmt_metrics(
            metrics, ("rollout_accuracy", "rollout_turns", "rollout_overturn", "masked_fraction",
                      "zero_adv_group_fraction", "loss", "clip_fraction", "entropy", "grad_norm", "step_time_s")))
      ckpt.maybe_save(state)
  if ckpt.latest_step() != c.steps:
    ckpt.save(state)
  ckpt.close()
  metrics = common.last_metrics(metrics_log.file, metrics)
  return {"steps": c.steps, "overturn_masking": overturn_masking,
          "final_rollout_accuracy": metrics.get("rollout_accuracy")}


def run_rl(config, workdir: str) -> dict:
  return _run_rl(config, workdir, name="rl", overturn_masking=True)


def run_rl_no_mask(config, workdir: str) -> dict:
  return _run_rl(config, workdir, name="rl_no_mask", overturn_masking=False)
