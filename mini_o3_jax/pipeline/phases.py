"""Named phases: a training stage run again, with some of its settings changed, as one entry of `config.stages`.

  stages = ("pretrain_vision", "pretrain", "pretrain_vision/kind", "pretrain/same_colour", "export_base")
  phases = {"kind": {"steps": 1500, "from_stage": "pretrain", "targets": {"shape_scale": 0.8}},
            "same_colour": {"from_stage": "pretrain_vision_kind", "curriculum": "0:same_colour=1"}}

The entry `stage/phase` runs `stage` on its config section updated by `config.phases[phase]` (nested sections
merged key by key; a key the section does not have is refused, so a typo cannot pass silently) under the run
name `stage_phase`: its checkpoints (ckpt/<run name>), metrics and outputs are its own, and so are its scenes.
A phase starts where its `from_stage` (a run name) ended. Recipes whose rungs alternate between the tower and
the decoder are one command this way (configs/pretrain_tiny.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import ml_collections

# The stages that can run as phases: each takes the run name its checkpoints and outputs go under.
PHASED = ("pretrain_vision", "pretrain")


@dataclasses.dataclass(frozen=True)
class StageRun:
  """One entry of `config.stages`: a stage, and the phase it runs as ("" = the stage's own section)."""
  stage: str
  phase: str = ""

  @property
  def name(self) -> str:
    """Where its checkpoints and outputs go (ckpt/<name>, metrics/<name>.jsonl, <name>/...)."""
    return f"{self.stage}_{self.phase}" if self.phase else self.stage


def runs_of(entries: Iterable[str]) -> list[StageRun]:
  """`config.stages` as runs (comma-separated entries allowed, as `--config.stages=a,b` gives); see `check`."""
  out = []
  for entry in entries:
    for item in filter(None, (s.strip() for s in str(entry).split(","))):
      # "/", not ":": ml_collections reads `--config.stages=a,b/c` as one string, but `a,b:c` as broken Python.
      stage, _, phase = item.partition("/")
      out.append(StageRun(stage, phase))
  return out


def check(runs: Iterable[StageRun], known: Iterable[str], phases: Mapping[str, Any] | None) -> None:
  """Raises ValueError unless every run names a known stage, phases are of `PHASED` stages and defined in
  `phases` (`config.phases`), and no run name comes twice."""
  known, phases, runs = set(known), phases or {}, list(runs)
  for run in runs:
    item = f"{run.stage}/{run.phase}" if run.phase else run.stage
    if run.stage not in known:
      raise ValueError(f"unknown stage {run.stage!r} in {item!r}; known: {sorted(known)}")
    if run.phase and run.stage not in PHASED:
      raise ValueError(f"{item!r}: only {', '.join(PHASED)} run as phases")
    if run.phase and run.phase not in phases:
      raise ValueError(f"{item!r}: config.phases has no {run.phase!r} (it has {sorted(phases) or 'none'})")
  names = [r.name for r in runs]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"config.stages runs {repeated} more than once: give each repetition a phase of its own")


def configure(config: ml_collections.ConfigDict, run: StageRun) -> ml_collections.ConfigDict:
  """The config `run` trains under: a copy whose stage section has the phase's settings (the stage's own
  config for a run without a phase)."""
  if not run.phase:
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  _merge(out[run.stage], config.phases[run.phase], f"phases.{run.phase}")
  return out


def _merge(section: ml_collections.ConfigDict, changes: Mapping[str, Any], where: str) -> None:
  for key, value in changes.items():
    if key not in section:
      raise ValueError(f"{where}.{key}: the stage's section has no such setting (it has {sorted(section)})")
    if isinstance(section[key], ml_collections.ConfigDict):
      _merge(section[key], value, f"{where}.{key}")
    else:
      section[key] = value


def last_run(runs: Iterable[StageRun], stage: str) -> StageRun:
  """The last run of `stage` among `runs` (the stage's own run if none is listed)."""
  return ([r for r in runs if r.stage == stage] or [StageRun(stage)])[-1]


def scene_split(base_split: str, run_name: str, stage: str) -> str:
  """The scene split a run draws from: a stage's own run keeps `base_split`; each phase draws scenes of its
  own (`synthetic.make_task` seeds from the split's name), so no phase replays another's."""
  return base_split if run_name == stage else f"{base_split}/{run_name}"
