"""The RL stages: GRPO from the SFT model, with over-turn masking (`rl`) and without (`rl_no_mask`), and
the paper's "no cold start" ablation: the same RL straight from `model.init_from` (`rl_no_coldstart`).

An RL stage starts from this work directory's SFT checkpoint when there is one, else from
`model.init_from` (an SFT model trained elsewhere); `rl_no_coldstart` always from `model.init_from`.

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


def prompt_indices(draws: run_config.RLDraws, step: int, round_: int = 0) -> range:
  """Indices in the prompt stream of step `step`'s draw `round_` (0: the step's own prompts)."""
  n = draws.prompts_per_step
  if round_ == 0:
    return range(step * n, (step + 1) * n)
  start = DYNAMIC_INDEX_OFFSET + (step * draws.dynamic_sampling_max_rounds + round_ - 1) * n
  return range(start, start + n)


def rl_tasks(config, draws: run_config.RLDraws, step: int, round_: int = 0) -> list[agent_task.Task]:
  """The prompts of RL step `step` (draw `round_`), each repeated group_size times (its GRPO group)."""
  indices = prompt_indices(draws, step, round_)
  if not sources.is_synthetic(config.rl):
    return sources.rl_tasks(config, indices)
  tcfg = run_config.task_config(config)
  tasks = []
  for k in indices:
    tier = draws.tiers[k % len(draws.tiers)]
    task = synthetic.make_task(tier, RL_INDEX_OFFSET + k, tcfg, split="train")
    tasks += [agent_task.Task(image=task.image, question=task.question, gold=task.answer, id=task.id)] * draws.group_size
  return tasks


def correctness_reward(judge) -> Callable[[Any], float]:
  """The recipe's reward of a rollout: 1 for a correct final answer, else 0 (no answer: 0)."""

  def reward(result) -> float:
    traj = result.trajectory
    return float(traj.final_answer is not None and bool(judge(traj.question, traj.final_answer, traj.gold, None)))

  return reward


def draw_batch(config, sampler, reward_fn: Callable[[Any], float], step: int,
               draws: run_config.RLDraws | None = None) -> rollouts.RolloutBatch:
  """Rollouts of step `step`: the step's prompts, and with `dynamic_sampling` more draws until
  `prompts_per_step` informative groups are kept (or `dynamic_sampling_max_rounds` extra draws ran;
  the rest of the batch is then made of dropped groups). `draws`: `run_config.rl_draws(config)`."""
  draws = draws or run_config.rl_draws(config)
  results = sampler.rollout(rl_tasks(config, draws, step), seed=config.seed * 100_003 + step)
  examples, stats = rollouts.rl_examples(results, reward_fn, draws.length_stop)
  if not draws.dynamic_sampling:
    return rollouts.RolloutBatch(examples, stats)
  kept, dropped, drawn = [], [], 0
  rounds = 0
  while True:
    for group in rollouts.groups_of(examples):
      (kept if rollouts.informative(group) else dropped).append(group)
      drawn += 1
    if len(kept) >= draws.prompts_per_step or rounds >= draws.dynamic_sampling_max_rounds:
      break
    rounds += 1
    more = sampler.rollout(rl_tasks(config, draws, step, rounds),
                           seed=(config.seed * 100_003 + step) * 31 + rounds)
    examples, _ = rollouts.rl_examples(more, reward_fn, draws.length_stop)
  kept = kept[:draws.prompts_per_step]
  stats.update(dynamic_rounds=float(rounds), dynamic_groups_drawn=float(drawn),
               dynamic_groups_kept=float(len(kept)))
  # Short after the last draw: the batch is filled with dropped groups (advantage 0, no gradient of their
  # own), so every update keeps its shape.
  kept += dropped[:draws.prompts_per_step - len(kept)]
  return rollouts.RolloutBatch([e for g in kept for e in g], stats)


def start_from(workdir: str, name: str, from_sft: bool, init_from: str) -> str:
  """Where RL stage `name` starts: "resume" (its own checkpoint), "sft" (this work directory's SFT model)
  or "init_from" (`model.init_from`: an SFT model trained elsewhere, or the base for `rl_no_coldstart`)."""
  if sources.has_checkpoint(workdir, name):
    return "resume"
  if from_sft and (sources.has_checkpoint(workdir, "sft") or not init_from):
    return "sft"
  if not init_from:
    raise ValueError(f"stage {name!r} starts from model.init_from, which is not set")
  return "init_from"


def _start_params(config, workdir: str, name: str, from_sft: bool, mcfg, mesh):
  """The parameters an RL stage starts from (None when it resumes: its checkpoint restores them)."""
  init_from = config.model.get("init_from") or ""
  where = start_from(workdir, name, from_sft, init_from)
  log.info("%s: starts from %s", name, {"resume": "its checkpoint", "sft": "this run's SFT model",
                                        "init_from": init_from}[where])
  if where == "sft":
    return train_stages.restore_params(workdir, "sft", mcfg, mesh)
  return sources.init_params(config, mcfg, mesh) if where == "init_from" else None


def _run_rl(config, workdir: str, *, name: str, overturn_masking: bool, from_sft: bool = True) -> dict:
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  stage = run_config.rl_stage(config, mcfg, overturn_masking=overturn_masking)
  loop = stage.loop
  state, shardings, tx = train_stages.make_state(config, mcfg, stage.optimizer, mesh, seed=config.seed,
                                                 params=_start_params(config, workdir, name, from_sft, mcfg, mesh))
  step_fn = rl_step.make_rl_step(stage.step, tx, mesh, shardings,
                                 learning_rate_fn=opt_lib.make_schedule(stage.optimizer))
  logprob_fn = rl_step.make_logprob_fn(stage.step, state.graphdef, mesh) if stage.recompute_old_logprobs else None
  collate = functools.partial(batch_lib.collate_rl, model_config=mcfg, batch_config=stage.batch)
  sampler = rollout_lib.Sampler(state.model(), tokenizer, stage.rollout, mesh=common.sampler_mesh(config, mesh))
  reward_fn = correctness_reward(common.judge())

  ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(os.path.join(workdir, "ckpt", name),
                                                         save_interval_steps=loop.checkpoint_every, max_to_keep=2))
  start = 0
  if ckpt.latest_step() is not None:
    state, data = ckpt.restore(state_lib.abstract_train_state(shardings, state))
    # The RL step (a step may hold several updates); checkpoints before the switch stored only state.step.
    start = int((data or {}).get("step", jax.device_get(state.step)))
    common.check_resume(name, start, loop.steps, ckpt.directory)
    sampler.set_params(state.model())
    log.info("%s: resumed from step %d", name, start)
  metrics_log = common.MetricLog(common.path(workdir, "metrics", f"{name}.jsonl"), start)
  metrics = {}
  with progress.bar(range(start, loop.steps), desc=name, initial=start, total=loop.steps) as bar:
    for step in bar:
      drawn = draw_batch(config, sampler, reward_fn, step, stage.draws)
      batches = [batch_lib.shard_batch(collate(mb), mesh)
                 for mb in rollouts.mini_batches(drawn.examples, stage.mini_batches)]
      state, metrics = rl_step.run_updates(state, step_fn, batches, stage.ppo_epochs, logprob_fn)
      metrics.update(drawn.stats)
      sampler.set_params(state.model())
      bar.set_postfix_str(common.fmt_metrics(metrics, ("rollout_accuracy", "rollout_turns", "masked_fraction")))
      if (step + 1) % loop.log_every == 0 or step + 1 == loop.steps:
        metrics_log.write(step + 1, metrics)
        log.info("%s step %d: %s", name, step + 1, common.fmt_metrics(
            metrics, ("rollout_accuracy", "rollout_turns", "rollout_overturn", "masked_fraction",
                      "zero_adv_group_fraction", "loss", "first_approx_kl", "clip_fraction", "entropy", "grad_norm",
                      "step_time_s")))
      ckpt.maybe_save(state, {"step": step + 1}, step=step + 1)
  if ckpt.latest_step() != loop.steps:
    ckpt.save(state, {"step": loop.steps}, step=loop.steps)
  ckpt.close()
  metrics_log.close()
  metrics = common.last_metrics(metrics_log.file, metrics)
  return {"steps": loop.steps, "overturn_masking": overturn_masking,
          "final_rollout_accuracy": metrics.get("rollout_accuracy")}


def run_rl(config, workdir: str) -> dict:
  return _run_rl(config, workdir, name="rl", overturn_masking=True)


def run_rl_no_mask(config, workdir: str) -> dict:
  return _run_rl(config, workdir, name="rl_no_mask", overturn_masking=False)


def run_rl_no_coldstart(config, workdir: str) -> dict:
  return _run_rl(config, workdir, name="rl_no_coldstart", overturn_masking=True, from_sft=False)
