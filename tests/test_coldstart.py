"""Scripted cold-start trajectories: valid protocol text, correct answers, legible final zooms."""

import re

import numpy as np
import pytest

from mini_o3_jax import agent
from mini_o3_jax.agent import trajectory as trajectory_lib
from mini_o3_jax.data import coldstart, drawing, synthetic


# "zoom_reflex" writes cell_reflex's searches with one turn reworded (test_zoom_reflex_writes_the_bases_direct_search
# checks it turn by turn, actions equal), so the protocol checks below need not run on it again.
@pytest.fixture(scope="module", params=[c for c in coldstart.FIRST_CROPS if c != "zoom_reflex"])
def trajectories(request):
  explorer = coldstart.ExplorerConfig(first_crop=request.param)
  return {tier: list(coldstart.scripted_coldstart(tier, 24, split="train", config=explorer)) for tier in synthetic.TIERS}


def test_trajectories_follow_the_protocol(trajectories):
  for tier, trajs in trajectories.items():
    for t in trajs:
      t.validate()
      assert t.stop_reason == "answer" and not t.overturn
      assert agent.judge_exact(t.final_answer, t.gold)
      actions = t.actions
      assert all(isinstance(a, agent.ToolCall) for a in actions[:-1])
      assert isinstance(actions[-1], agent.FinalAnswer)
      # Text re-parses to the same actions; sources name images that exist at that point.
      for k, a in enumerate(actions[:-1]):
        assert a.source_index <= k


def test_final_observation_makes_the_answer_legible(trajectories):
  cfg = synthetic.SyntheticConfig()
  for tier, trajs in trajectories.items():
    read = 0
    for t in trajs:
      task = synthetic.make_task(tier, synthetic.parse_task_id(t.id)[2], cfg, "train")
      region = t.metadata["regions"][-1]
      view = synthetic.render_view(t.images[-1], None, cfg)
      glyph = synthetic.project_box(task.detail_box, region, task.image.size, cfg)
      read += drawing.oracle_read(view, glyph) == task.answer
    assert read / len(trajs) >= 0.9, (tier, read)


def test_pattern_mix_and_lengths(trajectories):
  hard = coldstart.summarize(trajectories["hard"])
  assert set(hard["patterns"]) == set(coldstart.PATTERNS)
  turns = [t.num_turns for trajs in trajectories.values() for t in trajs]
  # the shortest: zoom, answer (window, zoom, answer with the window first; window, the shape, its label, answer
  # through the object); a 3-turn detour per look-alike (4 through the object)
  first_crop = trajectories_first_crop(trajectories)
  shortest = {"region": 2, "window": 3, "object": 4}[first_crop]
  assert min(turns) == shortest and max(turns) <= (13 if first_crop == "object" else 10)  # 3 look-alikes at most
  wrong = [t for t in trajectories["hard"] if t.metadata["pattern"] == "trial_and_error"]
  assert wrong
  for t in wrong:  # each wrong zoom is followed by a thought that says so and goes back
    assert sum("not the" in turn.text for turn in t.turns) == len(t.metadata["wrong_zooms"])


def trajectories_first_crop(trajectories) -> str:
  """"region", or a window-first explorer's ("cell_window" names the cell, the reflex ones open with it), or
  "object" (object_reflex: its easy searches are three short calls, the window's, the shape's and the label's)."""
  turns = trajectories["easy"][0].turns
  if sum(re.match(r"\d <grounding>", t.text) is not None for t in turns) == 3:
    return "object"
  return "region" if turns[0].text.startswith("<think>") and "in cell" not in turns[0].text else "window"


def test_window_first_crop_names_the_cell_and_crops_its_window():
  """The base's first crop (`first_crop="cell_window"`): each shape visited is named with the grid cell of
  its box in the thought, cropped to that cell's window, then zoomed to where its digit is legible."""
  explorer = coldstart.ExplorerConfig(first_crop="cell_window")
  visits = 0
  for tier in ("medium", "hard"):
    for t in coldstart.scripted_coldstart(tier, 24, split="train", config=explorer):
      task = synthetic.make_task(tier, synthetic.parse_task_id(t.id)[2], synthetic.SyntheticConfig(), "train")
      calls = t.actions[:-1]
      assert len(calls) % 2 == 0  # window, then zoom, for each shape visited
      for k in range(0, len(calls), 2):
        thought = t.turns[k].text
        name, cell = re.search(r"There is a (\w+ \w+) in cell (\d)\.", thought).groups()
        # a look-alike may share its name with another shape: one of that name is in the named cell
        named = [o for o in task.objects if f"{o.colour} {o.shape}" == name and coldstart.grid_cell(o.box) == int(cell)]
        assert named
        assert calls[k].source_index == 0
        assert calls[k].bbox == pytest.approx(list(coldstart.cell_window(int(cell))), abs=0.005)
        region = tuple(t.metadata["regions"][k])
        assert any(coldstart.contains(region, o.zoom_path[-1]) for o in named) or calls[k + 1].source_index == 0
        visits += 1
      assert name == f"{task.objects[[o.is_target for o in task.objects].index(True)].colour} " \
                     f"{task.objects[[o.is_target for o in task.objects].index(True)].shape}"
  assert visits > 48  # look-alikes visited too (trial and error)


def test_reflex_first_crop_and_answer_are_the_bases_short_answers():
  """`first_crop="cell_reflex"`: the same searches as "cell_window", but the first turn is the base's short
  locate answer (the cell digit, then the window's call) and the last its read answer (`<answer>d</answer>`);
  the turns between keep their thoughts, word for word."""
  for tier in ("medium", "hard"):
    window = coldstart.scripted_coldstart(tier, 16, config=coldstart.ExplorerConfig(first_crop="cell_window"))
    reflex = coldstart.scripted_coldstart(tier, 16, config=coldstart.ExplorerConfig(first_crop="cell_reflex"))
    for w, r in zip(window, reflex):
      cell = re.search(r"in cell (\d)\.", w.turns[0].text).group(1)
      call = w.turns[0].text.split("\n", 1)[1]
      assert r.turns[0].text == f"{cell} {call}" and r.actions[0] == w.actions[0]
      assert r.turns[-1].text == f"<answer>{w.gold}</answer>" and r.actions[-1] == w.actions[-1]
      assert [t.text for t in r.turns[1:-1]] == [t.text for t in w.turns[1:-1]]


def test_zoom_reflex_writes_the_bases_direct_search():
  """`first_crop="zoom_reflex"`: as "cell_reflex", and the legible zoom inside the first window is the base's
  short answer too (the cell of the window it is centred in, then the same call); a direct search is exactly
  `reflex_search`'s calls; recoveries keep their thoughts."""
  for tier in ("medium", "hard"):
    cell = coldstart.scripted_coldstart(tier, 16, config=coldstart.ExplorerConfig(first_crop="cell_reflex"))
    zoom = coldstart.scripted_coldstart(tier, 16, config=coldstart.ExplorerConfig(first_crop="zoom_reflex"))
    for c, z in zip(cell, zoom):
      assert z.turns[0].text == c.turns[0].text and z.actions == c.actions
      second = z.actions[1]
      if second.source == "observation_1":
        call = c.turns[1].text.split("\n", 1)[1]
        assert z.turns[1].text == f"{coldstart.grid_cell(second.bbox)} {call}"
      else:  # the legible zoom reaches past the window: taken from the original, with its thought
        assert z.turns[1].text == c.turns[1].text
      assert [t.text for t in z.turns[2:]] == [t.text for t in c.turns[2:]]
      if z.metadata["pattern"] != "trial_and_error" and second.source == "observation_1":
        task = synthetic.task_from_id(z.id, synthetic.SyntheticConfig())
        search = coldstart.reflex_search(task, next(o for o in task.objects if o.is_target), 2)
        assert [t.text for t in z.turns[:2]] == list(search.calls)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(z.images[1:], search.observations))
        assert coldstart.contains(search.regions[1], task.detail_box)


def test_object_reflex_goes_through_the_shape():
  """`first_crop="object_reflex"`: zoom_reflex's searches with the call on the shape's `object_zoom` between the
  window and the legible zoom (in the short form where the window's is); a direct search is exactly
  `reflex_search(via_object=True)`'s calls and observations, the object's crop holding the whole shape."""
  for tier in ("medium", "hard"):
    zoom = coldstart.scripted_coldstart(tier, 16, config=coldstart.ExplorerConfig(first_crop="zoom_reflex"))
    via = coldstart.scripted_coldstart(tier, 16, config=coldstart.ExplorerConfig(first_crop="object_reflex"))
    for z, v in zip(zoom, via):
      assert v.metadata["pattern"] == z.metadata["pattern"] and v.turns[0].text == z.turns[0].text
      assert v.num_turns > z.num_turns and v.turns[-1].text == z.turns[-1].text
      if v.metadata["pattern"] == "trial_and_error":
        continue
      task = synthetic.task_from_id(v.id, synthetic.SyntheticConfig())
      target = next(o for o in task.objects if o.is_target)
      search = coldstart.reflex_search(task, target, 2, via_object=True)
      assert [t.text for t in v.turns[:-1]] == list(search.calls)
      assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(v.images[1:], search.observations))
      assert v.actions[1].source == "observation_1" and v.actions[2].source == "observation_2"
      assert coldstart.contains(v.metadata["regions"][1], target.box)
      assert coldstart.contains(v.metadata["regions"][2], task.detail_box)


def test_object_zoom_is_twice_the_shape_and_inside_the_image():
  for box in [(0.4, 0.4, 0.5, 0.5), (0.0, 0.02, 0.12, 0.14), (0.9, 0.85, 1.0, 0.95)]:
    zoom = coldstart.object_zoom(box)
    assert coldstart.contains(zoom, box) and coldstart.contains((0.0, 0.0, 1.0, 1.0), zoom)
    assert zoom[2] - zoom[0] == pytest.approx(2 * (box[2] - box[0]))
    assert zoom[3] - zoom[1] == pytest.approx(2 * (box[3] - box[1]))
  assert coldstart.object_zoom((0.4, 0.4, 0.5, 0.5)) == pytest.approx((0.35, 0.35, 0.55, 0.55))


def test_deterministic():
  a = list(coldstart.scripted_coldstart("medium", 5))
  b = list(coldstart.scripted_coldstart("medium", 5))
  assert [[u.text for u in t.turns] for t in a] == [[u.text for u in t.turns] for t in b]
  assert all(np.array_equal(np.asarray(x.images[-1]), np.asarray(y.images[-1])) for x, y in zip(a, b))


def test_quantize_box_keeps_centre_and_size():
  assert coldstart.quantize_box((0.123, 0.456, 0.789, 0.5), 2) == (0.12, 0.45, 0.79, 0.5)
  assert coldstart.quantize_box((0.95, 0.0, 1.0, 0.031), 2) == (0.95, 0.0, 1.0, 0.04)
  assert coldstart.relative_to((0.5, 0.5, 0.75, 0.75), (0.5, 0.5, 1.0, 1.0)) == (0.0, 0.0, 0.5, 0.5)


def test_jsonl_round_trip(tmp_path, trajectories):
  trajs = trajectories["hard"][:3]
  coldstart.write_jsonl_with_images(str(tmp_path / "cs.jsonl"), str(tmp_path / "images"), trajs)
  back = trajectory_lib.read_jsonl(str(tmp_path / "cs.jsonl"))
  assert [b.num_turns for b in back] == [t.num_turns for t in trajs]
  loaded = back[0].load_images(str(tmp_path))
  assert np.array_equal(np.asarray(loaded.images[-1]), np.asarray(trajs[0].images[-1]))
