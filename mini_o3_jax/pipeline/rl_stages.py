"""The RL stages: GRPO from the SFT model, with over-turn masking (`rl`) and without (`rl_no_mask`).

Each step: `prompts_per_step` tasks, `group_size` sampled trajectories each (training turn limit
`max_turns`), reward 1 for a correct answer and 0 otherwise, then jitted GRPO updates whose loss masks
the over-turn trajectories (or, in the ablation, treats them as wrong answers), then the sampler gets
the new parameters. Resumes from the stage's latest checkpoint.

The original's choices (its verl fork), each a switch of `config.rl` (docs/rl_recipe.md says which is
the default where and why):
  length_stop             "wrong": a turn cut by its token cap is a reward-0 trajectory in the loss (the
                          original's void generation); "overturn": masked like the turn / context limit.
  loss_aggregation        "seq_mean_token_mean" (the original) or "token_mean".
  dynamic_sampling        drop groups whose rewards are all equal and draw more prompts (at most
                          `dynamic_sampling_max_rounds` extra rounds) until the batch holds
                          `prompts_per_step` informative groups; the rounds and the dropped groups are logged.
  recompute_old_logprobs  the behaviour log-probs recomputed by the training forward before the first
                          update (as verl does), instead of the sampler's.
  ppo_epochs, mini_batches  updates per rollout batch: `ppo_epochs` passes over `mini_batches` mini-batches
                          of whole groups (the original: PPO mini-batches), so the clipping acts.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import jax

from mini_o3_jax.agent import task as agent_task
from mini_o3_jax.data import synthetic
from mini_o3_jax.pipeline import common, sources
from mini_o3_jax.pipeline import train_stages
from mini_o3_jax import progress
from mini_o3_jax.rl import config as rl_config
from mini_o3_jax.rl import rollouts
from mini_o3_jax.rl import step as rl_step
from mini_o3_jax import run_config
import mini_o3_jax.sampler.rollout as rollout_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import optimizer as opt_lib
from mini_o3_jax.train import state as state_lib

log = logging.getLogger(__name__)

# RL tasks come from indices far past the cold-start ones, so RL never sees an SFT scene; the extra
# prompts of dynamic sampling from a range of their own, so a step's draws never repeat another's.
RL_INDEX_OFFSET = 1_000_000
DYNAMIC_INDEX_OFFSET = 100_000_000


def prompt_indices(config, step: int, round_: int = 0) -> range:
  """Indices in the prompt stream of step `step`'s draw `round_` (0: the step's own prompts)."""
  c = config.rl
  n = c.prompts_per_step
  if round_ == 0:
    return range(step * n, (step + 1) * n)
  start = DYNAMIC_INDEX_OFFSET + (step * c.get("dynamic_sampling_max_rounds", 4) + round_ - 1) * n
  return range(start, start + n)


def rl_tasks(config, step: int, round_: int = 0) -> list[agent_task.Task]:
  """The prompts of RL step `step` (draw `round_`), each repeated group_size times (its GRPO group)."""
  indices = prompt_indices(config, step, round_)
  if not sources.is_synthetic(config.rl):
    return sources.rl_tasks(config, indices)
  c = config.rl
  tcfg = run_config.task_config(config)
  tasks = []
  for k in indices:
    tier = c.tiers[k % len(c.tiers)]
    task = synthetic.make_task(tier, RL_INDEX_OFFSET + k, tcfg, split="train")
    tasks += [agent_task.Task(image=task.image, question=task.question, gold=task.answer, id=task.id)] * c.group_size
  return tasks


def correctness_reward(judge) -> Callable[[Any], float]:
  """The recipe's reward of a rollout: 1 for a correct final answer, else 0 (no answer: 0)."""

  def reward(result) -> float:
    traj = result.trajectory
    return float(traj.final_answer is not None and bool(judge(traj.question, traj.final_answer, traj.gold, None)))

  return reward


def draw_batch(config, sampler, reward_fn: Callable[[Any], float], step: int) -> rollouts.RolloutBatch:
  """Rollouts of step `step`: the step's prompts, and with `dynamic_sampling` more draws until
  `prompts_per_step` informative groups are kept (or `dynamic_sampling_max_rounds` extra draws ran;
  the rest of the batch is then made of dropped groups)."""
  c = config.rl
  length_stop = c.get("length_stop", "overturn")
  results = sampler.rollout(rl_tasks(config, step), seed=config.seed * 100_003 + step)
  examples, stats = rollouts.rl_examples(results, reward_fn, length_stop)
  if not c.get("dynamic_sampling", False):
    return rollouts.RolloutBatch(examples, stats)
  kept, dropped, drawn = [], [], 0
  rounds = 0
  while True:
    for group in rollouts.groups_of(examples):
      (kept if rollouts.informative(group) else dropped).append(group)
      drawn += 1
    if len(kept) >= c.prompts_per_step or rounds >= c.get("dynamic_sampling_max_rounds", 4):
      break
    rounds += 1
    more = sampler.rollout(rl_tasks(config, step, rounds), seed=(config.seed * 100_003 + step) * 31 + rounds)
    examples, _ = rollouts.rl_examples(more, reward_fn, length_stop)
  kept = kept[:c.prompts_per_step]
  stats.update(dynamic_rounds=float(rounds), dynamic_groups_drawn=float(drawn),
               dynamic_groups_kept=float(len(kept)))
  # Short after the last draw: the batch is filled with dropped groups (advantage 0, no gradient of their
  # own), so every update keeps its shape.
  kept += dropped[:c.prompts_per_step - len(kept)]
  return rollouts.RolloutBatch([e for g in kept for e in g], stats)


def _run_rl(config, workdir: str, *, name: str, overturn_masking: bool) -> dict:
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  c = config.rl
  if config.model.get("init_from"):  # a model from elsewhere (not needed when resuming)
    sft_params = None if sources.has_checkpoint(workdir, name) else sources.init_params(config, mcfg, mesh)
  else:
    sft_params = train_stages.restore_params(workdir, "sft", mcfg, mesh)
  ocfg = opt_lib.OptimizerConfig(lr=c.lr, warmup_steps=c.warmup_steps, total_steps=c.steps, end_lr_ratio=1.0,
                                 weight_decay=0.0, grad_clip_norm=1.0)
  state, shardings, tx = train_stages.make_state(config, mcfg, ocfg, mesh, seed=config.seed, params=sft_params)
  # The sampler's behaviour log-probs are log_softmax(logits / T): the step must use the same T.
  rl_cfg = rl_config.RLConfig(clip_low=c.clip_low, clip_high=c.clip_high, overturn_masking=overturn_masking,
                           exclude_masked_from_stats=c.exclude_masked_from_stats, temperature=c.temperature,
                           grad_accum_steps=c.get("grad_accum_steps", 1), logits_chunk=c.get("logits_chunk"),
                           train_vision=c.get("train_vision", True),
                           loss_aggregation=c.get("loss_aggregation", "token_mean"),
                           suppressed_token_ids=rollout_lib.vision_token_ids(mcfg))
  step_fn = rl_step.make_rl_step(rl_cfg, tx, mesh, shardings, learning_rate_fn=opt_lib.make_schedule(ocfg))
  logprob_fn = rl_step.make_logprob_fn(rl_cfg, state.graphdef, mesh) if c.get("recompute_old_logprobs") else None
  batch_size = c.prompts_per_step * c.group_size
  n_mini, epochs = c.get("mini_batches", 1), c.get("ppo_epochs", 1)
  if c.prompts_per_step % n_mini:
    raise ValueError(f"rl.prompts_per_step={c.prompts_per_step} does not split into rl.mini_batches={n_mini}")
  batch_cfg = batch_lib.BatchConfig(batch_size=batch_size // n_mini, length_buckets=tuple(c.length_buckets),
                                    patch_buckets=tuple(c.get("patch_buckets", (64 * (c.max_turns + 1),))),
                                    patches_follow_length=c.get("patches_follow_length", False),
                                    pad_token_id=mcfg.text.pad_token_id)
  collate = functools.partial(batch_lib.collate_rl, model_config=mcfg, batch_config=batch_cfg)
  sampler = rollout_lib.Sampler(state.model(), tokenizer,
                                run_config.rollout_config(config, c, num_slots=c.get("num_slots") or batch_size,
                                                          max_forced_tokens=32),
                                mesh=common.sampler_mesh(config, mesh))
  reward_fn = correctness_reward(common.judge())

  ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(os.path.join(workdir, "ckpt", name),
                                                         save_interval_steps=c.checkpoint_every, max_to_keep=2))
  start = 0
  if ckpt.latest_step() is not None:
    state, data = ckpt.restore(state_lib.abstract_train_state(shardings, state))
    # The RL step (a step may hold several updates); checkpoints before the switch stored only state.step.
    start = int((data or {}).get("step", jax.device_get(state.step)))
    common.check_resume(name, start, c.steps, ckpt.directory)
    sampler.set_params(state.model())
    log.info("%s: resumed from step %d", name, start)
  metrics_log = common.MetricLog(common.path(workdir, "metrics", f"{name}.jsonl"), start)
  metrics = {}
  with progress.bar(range(start, c.steps), desc=name, initial=start, total=c.steps) as bar:
    for step in bar:
      drawn = draw_batch(config, sampler, reward_fn, step)
      batches = [batch_lib.shard_batch(collate(mb), mesh) for mb in rollouts.mini_batches(drawn.examples, n_mini)]
      state, metrics = rl_step.run_updates(state, step_fn, batches, epochs, logprob_fn)
      metrics.update(drawn.stats)
      sampler.set_params(state.model())
      bar.set_postfix_str(common.fmt_metrics(metrics, ("rollout_accuracy", "rollout_turns", "masked_fraction")))
      if (step + 1) % c.log_every == 0 or step + 1 == c.steps:
        metrics_log.write(step + 1, metrics)
        log.info("%s step %d: %s", name, step + 1, common.fmt_metrics(
            metrics, ("rollout_accuracy", "rollout_turns", "rollout_overturn", "masked_fraction",
                      "zero_adv_group_fraction", "loss", "first_approx_kl", "clip_fraction", "entropy", "grad_norm",
                      "step_time_s")))
      ckpt.maybe_save(state, {"step": step + 1}, step=step + 1)
  if ckpt.latest_step() != c.steps:
    ckpt.save(state, {"step": c.steps}, step=c.steps)
  ckpt.close()
  metrics_log.close()
  metrics = common.last_metrics(metrics_log.file, metrics)
  return {"steps": c.steps, "overturn_masking": overturn_masking,
          "final_rollout_accuracy": metrics.get("rollout_accuracy")}


def run_rl(config, workdir: str) -> dict:
  return _run_rl(config, workdir, name="rl", overturn_masking=True)


def run_rl_no_mask(config, workdir: str) -> dict:
  return _run_rl(config, workdir, name="rl_no_mask", overturn_masking=False)
