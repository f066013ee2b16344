"""Grounding pretraining rows (data/grounding.py) and the pretrain stage end to end at toy size."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
from flax import nnx
import numpy as np
import pytest

from configs import demo
from mini_o3_jax import agent as agent_lib
from mini_o3_jax.agent import prompts, tools
from mini_o3_jax.data import coldstart, grounding, scene_levels, synthetic
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model import vision as vision_lib
from mini_o3_jax.model.vision import VisionInputs
from mini_o3_jax.model import vlm
from mini_o3_jax.model.hf import load_pretrained
from mini_o3_jax.pipeline import base_card, common, grounding_probe, pretrain_stage
from mini_o3_jax import run_config
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return common.build_tokenizer(demo.get_config(), str(tmp_path_factory.mktemp("tok")))


def test_curriculum_parse_and_mixture():
  cur = scene_levels.Curriculum.parse("300:easy=1; 0:single=0.5,few=0.5")
  assert cur.mixture(0) == (("single", 0.5), ("few", 0.5))
  assert cur.mixture(299) == cur.mixture(0)
  assert cur.mixture(300) == (("easy", 1.0),)
  with pytest.raises(ValueError, match="unknown curriculum level"):
    scene_levels.Curriculum.parse("0:nowhere=1")


def test_rows_answer_from_the_scene(tokenizer):
  tcfg = synthetic.SyntheticConfig()
  task = scene_levels.make_scene("medium", 3, tcfg)
  rng = np.random.default_rng(0)
  questions = grounding.scene_questions(task, grounding.GroundingConfig(), rng)
  names = [grounding.object_name(o) for o in task.objects]
  for kind, question, answer, i in questions:
    obj = task.objects[i]
    if kind == "locate":
      assert names.count(names[i]) == 1 and names[i] in question
      box = tools.parse_action(answer).bbox          # the protocol's own parser reads it
      assert grounding_probe.iou(box, obj.box) > 0.8
    elif kind == "name":
      assert answer == names[i]
    else:
      assert answer == f"<answer>{obj.digit}</answer>"
  # No answer can be copied from another question: a located shape is never also named by its box.
  located = {i for kind, _, _, i in questions if kind == "locate"}
  named = {i for kind, _, _, i in questions if kind == "name"}
  assert located and named and not located & named
  ex = grounding.scene_example(task, tokenizer, grounding.GroundingConfig(), tcfg, np.random.default_rng(0))
  n_images = 1 + sum(q[0] == "read" for q in questions)
  assert ex["image_grid_thw"].shape == (n_images, 3)
  assert ex["pixel_values"].shape[0] == int(np.prod(ex["image_grid_thw"], -1).sum())
  # Every answer span is labelled with its kind; nothing outside the loss mask is.
  assert np.all((ex["kinds"] >= 0) == (ex["loss_mask"] == 1))


def test_agent_form_rows_are_the_explorers_turns(tokenizer):
  """answer_form="agent": a locate answer is the scripted explorer's window-first turn for that shape (its cell
  named in the thought, the call on the cell's window) and a read answer its final turn; the probe's roles find
  the named cell and the read digit in them."""
  tcfg = synthetic.SyntheticConfig()
  gcfg = grounding.GroundingConfig(locate=2, name=0, read=1, cell_first=True, cell_window=True, answer_form="agent")
  task = scene_levels.make_scene("medium", 5, tcfg)
  questions = grounding.scene_questions(task, gcfg, np.random.default_rng(0))
  for kind, question, answer, i in questions:
    obj, name = task.objects[i], grounding.object_name(task.objects[i])
    assert name in question
    action = tools.parse_action(answer)
    if kind == "locate":
      cell = coldstart.grid_cell(obj.box)
      assert f"{coldstart.GOAL_PREFIX} {name}." in answer and f"{name} {coldstart.CELL_PHRASE} {cell}." in answer
      assert action.source_index == 0 and action.bbox == pytest.approx(coldstart.cell_window(cell))
    else:
      assert answer.startswith(f"<think>{coldstart.ANSWER_PREFIX} {name} is {obj.digit}.</think>")
      assert action == tools.FinalAnswer(obj.digit)
  row = grounding.scene_example(task, tokenizer, gcfg, tcfg, np.random.default_rng(0))
  ids = [int(t) for t in row["input_ids"]]
  roles = grounding_probe.token_roles([tokenizer.decode([t]) for t in ids], row["kinds"])
  cells = [tokenizer.decode([ids[t]]).strip() for t, r in enumerate(roles) if r == "cell"]
  reads = [tokenizer.decode([ids[t]]).strip() for t, r in enumerate(roles) if r == "read"]
  assert cells == [str(coldstart.grid_cell(task.objects[i].box)) for k, _, _, i in questions if k == "locate"]
  assert reads == [task.objects[i].digit for k, _, _, i in questions if k == "read"]
  with pytest.raises(ValueError, match="cell_window"):
    grounding.GroundingConfig(cell_first=True, answer_form="agent")


def test_agent_prompt_rows_ask_as_the_agent_is_asked(tokenizer):
  """prompt_form="agent": the locate question is a search's first user turn (the instructions, a task question
  naming the shape), the read crop comes back as that call's observation; the probe's read prompt is such a
  row up to its read answer."""
  tcfg = synthetic.SyntheticConfig()
  gcfg = grounding.GroundingConfig(locate=1, name=0, read=1, cell_first=True, cell_window=True, prompt_form="agent")
  task = scene_levels.make_scene("medium", 7, tcfg)
  (k0, q0, a0, i0), (k1, q1, a1, i1) = grounding.scene_questions(task, gcfg, np.random.default_rng(0))
  target = task.objects[i0]
  assert (k0, k1) == ("locate", "read") and i0 == i1 and target.is_target
  assert q0.startswith(prompts.INSTRUCTIONS) and f"{target.colour} {target.shape}" in q0
  assert q1 == prompts.observation_turn(0, 1) and a1 == f"<answer>{target.digit}</answer>"
  assert a0 == grounding.locate_answer(target.box, 2, cell_first=True, window=True)
  messages = grounding.scene_messages(grounding.scene_questions(task, gcfg, np.random.default_rng(0)))
  assert [c["type"] for c in messages[2]["content"]] == ["text", "image", "text"]  # the observation turn
  mcfg = run_config.model_config(common.resolve(demo.get_config()), tokenizer)
  probe = grounding_probe.GroundingProbe(grounding_probe.ProbeConfig(levels=("few",), scenes=1), gcfg, tcfg,
                                         tokenizer, mcfg)
  row = grounding.scene_example(task, tokenizer, gcfg, tcfg, np.random.default_rng(0), image=probe.image)
  ids, pixels, grids = probe._agent_prompt(task, "read", np.random.default_rng(0))
  read_start = int(np.flatnonzero(row["kinds"] == grounding.KINDS.index("read"))[0])
  np.testing.assert_array_equal(ids, row["input_ids"][:read_start])
  np.testing.assert_array_equal(pixels, row["pixel_values"])
  with pytest.raises(ValueError, match="name=0"):
    grounding.GroundingConfig(name=1, prompt_form="agent")


@pytest.mark.parametrize("zooms", [1, 2])
def test_zoom_rows_are_the_bases_direct_search(tokenizer, zooms):
  """zoom=1: a row is the base's direct search on the located shape (`coldstart.reflex_search`): the window's
  call; the window returned as observation 1 and the call on the legible zoom inside it; that zoom returned as
  observation 2 and its digit. zoom=2: the call on the shape's own zoom inside the window between them (its
  observation the next image). The views are the crop tool's own observations, the tower's digit target sits on
  the last image, and the probe's zoom prompts are such a row up to each zoom's answer."""
  tcfg = synthetic.SyntheticConfig()
  gcfg = grounding.GroundingConfig(locate=1, name=0, read=1, zoom=zooms, cell_first=True, cell_window=True,
                                   prompt_form="agent", target_first=True)
  mcfg = run_config.model_config(common.resolve(demo.get_config()), tokenizer)
  probe = grounding_probe.GroundingProbe(grounding_probe.ProbeConfig(levels=("few",), scenes=1), gcfg, tcfg,
                                         tokenizer, mcfg)
  for n, level in enumerate(("medium", "hard")):
    task = scene_levels.make_scene(level, n, tcfg)
    questions = grounding.scene_questions(task, gcfg, np.random.default_rng(0))
    obj = task.objects[questions[0][3]]
    assert [q[0] for q in questions] == ["locate", *["zoom"] * zooms, "read"] and obj.is_target
    assert {q[3] for q in questions} == {questions[0][3]}
    search = coldstart.reflex_search(task, obj, 2, via_object=zooms == 2)
    assert [q[2] for q in questions] == [*search.calls, f"<answer>{obj.digit}</answer>"]
    assert [q[1] for q in questions[1:]] == [prompts.observation_turn(k, k + 1) for k in range(zooms + 1)]
    images = [task.image]  # the calls, run by the agent's tool, return the observations
    for call, observation in zip(search.calls, search.observations):
      _, image = agent_lib.execute_turn(call, images)
      assert np.array_equal(np.asarray(image), np.asarray(observation))
      images.append(image)
    for k, call in enumerate(search.calls[1:], 1):
      zoom_call = tools.parse_action(call)
      assert zoom_call.source == f"observation_{k}" and call.startswith(f"{coldstart.grid_cell(zoom_call.bbox)} ")
    assert coldstart.contains(search.regions[-1], obj.detail_box)  # the last zoom holds the digit
    if zooms == 2:  # the shape's zoom: the whole shape, twice its side (to the grid the box is written on)
      region = search.regions[1]
      assert coldstart.contains(region, obj.box) and coldstart.contains(region, search.regions[2])
      assert region[2] - region[0] == pytest.approx(2 * (obj.box[2] - obj.box[0]), abs=0.01)
    views = grounding.scene_views(task, questions, tcfg)
    assert len(views) == len(search.observations) + 1
    for view, observation in zip(views[1:], search.observations):
      np.testing.assert_array_equal(np.asarray(view), np.asarray(synthetic.render_view(observation, None, tcfg)))
    row = grounding.scene_example(task, tokenizer, gcfg, tcfg, np.random.default_rng(0), image=probe.image)
    assert row["read_images"].tolist() == [1 + zooms] and len(row["image_grid_thw"]) == 2 + zooms
    roles = grounding_probe.token_roles([tokenizer.decode([i]) for i in row["input_ids"]], row["kinds"])
    zoom_tokens = np.flatnonzero(row["kinds"] == grounding.KINDS.index("zoom"))
    starts = zoom_tokens[np.diff(np.concatenate([[-2], zoom_tokens])) > 1]  # each zoom answer's first token
    assert len(starts) == zooms and [roles[t] for t in starts] == ["zoom_cell"] * zooms
    assert roles.count("zoom_cell") == zooms and roles.count("zoom_box") >= 4 * zooms
    for nth, start in enumerate(starts):
      ids, pixels, _ = probe._agent_prompt(task, "zoom", np.random.default_rng(0), nth)
      np.testing.assert_array_equal(ids, row["input_ids"][:start])
      np.testing.assert_array_equal(pixels, row["pixel_values"][:len(pixels)])
    # last_zoom_only: the same row, only its last call (the legible zoom's) in the loss
    last = grounding.scene_example(task, tokenizer, gcfg, tcfg, np.random.default_rng(0), image=probe.image,
                                   last_zoom_only=True)
    np.testing.assert_array_equal(last["input_ids"], row["input_ids"])
    trained = np.flatnonzero(last["loss_mask"])
    assert trained[0] == starts[-1] and set(trained) <= set(np.flatnonzero(row["loss_mask"]))
    assert tokenizer.decode(row["input_ids"][trained]).strip() == search.calls[-1] + "<|im_end|>"  # and its end
  with pytest.raises(ValueError, match="zoom"):
    grounding.GroundingConfig(locate=1, name=0, zoom=1, cell_first=True, cell_window=True)
  with pytest.raises(ValueError, match="last_zoom_only_steps needs zoom"):
    grounding.GroundingConfig(last_zoom_only_steps=10)


def test_zoom_score_takes_the_scripted_zoom_and_refuses_what_cannot_be_read():
  """The probe's zoom_hit: the scripted zoom (its cell or not) holds the digit at a legible size; the whole window,
  a zoom moved off the digit, and the right box on the wrong image do not; the cell is the answer's first digit."""
  tcfg = synthetic.SyntheticConfig()
  for n, level in enumerate(("medium", "hard")):
    task = scene_levels.make_scene(level, n, tcfg, scene_levels.HELDOUT_SPLIT)
    target = next(o for o in task.objects if o.is_target)
    gold = coldstart.reflex_search(task, target, 2).calls[1]
    cell, call = gold.split(" ", 1)
    box = tools.parse_action(gold).bbox
    other = str(1 + int(cell) % 9)
    moved = tuple(min(1.0, max(0.0, v + (0.3 if box[0] < 0.5 else -0.3))) for v in box)
    assert grounding_probe.score_zoom(gold, task, 2) == (True, True)
    assert grounding_probe.score_zoom(call, task, 2) == (True, False)
    assert grounding_probe.score_zoom(f"{other} " + coldstart.grounding((0.0, 0.0, 1.0, 1.0), 1, 2), task, 2) == \
        (False, False)
    assert grounding_probe.score_zoom(f"{cell} " + coldstart.grounding(moved, 1, 2), task, 2) == (False, True)
    assert grounding_probe.score_zoom(f"{cell} " + coldstart.grounding(box, 0, 2), task, 2) == (False, True)
    assert grounding_probe.score_zoom("<answer>3</answer>", task, 2) == (False, False)


def test_zoom_scores_through_the_object_take_each_scripted_call():
  """zoom=2: the object's zoom (after the gold window) hits where the scripted one does and not on the whole window
  (too large) or on a box off the shape; the legible zoom is scored in the object's observation (observation_2),
  the scripted call hitting, the whole object's view and the window's own source not."""
  tcfg = synthetic.SyntheticConfig()
  for n, level in enumerate(("medium", "hard")):
    task = scene_levels.make_scene(level, n, tcfg, scene_levels.HELDOUT_SPLIT)
    target = next(o for o in task.objects if o.is_target)
    search = coldstart.reflex_search(task, target, 2, via_object=True)
    for nth, gold in enumerate(search.calls[1:]):
      cell = gold.split(" ", 1)[0]
      box = tools.parse_action(gold).bbox
      moved = tuple(min(1.0, max(0.0, v + (0.45 if box[0] < 0.5 else -0.45))) for v in box)
      assert grounding_probe.score_zoom(gold, task, 2, nth, via_object=True) == (True, True)
      assert grounding_probe.score_zoom(f"{cell} " + coldstart.grounding((0.0, 0.0, 1.0, 1.0), nth + 1, 2), task, 2,
                                        nth, via_object=True) == (False, True)
      assert grounding_probe.score_zoom(f"{cell} " + coldstart.grounding(moved, nth + 1, 2), task, 2, nth,
                                        via_object=True)[0] is False
      assert grounding_probe.score_zoom(f"{cell} " + coldstart.grounding(box, nth, 2), task, 2, nth,
                                        via_object=True) == (False, True)


def test_jittered_read_crops_hold_the_digit_and_stray():
  """read_jitter: each crop holds the digit's glyph 2 px inside its edges, is a square within the jitter of the
  legible crop's side, is the same on every call, and the digit is not always at its centre."""
  tcfg = synthetic.SyntheticConfig()
  offsets, sides = [], []
  for n in range(40):
    task = scene_levels.make_scene(("few", "medium", "hard")[n % 3], n, tcfg)
    w, h = task.image.size
    for i, obj in enumerate(task.objects[:3]):
      crop = grounding.read_crop(task, i, 0.12)
      assert crop == grounding.read_crop(task, i, 0.12) and grounding.read_crop(task, i) == obj.zoom_path[-1]
      x0, y0, x1, y1 = synthetic.pixel_box(crop, (w, h))
      gx0, gy0, gx1, gy1 = synthetic.pixel_box(obj.detail_box, (w, h))
      assert x0 + 2 <= gx0 and gx1 + 2 <= x1 and y0 + 2 <= gy0 and gy1 + 2 <= y1 and x1 - x0 == y1 - y0
      legible = synthetic.pixel_box(obj.zoom_path[-1], (w, h))
      sides.append((x1 - x0) / (legible[2] - legible[0]))
      offsets.append(((gx0 + gx1) / 2 - (x0 + x1) / 2) / (x1 - x0))
  assert 0.87 <= min(sides) and max(sides) <= 1.13 and np.std(sides) > 0.03
  assert np.std(offsets) > 0.1  # the digit anywhere in the crop, not at its centre


def test_probe_asks_as_training_rows_ask(tokenizer):
  """The greedy probe's questions are a training row's first turn: the locate question after the scene, the
  read question after the scene and then the crop (a crop alone in the first turn is a prompt the base never
  saw: it answers `<answer>` and a digit, then a box)."""
  tcfg = synthetic.SyntheticConfig()
  mcfg = run_config.model_config(common.resolve(demo.get_config()), tokenizer)
  probe = grounding_probe.GroundingProbe(grounding_probe.ProbeConfig(levels=("few",), scenes=1),
                                         grounding.GroundingConfig(locate=0, name=0, read=1), tcfg, tokenizer, mcfg)
  task = probe.tasks["few"][0]
  for kind, gcfg in (("read", grounding.GroundingConfig(locate=0, name=0, read=1)),
                     ("locate", grounding.GroundingConfig(locate=1, name=0, read=0, target_first=True))):
    row = grounding.scene_example(task, tokenizer, gcfg, tcfg, np.random.default_rng(0), image=probe.image)
    _, question, _, i = grounding.scene_questions(task, gcfg, np.random.default_rng(0))[0]
    views = [synthetic.render_view(task.image, None, tcfg)]
    views += [synthetic.render_view(task.image, task.objects[i].zoom_path[-1], tcfg)] if kind == "read" else []
    ids, pixels, grids = probe._prompt(views, question, kind)
    answer_start = int(np.argmax(row["loss_mask"]))
    np.testing.assert_array_equal(ids, row["input_ids"][:answer_start])
    np.testing.assert_array_equal(pixels, row["pixel_values"])
    np.testing.assert_array_equal(grids, row["image_grid_thw"])
    assert len(grids) == (2 if kind == "read" else 1)


def test_pretrain_saliency_finds_the_shape(tokenizer):
  """The objectness target of a `single` scene's batch: 1 on a token that overlaps the shape, in [0, 1] on
  every real token, -1 on padding tokens and rows."""
  tcfg = synthetic.SyntheticConfig()
  gcfg = grounding.GroundingConfig(locate=1, name=0, read=0)
  tasks = [scene_levels.make_scene("single", i, tcfg) for i in range(8)]
  rows = [grounding.scene_example(t, tokenizer, gcfg, tcfg, np.random.default_rng(i)) for i, t in enumerate(tasks)]
  mcfg = run_config.model_config(demo.get_config(), tokenizer)
  patches = int(np.prod(rows[0]["image_grid_thw"], -1).sum())
  bcfg = batch_lib.BatchConfig(batch_size=9, length_buckets=(128,), patch_buckets=(patches + 4,),
                               pad_token_id=mcfg.text.pad_token_id)
  batch = pretrain_stage.with_saliency(batch_lib.collate_sft(rows, mcfg, bcfg), rows, mcfg, power=4.0)
  sal = batch.image_saliency                                          # [9, tokens + 1]
  tokens = patches // 4
  assert sal.shape == (9, tokens + 1)
  assert np.all(sal[:8, tokens:] == -1) and np.all(sal[8] == -1)
  assert np.all((sal[:8, :tokens] >= 0) & (sal[:8, :tokens] <= 1))
  _, gh, gw = rows[0]["image_grid_thw"][0]
  th, tw = gh // 2, gw // 2                                           # merged-token grid, row-major
  hits = 0
  for r, task in enumerate(tasks):
    j = int(np.argmax(sal[r, :tokens]))
    assert abs(sal[r, j] - 1) < 1e-4
    y, x = j // tw, j % tw
    x0, y0, x1, y1 = task.objects[0].box
    hits += x0 < (x + 1) / tw and x1 > x / tw and y0 < (y + 1) / th and y1 > y / th
  assert hits >= 7, hits


def test_stream_is_fresh_and_reproducible(tokenizer):
  cur = scene_levels.Curriculum.parse("0:few=1")
  stream = grounding.SceneStream(cur, grounding.GroundingConfig(), synthetic.SyntheticConfig(), tokenizer, rows=2,
                                 seed=0)
  a, b = stream.rows_for(5), stream.rows_for(5)
  assert [r["id"] for r in a] == [r["id"] for r in b]
  assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
  later = {r["id"] for r in stream.rows_for(6)}
  assert not later & {r["id"] for r in a}
  # Pretraining scenes never come from the agent's splits.
  assert all(f"-{scene_levels.PRETRAIN_SPLIT}-" in r["id"] for r in a)


def test_experimental_tower_options_are_not_exported_as_qwen25vl():
  for option in (dict(position_table=8), dict(output_centre=True), dict(output_rms=0.05),
                 dict(output_position_code=0.5)):
    cfg = config_lib.VLMConfig(vision=config_lib.VisionConfig(**option))
    with pytest.raises(ValueError, match=next(iter(option))):
      cfg.to_hf_dict()


def test_tower_output_centred_rescaled_and_coded_per_image():
  """output_centre / output_rms / output_position_code act within each image of a call: its tokens' mean
  is the position code's mean, its RMS before the code is output_rms, and another image never changes it."""
  base = config_lib.tiny(300, image_token_id=290, vision_start_token_id=291, vision_end_token_id=292,
                         video_token_id=293)
  vision = dataclasses.replace(base.vision, output_centre=True, output_rms=0.05, output_position_code=0.5)
  model = vlm.random_model(base.replace(vision=vision), seed=1)
  plain = vlm.random_model(base.replace(vision=dataclasses.replace(vision, output_position_code=0.0)), seed=1)
  rng = np.random.default_rng(0)
  grids = np.array([[1, 4, 6], [1, 6, 4]])
  pv = rng.normal(size=(48, base.vision.patch_dim)).astype(np.float32)
  inputs = VisionInputs.build(grids, vision)
  tokens = np.asarray(plain.encode_images(pv, inputs))                                  # [12, hidden]
  for img in (tokens[:6], tokens[6:]):
    np.testing.assert_allclose(img.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.mean(img**2)), 0.05, rtol=1e-4)
  coded = np.asarray(model.encode_images(pv, inputs))
  cells = np.array([(r, c) for r in range(2) for c in range(3)] + [(r, c) for r in range(3) for c in range(2)])
  code = 0.5 * np.asarray(vision_lib.position_code(cells[:, 0], cells[:, 1], tokens.shape[1])) / np.sqrt(tokens.shape[1])
  np.testing.assert_allclose(coded, tokens + code, atol=1e-6)
  other = pv.copy()
  other[24:] = rng.normal(size=(24, base.vision.patch_dim))
  np.testing.assert_allclose(np.asarray(model.encode_images(other, inputs))[:6], coded[:6], atol=1e-6)


def test_pretrain_stages_run_the_recipe_and_export(tmp_path):
  """The base's recipe through the command line at toy size: the tower alone (the decoder untouched),
  then the decoder on the frozen tower (the tower untouched), then two phases (`pipeline.phases`): the
  tower re-tuned with the kind (the decoder untouched), then the bound decoder joined to that tower
  (`vision_from`) on windows and read questions; the HF export is the last phase's model, and its own
  check is redone from its files. The tower gets its absolute position from Qwen3-VL's table, started as
  the sin-cos patch code. (A Qwen2.5-VL base runs the same stages: the family changes the model only, whose
  export is test_hf's and test_qwen3vl's.)"""
  env = dict(os.environ, MINI_O3_COMPILE_CACHE="0")
  family = "qwen3_vl"
  stages = "pretrain_vision,pretrain,pretrain_vision/kind,pretrain/window,export_base"
  cmd = [sys.executable, "-m", "mini_o3_jax.main", "--config", "configs/pretrain_tiny.py", "--workdir", str(tmp_path),
         f"--config.stages={stages}", "--config.model.vision_position_sincos=0",
         "--config.model.vision_depth=2", "--config.model.vision_hidden_size=64",
         "--config.model.vision_intermediate_size=128",
         "--config.pretrain_vision.steps=3", "--config.pretrain_vision.batch_size=8",
         "--config.pretrain_vision.checkpoint_every=1",
         "--config.pretrain.steps=2", "--config.pretrain.batch_size=8", "--config.pretrain.eval_every=2",
         "--config.pretrain.probe_scenes=2", "--config.pretrain.probe_levels=('easy',)",
         "--config.pretrain.checkpoint_every=1", f"--config.model.family={family}",
         "--config.phases.kind.steps=2", "--config.phases.window.steps=2", "--config.phases.window.probe_scenes=2",
         "--config.phases.window.from_stage=pretrain", "--config.phases.window.vision_from=pretrain_vision_kind",
         "--config.phases.window.probe_levels=('medium',)",
         "--config.base_export.check_scenes=2", "--config.xla_flags=--xla_backend_optimization_level=0"]
  subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True)
  skills = json.load(open(tmp_path / "pretrain" / "skills.json"))
  assert {"easy/tf_cell", "easy/prior_cell", "easy/tf_where", "easy/on_target", "easy/cell"} <= set(skills)
  config = common.resolve(demo.get_config())
  config.model.update(family=family, vision_depth=2, vision_hidden_size=64, vision_intermediate_size=128)
  tok = common.build_tokenizer(config, str(tmp_path / "tok"))
  mcfg = run_config.model_config(config, tok)
  params = lambda stage, step: ckpt_lib.restore_params(str(tmp_path / "ckpt" / stage / str(step)), mcfg)[0]
  tower = lambda p: jax.tree.leaves(p["visual"])
  decoder = lambda p: jax.tree.leaves({k: v for k, v in p.items() if k != "visual"})
  same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
  vision_2, vision_3, pretrain_2 = params("pretrain_vision", 2), params("pretrain_vision", 3), params("pretrain", 2)
  assert not same(tower(vision_2), tower(vision_3)) and same(decoder(vision_2), decoder(vision_3))
  assert same(tower(vision_3), tower(pretrain_2)) and not same(decoder(vision_3), decoder(pretrain_2))
  base = tmp_path / "base"
  assert (base / "config.json").exists() and (base / "training_summary.json").exists()
  summary = json.load(open(base / "training_summary.json"))
  model, cfg = load_pretrained(str(base))
  assert cfg.vision.depth == 2 and cfg.model_type == family
  exported = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  code = vision_lib.sincos_position_table(mcfg.vision.grid_per_side, mcfg.vision.hidden_size)
  np.testing.assert_allclose(np.asarray(vision_2["visual"]["pos_embed"]), np.asarray(code), atol=1e-3)  # 2 warm-up steps
  kind_2, window_2 = params("pretrain_vision_kind", 2), params("pretrain_window", 2)
  assert not same(tower(vision_3), tower(kind_2)) and same(decoder(vision_3), decoder(kind_2))
  assert same(tower(kind_2), tower(window_2)) and not same(decoder(pretrain_2), decoder(window_2))
  # the window phase started from the bound decoder and the kind tower
  joined = pretrain_stage._start_params(config, str(tmp_path), "pretrain_window", True, "pretrain", mcfg, None,
                                        vision_from="pretrain_vision_kind")
  assert same(decoder(joined), decoder(pretrain_2)) and same(tower(joined), tower(kind_2))
  assert same(jax.tree.leaves(exported), jax.tree.leaves(window_2))
  assert summary["exported_run"] == "pretrain_window" and summary["label_shade"] == config.label_shade == 0.0
  runs = {r["run"]: r for r in summary["runs"]}
  assert list(runs) == ["pretrain_vision", "pretrain", "pretrain_vision_kind", "pretrain_window"]
  assert runs["pretrain_vision_kind"]["targets"]["shape_scale"] == 0.8 and runs["pretrain_vision"]["targets"]["shape_scale"] == 0
  assert runs["pretrain_window"]["questions"]["cell_window"] and not runs["pretrain"]["questions"]["cell_window"]
  assert runs["pretrain_window"]["vision_from"] == "pretrain_vision_kind" and runs["pretrain_window"]["questions"]["read"]
  assert (tmp_path / "pretrain_window" / "skills.json").exists() and (base / "skills.json").read_text() == (
      tmp_path / "pretrain_window" / "skills.json").read_text()
  # the export's own check: the window phase's probe on the directory read back, redone from its record
  check = json.load(open(base / "skills_check.json"))
  assert check["questions"]["cell_window"] and check["levels"] == ["medium"] and check["scenes"] == 2
  again = grounding_probe.redo_check(str(base), check, run_config.task_config(config))
  assert again == check["skills"] and {"medium/tf_cell", "medium/tf_read", "medium/on_target", "medium/read"} <= set(again)
  # the model card: the recorded files as tables, the reproducing command with this seed
  card = (base / "README.md").read_text()
  assert card == base_card.model_card(summary, json.load(open(base / "skills.json")), check, probe_scenes=2)
  assert "| pretrain_window | pretrain | pretrain_vision_kind | 2 | 8 | 0.0005 |" in card and "--config.seed=0" in card
