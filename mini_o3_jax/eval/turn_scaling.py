"""Scoring trajectories and accuracy as a function of the test-time turn budget.

One rollout at the largest budget gives the result at every smaller budget exactly: a task's sampling
key advances only with its own tokens (`Sampler.rollout`), so the trajectory under budget k is the
first k turns of the trajectory under budget K > k. If it answered within k turns the outcome is the
same; otherwise its k-th turn was a tool call, which under budget k ends the episode as `max_turns`
(over-turn, no answer, score 0). `truncate_to_budget` applies that rule; a test checks it against
direct runs at the smaller budgets.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from mini_o3_jax import agent
from mini_o3_jax.agent import tools
from mini_o3_jax.agent.trajectory import Trajectory
from mini_o3_jax.eval import statistics


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What one trajectory scored under one turn budget."""
  correct: bool
  answered: bool
  num_turns: int
  stop_reason: str
  overturn: bool
  tool_calls: int
  tool_errors: int


def outcome(traj: Trajectory, judge: Callable[..., bool]) -> Outcome:
  """Scores a finished trajectory: no well-formed answer (over-turn included) scores 0."""
  answer = traj.final_answer
  correct = answer is not None and bool(judge(traj.question, answer, traj.gold, traj.options))
  calls = sum(isinstance(a, (tools.ToolCall, tools.ToolCallError)) for a in traj.actions)
  errors = sum(t.error is not None for t in traj.turns)
  return Outcome(correct=correct, answered=answer is not None, num_turns=traj.num_turns,
                 stop_reason=traj.stop_reason, overturn=traj.overturn, tool_calls=calls, tool_errors=errors)


def truncate_to_budget(traj: Trajectory, max_turns: int) -> Trajectory:
  """The trajectory a run with `max_turns` would have produced (see the module docstring)."""
  if traj.num_turns <= max_turns:
    return traj
  kept = list(traj.turns[:max_turns])
  n_images = 1 + sum(t.observation_index is not None for t in kept)
  # Under the smaller budget the last kept turn's call is never executed.
  last = kept[-1]
  kept[-1] = agent.Turn(last.text)
  if last.observation_index is not None:
    n_images -= 1
  return dataclasses.replace(traj, turns=kept, images=list(traj.images[:n_images]), stop_reason="max_turns",
                             metadata=dict(traj.metadata))


@dataclasses.dataclass(frozen=True)
class Row:
  """One (model, tier, budget) cell of the turn-scaling table (the demo's metrics.json rows)."""
  model: str
  tier: str
  max_turns: int
  n: int
  accuracy: float
  accuracy_low: float   # 95% Wilson interval (`eval.statistics`)
  accuracy_high: float
  mean_turns: float
  mean_turns_correct: float
  overturn_rate: float
  answer_rate: float
  tool_error_rate: float

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def aggregate(model: str, tier: str, max_turns: int, outcomes: Sequence[Outcome]) -> Row:
  n = len(outcomes)
  if n == 0:
    raise ValueError(f"no outcomes for {model}/{tier}/{max_turns}")
  acc = np.mean([o.correct for o in outcomes])
  correct_turns = [o.num_turns for o in outcomes if o.correct]
  calls = sum(o.tool_calls for o in outcomes)
  low, high = statistics.wilson_interval(sum(o.correct for o in outcomes), n)
  return Row(model=model, tier=tier, max_turns=max_turns, n=n, accuracy=float(acc), accuracy_low=low, accuracy_high=high,
             mean_turns=float(np.mean([o.num_turns for o in outcomes])),
             mean_turns_correct=float(np.mean(correct_turns)) if correct_turns else 0.0,
             overturn_rate=float(np.mean([o.overturn for o in outcomes])),
             answer_rate=float(np.mean([o.answered for o in outcomes])),
             tool_error_rate=float(sum(o.tool_errors for o in outcomes) / calls) if calls else 0.0)


def turn_scaling_rows(model: str, tier: str, trajectories: Sequence[Trajectory], budgets: Sequence[int],
                      judge: Callable[..., bool]) -> list[Row]:
  """Rows for every budget from trajectories run at max(budgets)."""
  rows = []
  for k in sorted(budgets):
    rows.append(aggregate(model, tier, k, [outcome(truncate_to_budget(t, k), judge) for t in trajectories]))
  return rows
