"""Named phases of a training stage (`pipeline.phases`): parsing `config.stages`, the refusals, the merged config."""

import pytest

from configs import pretrain_tiny
from mini_o3_jax.data import grounding, scene_levels
from mini_o3_jax import run_config
from mini_o3_jax.pipeline import STAGES, phases


def test_stages_parse_into_runs_with_their_own_names():
  runs = phases.runs_of(("pretrain_vision,pretrain", "pretrain_vision/kind", " pretrain/window ", "export_base"))
  assert [(r.stage, r.phase, r.name) for r in runs] == [
      ("pretrain_vision", "", "pretrain_vision"), ("pretrain", "", "pretrain"),
      ("pretrain_vision", "kind", "pretrain_vision_kind"), ("pretrain", "window", "pretrain_window"),
      ("export_base", "", "export_base")]
  assert phases.last_run(runs, "pretrain").name == "pretrain_window"
  assert phases.last_run(runs[:1], "pretrain").name == "pretrain"


@pytest.mark.parametrize("stages, message", [
    (("pretrain", "sft/x"), "only pretrain_vision, pretrain run as phases"),
    (("pretrain/nope",), "config.phases has no 'nope'"),
    (("pretrian",), "unknown stage 'pretrian'"),
    (("pretrain/kind", "pretrain/kind"), "runs ['pretrain_kind'] more than once"),
    (("pretrain", "pretrain"), "runs ['pretrain'] more than once"),
])
def test_bad_stage_lists_are_refused(stages, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    phases.check(phases.runs_of(stages), STAGES, {"kind": {}, "x": {}})


def test_a_phase_changes_only_its_settings_and_refuses_unknown_ones():
  config = pretrain_tiny.get_config()
  runs = {r.name: r for r in phases.runs_of(config.stages)}
  phases.check(runs.values(), STAGES, config.phases)
  kind = phases.configure(config, runs["pretrain_vision_kind"]).pretrain_vision
  assert kind.targets.shape_scale == 0.8 and kind.from_stage == "pretrain_vision"
  assert kind.targets.position_scale == config.pretrain_vision.targets.position_scale   # merged, not replaced
  assert kind.curriculum == config.pretrain_vision.curriculum and config.pretrain_vision.targets.shape_scale == 0
  window = phases.configure(config, runs["pretrain_window"]).pretrain
  assert window.questions.cell_window and window.questions.cell_first and window.from_stage == "pretrain_same_colour"
  assert window.vision_from == "pretrain_vision_digits" and window.questions.read == 1 and not config.pretrain.vision_from
  assert phases.configure(config, runs["pretrain"]) is config
  config.phases.kind.targets.shape_scal = 1.0
  with pytest.raises(ValueError, match=r"phases.kind.targets.shape_scal: the stage's section has no such setting"):
    phases.configure(config, runs["pretrain_vision_kind"])


def test_each_phase_draws_scenes_of_its_own():
  assert phases.scene_split(scene_levels.PRETRAIN_SPLIT, "pretrain", "pretrain") == scene_levels.PRETRAIN_SPLIT
  splits = [phases.scene_split(scene_levels.PRETRAIN_SPLIT, n, "pretrain") for n in ("pretrain", "pretrain_a", "pretrain_b")]
  world = run_config.task_config(pretrain_tiny.get_config())
  scenes = [[o.box for o in scene_levels.make_scene("medium", 0, world, s).objects] for s in splits]
  assert scenes[0] != scenes[1] and scenes[1] != scenes[2] and scenes[0] != scenes[2]
