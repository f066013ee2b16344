"""The skills probe: token kinds of the scripted protocol, and per-kind teacher-forced accuracy."""

import collections
import importlib.util
import json
import os

import numpy as np
import pytest

from mini_o3_jax.data import coldstart, loader, synthetic
from mini_o3_jax.eval import diagnostics
from mini_o3_jax.model import vlm
from mini_o3_jax.pipeline import common, probe, train_stages
from mini_o3_jax import run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_token_kinds_of_a_scripted_turn():
  pieces = ["<|im_start|>", "user", "Read the digit on the", " red", " cross", "<|im_end|>",
            "<think>", "I need the digit on the", " red", " cross", ". There is a", " red", " cross", "</think>",
            '<grounding>{"bbox_2d": [', "0.", "3", "2", ", 0.", "8", "7", ", 0.", "4", "1", ", 1.00",
            '], "source": "observation_',
            "2", '"}</grounding>', "<think>", "This is a", " pink", " cross", " with the digit", " ", "7", ".", " is", " ", "0.",
            "<answer>", "7", "</answer>"]
  mask = [0] * 6 + [1] * (len(pieces) - 6)
  kinds = probe.token_kinds(pieces, mask)
  got = {k: [p for p, kk in zip(pieces, kinds) if kk == k] for k in probe.KINDS}
  assert kinds[:6] == [None] * 6  # the question's words are not the model's
  assert got["goal"] == [" red", " cross"]  # only the two words after the goal phrase
  assert got["box_xy"] == ["3", "8"] and got["box_rest"] == ["2", "7", "4", "1"]
  assert got["read"] == ["7", "0.", "7"]  # the observation index "2" is not a reading
  assert "0." in got["other"]  # a coordinate's leading "0." is wording
  assert "2" in got["other"] and " pink" in got["other"]


def test_token_kinds_of_a_named_cell():
  pieces = ["<think>", "I need the digit on the", " red", " cross", ". There is a", " red", " cross", " in", " cell",
            " ", "5", ".", "</think>", "<think>", "The digit on the", " red", " cross", " is", " ", "5", "."]
  kinds = probe.token_kinds(pieces, [1] * len(pieces))
  assert [p for p, k in zip(pieces, kinds) if k == "cell"] == ["5"] and kinds[10] == "cell"
  assert kinds[19] == "read"  # the same digit read off a crop


def test_token_kinds_of_a_reflex_first_crop():
  """first_crop="cell_reflex": the first turn opens with the cell digit (no thought), the last is the answer."""
  pieces = ["<|im_start|>", "assistant", "\n", "5", " ", '<grounding>{"bbox_2d": [', "0.", "2", "5", "<|im_end|>",
            "<|im_start|>", "assistant", "\n", "<answer>", "7", "</answer>"]
  mask = [0, 0, 0] + [1] * 7 + [0, 0, 0] + [1] * 3
  kinds = probe.token_kinds(pieces, mask)
  assert kinds[3] == "cell" and kinds[14] == "read" and kinds[7] == "box_xy"


def test_token_kinds_of_a_multi_token_goal_phrase():
  pieces = ["<think>", "I need", " the digit", " on the", " blue", " hex", "agon", "."]
  kinds = probe.token_kinds(pieces, [1] * len(pieces))
  assert kinds == ["other"] * 4 + ["goal", "goal", "other", "other"]


@pytest.fixture(scope="module")
def demo_parts(tmp_path_factory):
  spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = common.resolve(demo.get_config())
  tokenizer = common.build_tokenizer(config, str(tmp_path_factory.mktemp("tok")))
  mcfg = run_config.model_config(config, tokenizer)
  tcfg = run_config.task_config(config)
  window = coldstart.ExplorerConfig(first_crop="cell_window")
  trajs = [t for tier in ("medium", "hard") for explorer in (coldstart.ExplorerConfig(), window)
           for t in train_stages.scripted_views(tier, 2, "test", tcfg, explorer)]
  return config, tokenizer, mcfg, trajs


def test_kind_accuracy_matches_a_per_example_forward(demo_parts):
  """Batched, padded teacher forcing agrees with the HF-style forward of each example alone."""
  config, tokenizer, mcfg, trajs = demo_parts
  model = vlm.random_model(mcfg, seed=3, std=0.3)
  example_cfg = loader.ExampleConfig(min_pixels=config.view_pixels, max_pixels=config.view_pixels)
  got = probe.kind_accuracy(model, tokenizer, trajs, example_cfg, mcfg, probe.ProbeConfig(seq_len=768, batch_size=3))
  hits = {k: 0 for k in probe.KINDS}
  seen = {k: collections.Counter() for k in probe.KINDS}
  counts = {k: 0 for k in probe.KINDS}
  for ex in loader.examples_dataset(trajs, tokenizer, example_cfg):
    logits = np.asarray(model(ex["input_ids"][None], ex["pixel_values"], ex["image_grid_thw"]))[0]
    ids = list(ex["input_ids"])
    kinds = probe.token_kinds([tokenizer.decode([i]) for i in ids], ex["loss_mask"])
    for t in range(1, len(ids)):
      if kinds[t] is not None:
        hits[kinds[t]] += int(np.argmax(logits[t - 1]) == ids[t])
        counts[kinds[t]] += 1
        seen[kinds[t]][ids[t]] += 1
  assert counts["goal"] >= 2 * len(trajs) and 0 < counts["box_xy"] < counts["box_rest"] and counts["cell"] >= 4
  for k in probe.KINDS:
    assert got[f"n_{k}"] == counts[k]
    assert got[k] == pytest.approx(hits[k] / counts[k], abs=1e-9), k
    assert got[f"prior_{k}"] == pytest.approx(seen[k].most_common(1)[0][1] / counts[k]), k


def test_search_diagnostics_localises_the_first_crop():
  tcfg = synthetic.SyntheticConfig()
  task = synthetic.make_task("medium", 0, tcfg, "test")
  on_target = coldstart.grounding(coldstart.quantize_box(task.zoom_path[0], 2), 0, 2)
  empty = coldstart.grounding((0.0, 0.0, 0.01, 0.01), 0, 2)
  from_observation = coldstart.grounding(coldstart.quantize_box(task.zoom_path[0], 2), 1, 2)
  records = []
  for text in (on_target, empty, from_observation):
    records.append({"id": task.id, "question": task.question, "final_answer": None,
                    "turns": [{"text": "<think>x</think>\n" + text, "error": None, "action": {"type": "tool_call"}}]})
  d = diagnostics.search_diagnostics(records, tcfg)
  assert d["first_zoom_on_target"] == pytest.approx(1 / 3)
  assert d["first_zoom_on_object"] == pytest.approx(1 / 3)
  # A random crop the size of the empty one almost never holds the target; one the size of the region
  # zoom sometimes does, and a crop that covers the image always does.
  def chance(box):
    cx, cy = (task.target_box[0] + task.target_box[2]) / 2, (task.target_box[1] + task.target_box[3]) / 2
    return np.mean([b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in diagnostics._shifted_boxes(box)])

  want = (chance(coldstart.quantize_box(task.zoom_path[0], 2)) + chance((0.0, 0.0, 0.01, 0.01)) + 0.0) / 3
  assert d["first_zoom_on_target_chance"] == pytest.approx(want)
  assert 0 < d["first_zoom_on_target_chance"] < 1 / 3
  whole = dict(records[1], turns=[{"text": "<think>x</think>\n" + coldstart.grounding((0, 0, 1, 1), 0, 2),
                                    "error": None, "action": {"type": "tool_call"}}])
  full = diagnostics.search_diagnostics([whole], tcfg)
  assert full["first_zoom_on_target"] == full["first_zoom_on_target_chance"] == 1.0
  assert "first_zoom_on_target" not in diagnostics.search_diagnostics(records)
  json.dumps(d)
