"""Scene levels and the curriculum over them: which synthetic scenes a grounding-pretraining step draws.

A curriculum walks from one shape on a canvas to the demo's hard tier: a level is a scene recipe (a `TierSpec` for
the generator), `Curriculum` says which levels each training step draws from. Scenes come from `synthetic.make_task`
on splits of their own (never the agent's train / test splits), each level in its own index space.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mini_o3_jax.data import synthetic

PRETRAIN_SPLIT = "pretrain"
VISION_SPLIT = "pretrain_vision"   # the tower's own phase: scenes the decoder's phase never sees again
HELDOUT_SPLIT = "pretrain_heldout"

# Scene recipes below the demo's tiers: the first rungs of the curriculum.
LEVELS: dict[str, synthetic.TierSpec] = {
    "single": dataclasses.replace(synthetic.EASY, num_objects=(1, 1)),
    "few": dataclasses.replace(synthetic.EASY, num_objects=(2, 4)),
    "easy": synthetic.EASY,
    "medium": synthetic.MEDIUM,
    "hard": synthetic.HARD,
    # 3-5 shapes; the target and 2-4 look-alikes share its colour, so mostly only the kind tells them apart (a
    # rung for binding the kind).
    "same_colour": dataclasses.replace(synthetic.EASY, num_objects=(3, 5), num_lookalikes=(2, 4),
                                       lookalike_kind="colour"),
}


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Which scene levels a step draws from: `stages` of (first step, {level: weight})."""
  stages: tuple[tuple[int, tuple[tuple[str, float], ...]], ...]

  def mixture(self, step: int) -> tuple[tuple[str, float], ...]:
    current = self.stages[0][1]
    for start, mix in self.stages:
      if step >= start:
        current = mix
    return current

  @classmethod
  def parse(cls, spec: str) -> Curriculum:
    """From "0:single=0.5,few=0.5; 300:easy=1" (a command-line friendly form)."""
    stages = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
      start, _, mix = part.partition(":")
      weights = {}
      for item in filter(None, (m.strip() for m in mix.split(","))):
        level, _, weight = item.partition("=")
        weights[level.strip()] = float(weight or 1.0)
      stages.append((int(start), weights))
    if not stages:
      raise ValueError(f"empty curriculum {spec!r}")
    return cls.from_dict(stages)

  @classmethod
  def from_dict(cls, stages: Sequence[tuple[int, dict[str, float]]]) -> Curriculum:
    out = []
    for start, mix in stages:
      for level in mix:
        if level not in LEVELS:
          raise ValueError(f"unknown curriculum level {level!r}; expected one of {tuple(LEVELS)}")
      out.append((int(start), tuple((k, float(v)) for k, v in mix.items())))
    return cls(tuple(sorted(out)))


def scene_config(task_config: synthetic.SyntheticConfig, level: str) -> tuple[synthetic.SyntheticConfig, str]:
  """(generator config, generator tier) that draw scenes of curriculum `level`."""
  if level in synthetic.TIERS:
    return task_config, level
  return dataclasses.replace(task_config, easy=LEVELS[level]), "easy"


def make_scene(level: str, index: int, task_config: synthetic.SyntheticConfig,
               split: str = PRETRAIN_SPLIT) -> synthetic.SyntheticTask:
  cfg, tier = scene_config(task_config, level)
  # Each level has its own index space: a level's scene i never repeats another level's.
  return synthetic.make_task(tier, index, dataclasses.replace(cfg, seed=cfg.seed * 7919 + level_salt(level)),
                             split)


def level_salt(level: str) -> int:
  return 1 + tuple(LEVELS).index(level)
