"""The shipped base (assets/tiny_base): its files load as the Qwen3-VL configs/pretrain_tiny.py trains, its
summary lists that recipe's runs, and a probe read from its files alone redoes its recorded skills."""

import json
import os

from flax import nnx
import pytest

from configs import pretrain_tiny
from mini_o3_jax import run_config
from mini_o3_jax.model.hf import load_pretrained
from mini_o3_jax.pipeline import base_card, common, grounding_probe, phases
from mini_o3_jax.processing.tokenizer import load_tokenizer
from mini_o3_jax.train.state import count_params

BASE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny_base")


@pytest.fixture(scope="module")
def recipe():
  return common.resolve(pretrain_tiny.get_config())


def _read(name: str) -> dict:
  with open(os.path.join(BASE, name)) as f:
    return json.load(f)


def test_base_loads_as_the_recipe_sizes_it(recipe):
  model, cfg = load_pretrained(BASE)
  assert cfg.model_type == recipe.model.family == "qwen3_vl"
  assert (cfg.vision.depth, cfg.vision.hidden_size) == (recipe.model.vision_depth, recipe.model.vision_hidden_size)
  assert (cfg.text.hidden_size, cfg.text.num_hidden_layers) == (recipe.model.hidden_size, recipe.model.num_layers)
  assert len(load_tokenizer(BASE)) <= cfg.text.vocab_size
  assert _read("training_summary.json")["parameters"] == count_params(nnx.state(model, nnx.Param))


def test_summary_lists_the_recipe_runs(recipe):
  summary = _read("training_summary.json")
  runs = [r for r in phases.runs_of(recipe.stages) if r.stage in phases.PHASED]
  assert [r["run"] for r in summary["runs"]] == [r.name for r in runs]
  for recorded, run in zip(summary["runs"], runs):
    section = phases.configure(recipe, run)[run.stage]
    assert (recorded["steps"], recorded["batch_size"], recorded["lr"]) == (section.steps, section.batch_size, section.lr)
    assert recorded["from_stage"] == section.from_stage and recorded["vision_from"] == section.get("vision_from")
  assert summary["seed"] == recipe.seed and summary["exported_run"] == runs[-1].name
  last = phases.configure(recipe, runs[-1]).pretrain
  card = base_card.model_card(summary, _read("skills.json"), _read("skills_check.json"), last.probe_scenes)
  with open(os.path.join(BASE, "README.md")) as f:
    assert f.read() == card


@pytest.mark.slow
def test_probe_from_the_files_redoes_the_recorded_skills(recipe):
  """The export's own check, redone here: every rate within one scene of the record (another machine's float
  rounding may flip a near-tie of the greedy answer)."""
  check = _read("skills_check.json")
  again = grounding_probe.redo_check(BASE, check, run_config.task_config(recipe))
  assert set(again) == set(check["skills"])
  for key, value in check["skills"].items():
    assert abs(again[key] - value) <= 1 / check["scenes"] + 1e-9, key


def test_card_names_a_shaded_world_and_the_search_through_the_shape():
  """A base trained on shaded labels says so (a run started from it must set the same world); an unshaded one, as
  the shipped base is, keeps the card as it was. A base whose last run asks both zooms names that search."""
  summary, check = _read("training_summary.json"), _read("skills_check.json")
  plain = base_card.model_card(summary, _read("skills.json"), check, None)
  assert "label_shade" not in plain and summary.get("label_shade", 0.0) == check.get("label_shade", 0.0) == 0.0
  shaded = base_card.model_card({**summary, "label_shade": 0.5}, _read("skills.json"), check, None)
  assert "labels are drawn 50 % darker than their shapes (`label_shade=0.5`)" in shaded
  assert shaded.replace(base_card._world({"label_shade": 0.5}), "") == plain
  both = {**check, "questions": {**check["questions"], "zoom": 2}}
  assert "object_reflex" not in plain
  assert '`data.first_crop="object_reflex"`' in base_card.model_card(summary, _read("skills.json"), both, None)
