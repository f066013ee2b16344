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

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mini_o3_jax.agent import trajectory as trajectory_lib
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


def rl_tasks(config, step: int, round_: int = 0) -> list[rollout_lib.Task]:
  """The prompts of RL step `step` (draw `round_`), each repeated group_size times (its GRPO group)."""
  indices = prompt_indices(config, step, round_)
  if not sources.is_synthetic(config.rl):
    return sources.rl_tasks(config, indices)
  c = config.rl
  tcfg = common.task_config(config)
  tasks = []
  for k in indices:
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


def correctness_reward(judge) -> Callable[[Any], float]:
  """The recipe's reward of a rollout: 1 for a correct final answer, else 0 (no answer: 0)."""

  def reward(result) -> float:
    traj = result.trajectory
    return float(traj.final_answer is not None and bool(judge(traj.question, traj.final_answer, traj.gold, None)))

  return reward


def rl_examples(results, reward_fn: Callable[[Any], float],
                length_stop: str = "overturn") -> tuple[list[dict], dict]:
  """RolloutResults -> RL examples (reward, group, over-turn flag travel with the tokens).

  reward_fn: a rollout result -> its reward (`correctness_reward`).
  length_stop: how a trajectory whose turn ran out of tokens counts (`trajectory.overturn_from_stop_reason`).
  """
  examples, rewards, turns = [], [], []
  for r in results:
    reward = reward_fn(r)
    rewards.append(reward)
    turns.append(r.num_turns)
    example = batch_lib.example_from_rollout(r, reward=reward, group_id=r.trajectory.id)
    example["overturn"] = trajectory_lib.overturn_from_stop_reason(r.stop_reason, length_stop)
    examples.append(example)
  stats = {"rollout_accuracy": float(np.mean(rewards)), "rollout_turns": float(np.mean(turns)),
           "rollout_overturn": float(np.mean([e["overturn"] for e in examples])),
           "rollout_length_stop": float(np.mean([r.stop_reason == "max_response" for r in results]))}
  return examples, stats


def groups_of(examples: list[dict]) -> list[list[dict]]:
  """Examples grouped by `group_id`, in order of first appearance."""
  groups: dict = {}
  for e in examples:
    groups.setdefault(e["group_id"], []).append(e)
  return list(groups.values())


def informative(group: list[dict]) -> bool:
  """Whether a group's rewards differ (over-turn trajectories count as reward 0), i.e. it carries a
  non-zero advantage; the original's dynamic sampling keeps only these."""
  rewards = {0.0 if e["overturn"] else float(e["reward"]) for e in group}
  return len(rewards) > 1


@dataclasses.dataclass
class RolloutBatch:
  """The examples of one RL step and what drawing them took."""
  examples: list[dict]
  stats: dict


def draw_batch(config, sampler, reward_fn: Callable[[Any], float], step: int) -> RolloutBatch:
  """Rollouts of step `step`: the step's prompts, and with `dynamic_sampling` more draws until
  `prompts_per_step` informative groups are kept (or `dynamic_sampling_max_rounds` extra draws ran;
  the rest of the batch is then made of dropped groups)."""
  c = config.rl
  length_stop = c.get("length_stop", "overturn")
  results = sampler.rollout(rl_tasks(config, step), seed=config.seed * 100_003 + step)
  examples, stats = rl_examples(results, reward_fn, length_stop)
  if not c.get("dynamic_sampling", False):
    return RolloutBatch(examples, stats)
  kept = [g for g in groups_of(examples) if informative(g)]
  dropped = [g for g in groups_of(examples) if not informative(g)]
  rounds, drawn = 0, len(groups_of(examples))
  while len(kept) < c.prompts_per_step and rounds < c.get("dynamic_sampling_max_rounds", 4):
    rounds += 1
    more = sampler.rollout(rl_tasks(config, step, rounds), seed=(config.seed * 100_003 + step) * 31 + rounds)
    extra, _ = rl_examples(more, reward_fn, length_stop)
    drawn += len(groups_of(extra))
    kept += [g for g in groups_of(extra) if informative(g)]
    dropped += [g for g in groups_of(extra) if not informative(g)]
  kept = kept[:c.prompts_per_step]
  stats.update(dynamic_rounds=float(rounds), dynamic_groups_drawn=float(drawn),
               dynamic_groups_kept=float(len(kept)))
  # Short after the last draw: the batch is filled with dropped groups (advantage 0, no gradient of their
  # own), so every update keeps its shape.
  kept += dropped[:c.prompts_per_step - len(kept)]
  return RolloutBatch([e for g in kept for e in g], stats)


def mini_batches(examples: list[dict], n: int) -> list[list[dict]]:
  """`n` mini-batches of whole groups (the first ones one group larger when they do not divide)."""
  groups = groups_of(examples)
  size, extra = divmod(len(groups), n)
  out, start = [], 0
  for i in range(n):
    stop = start + size + (i < extra)
    out.append([e for g in groups[start:stop] for e in g])
    start = stop
  return out


def run_updates(state, step_fn, batches: list, epochs: int, logprob_fn=None):
  """`epochs` passes of GRPO updates over the mini-batches of one rollout batch -> (state, metrics).

  With `logprob_fn` (`rl.make_logprob_fn`) the behaviour log-probs are first recomputed by the training
  forward at the parameters the rollouts used, and `sampler_logprob_gap` (mean sampler minus training
  log-prob over response tokens) is logged. The metrics are the last update's, plus the first update's
  `first_approx_kl` / `first_clip_fraction` (drift between behaviour and training policy shows there)
  and `updates`.
  """
  extra = {}
  if logprob_fn is not None:
    recomputed = [logprob_fn(state.params, b) for b in batches]
    gaps = [jax.device_get(jnp.sum((b.old_logprobs - r) * (b.response_mask > 0))
                           / jnp.maximum(jnp.sum(b.response_mask > 0), 1)) for b, r in zip(batches, recomputed)]
    extra["sampler_logprob_gap"] = float(np.mean(gaps))
    batches = [dataclasses.replace(b, old_logprobs=r) for b, r in zip(batches, recomputed)]
  metrics = {}
  for update in range(epochs * len(batches)):
    state, metrics = state_lib.timed_step(step_fn, state, batches[update % len(batches)])
    if update == 0:
      extra.update(first_approx_kl=metrics.get("approx_kl"), first_clip_fraction=metrics.get("clip_fraction"))
  return state, {**metrics, **extra, "updates": float(epochs * len(batches))}


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
                           train_vision=c.get("train_vision", True),
                           loss_aggregation=c.get("loss_aggregation", "token_mean"),
                           suppressed_token_ids=rollout_lib.vision_token_ids(mcfg))
  step_fn = rl_lib.make_rl_step(rl_cfg, tx, mesh, shardings, learning_rate_fn=opt_lib.make_schedule(ocfg))
  logprob_fn = rl_lib.make_logprob_fn(rl_cfg, state.graphdef, mesh) if c.get("recompute_old_logprobs") else None
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
                                rollout_config(config, c, num_slots=c.get("num_slots") or batch_size,
                                               max_turns=c.max_turns), mesh=common.sampler_mesh(config, mesh))
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
  with tqdm(range(start, c.steps), desc=name, initial=start, total=c.steps) as bar:
    for step in bar:
      drawn = draw_batch(config, sampler, reward_fn, step)
      examples = drawn.examples
      if not overturn_masking:
        examples = [dict(e, overturn=False, reward=0.0 if e["overturn"] else e["reward"]) for e in examples]
      batches = [batch_lib.shard_batch(collate(mb), mesh) for mb in mini_batches(examples, n_mini)]
      state, metrics = run_updates(state, step_fn, batches, epochs, logprob_fn)
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
