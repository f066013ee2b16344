"""Rollouts -> RL examples on the host: reward and over-turn flag attached, grouped, split for updates.

The over-turn flag is decided once, here, from the sampler's stop reason
(`agent.trajectory.overturn_from_stop_reason`); it then travels with the tokens in `RLBatch.overturn`
to the jitted step, which alone applies the mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from mini_o3_jax.agent import trajectory as trajectory_lib
from mini_o3_jax.train import batch as batch_lib


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
