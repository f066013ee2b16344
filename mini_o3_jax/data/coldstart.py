"""Cold-start trajectories for the synthetic tasks: a scripted explorer with the paper's patterns.

The generator knows every object's boxes, so it can write correct multi-turn trajectories in the
protocol's exact text format:
  direct           one zoom onto the detail, then the answer;
  depth_first      original -> coarse region -> ... -> the detail, each zoom inside the last observation;
  trial_and_error  zoom onto look-alikes first (read them, see they are not the target, say so and go
                   back to the original image), then find the target; the recoveries the paper credits
                   for test-time turn scaling.
With `first_crop="cell_window"` every search starts as the pretrained base answers "where is ...?"
(`data.grounding`): the thought names the 3 x 3 cell that holds the shape, the first crop is that cell's
half-size window, the next one the shape's legible zoom. `first_crop="cell_reflex"` writes the search's first
crop and its final answer exactly as the base answers "where is ...?" and "what digit ...?" (the cell digit, then
the window's call; `<answer>d</answer>`), with no thought: the turns where the base's skills are used, in the
form it learnt them; every other turn thinks as above. `first_crop="object_reflex"` goes through the shape
itself between the two (`object_zoom`: a crop twice its side around it, where its label first shows), as the
generator's medium and hard paths do.
Every turn restates the goal (goal maintenance). The tool calls are executed by the real crop tool
(`agent.execute_turn`), so the observations are exactly what the sampler would produce.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from mini_o3_jax import agent
from mini_o3_jax.data import synthetic

PATTERNS = ("direct", "depth_first", "trial_and_error")
# How every thought restating the goal opens, and how the final thought gives the digit; the skills
# probe and the no-tools baseline key on them.
GOAL_PREFIX = "I need the digit on the"
ANSWER_PREFIX = "The digit on the"
# The explorer's other fixed wording (`fixed_phrases` lists it for the demo's tokenizer).
_THERE_IS = "There is a"
_REGION_FIRST = "I look at its region first"
_ZOOM_IN = "Its digit is too small to read here, so I zoom in on it"
_ZOOM_FURTHER = "is here but its digit is still too small, so I zoom in further."
_THIS_IS, _WITH_DIGIT, _NOT_THE = "This is a", "with the digit", "not the"
_GO_BACK = "I go back to the original image and look elsewhere. "
CELL_PHRASE = "in cell"  # the window-first explorer names the cell after it (the skills probe keys on it)
FIRST_CROPS = ("region", "cell_window", "cell_reflex", "zoom_reflex", "object_reflex")
Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class ExplorerConfig:
  """How the scripted explorer mixes patterns.

  pattern_weights: relative frequency of each pattern (trial_and_error falls back to depth_first on
    tasks without look-alikes).
  max_wrong_zooms: at most this many look-alikes inspected before the target (trial_and_error).
  coarse_first_prob: probability that a wrong zoom goes through the look-alike's coarse region first.
  decimals: box coordinates are written with this many decimals, rounded outwards.
  seed: base seed; trajectory i uses a generator seeded by (seed, task id).
  first_crop: "region" (a shape's zoom path from the original) or "cell_window" (its grid cell named,
    then that cell's half-size window, then its legible zoom: the pretrained base's first crop), or
    "cell_reflex" (as "cell_window", the first crop and the final answer in the base's own short answers), or
    "zoom_reflex" (as "cell_reflex", and the legible zoom inside the window too: `reflex_search`), or
    "object_reflex" (as "zoom_reflex", through the shape's `object_zoom` between the window and the legible zoom).
  """
  pattern_weights: tuple[tuple[str, float], ...] = (("direct", 0.25), ("depth_first", 0.25),
                                                    ("trial_and_error", 0.5))
  max_wrong_zooms: int = 3
  coarse_first_prob: float = 0.3
  decimals: int = 2
  seed: int = 0
  first_crop: str = "region"

  def __post_init__(self):
    if self.first_crop not in FIRST_CROPS:
      raise ValueError(f"unknown first_crop {self.first_crop!r}; expected one of {FIRST_CROPS}")


def quantize_box(box: Sequence[float], decimals: int) -> Box:
  """Snaps a relative box to a grid of `decimals` digits, keeping its size (rounded up) and centre.

  Growing every side outwards instead would enlarge small final zooms by up to two grid steps and can
  make their detail illegible again.
  """
  q = 10**decimals
  x0, y0, x1, y1 = box
  out = []
  for lo, hi in ((x0, x1), (y0, y1)):
    side = min(1.0, math.ceil((hi - lo) * q - 1e-6) / q)
    start = round(((lo + hi) / 2 - side / 2) * q) / q
    start = min(max(start, 0.0), 1.0 - side)
    out.append((round(start, decimals), round(start + side, decimals)))
  return (out[0][0], out[1][0], out[0][1], out[1][1])


def grid_cell(box: Sequence[float], n: int = 3) -> int:
  """The cell (1..n*n, row-major) of an n x n grid over the image that holds the box's centre."""
  col = min(n - 1, int(n * (box[0] + box[2]) / 2))
  row = min(n - 1, int(n * (box[1] + box[3]) / 2))
  return 1 + n * row + col


def cell_window(cell: int, n: int = 3, side: float = 0.5) -> Box:
  """The box [x0, y0, x1, y1] of relative side `side` centred on cell `cell` (1..n*n, row-major) of an n x n
  grid, shifted inside the image. With side 1/2 on the 3 x 3 grid it holds its whole cell with a margin of
  1/12 (any shape narrower than that whose centre is in the cell lies inside)."""
  row, col = divmod(cell - 1, n)
  centre = np.array([(col + 0.5) / n, (row + 0.5) / n])
  lo = np.clip(centre - side / 2, 0.0, 1.0 - side)
  return (float(lo[0]), float(lo[1]), float(lo[0] + side), float(lo[1] + side))


def object_zoom(box: Box) -> Box:
  """The crop around a shape's `box` of twice its side, shifted inside the image: the shape whole and big enough that
  its label shows (the generator's object zoom, centred; its legible zoom lies inside it unless the image's edge
  cuts it)."""
  w, h = box[2] - box[0], box[3] - box[1]
  x0 = min(max((box[0] + box[2]) / 2 - w, 0.0), 1.0 - 2 * w)
  y0 = min(max((box[1] + box[3]) / 2 - h, 0.0), 1.0 - 2 * h)
  return (x0, y0, x0 + 2 * w, y0 + 2 * h)


def contains(outer: Box, inner: Box) -> bool:
  return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def relative_to(box: Box, parent: Box | None) -> Box:
  """`box` (relative to the original) in the coordinates of the crop `parent` (None = the original)."""
  if parent is None:
    return box
  px0, py0, px1, py1 = parent
  w, h = px1 - px0, py1 - py0
  return ((box[0] - px0) / w, (box[1] - py0) / h, (box[2] - px0) / w, (box[3] - py0) / h)


def crop_region(rel: Box, parent: Box | None, parent_size: tuple[int, int]) -> Box:
  """The region of the original (relative) that the crop tool takes for `rel` out of an image of PIL size
  `parent_size` showing region `parent` of the original (None = the original): the tool's whole-pixel box."""
  parent = parent or (0.0, 0.0, 1.0, 1.0)
  pw, ph = parent[2] - parent[0], parent[3] - parent[1]
  w, h = parent_size
  x0, y0, x1, y1 = agent.tools.pixel_box(rel, (w, h))
  return (parent[0] + x0 / w * pw, parent[1] + y0 / h * ph, parent[0] + x1 / w * pw, parent[1] + y1 / h * ph)


def fixed_phrases() -> tuple[str, ...]:
  """The scripted explorer's fixed wording and the tool-call JSON around its numbers. A phrase never
  swallows the space before a colour, shape or digit: a thought then names the target with the same
  tokens as the question (" yellow"), so a model learns to copy a token rather than to map " yellow" to
  "yellow"."""
  call_head, call_tail = grounding((0.0, 0.0, 0.0, 0.0), 0, 0).split("0, 0, 0, 0")
  observation_tail = grounding((0.0, 0.0, 0.0, 0.0), 1, 0).split("0, 0, 0, 0")[1].split("1")[0]
  return (GOAL_PREFIX, ". " + _THERE_IS, ". " + _REGION_FIRST + ".", ". " + _ZOOM_IN + ".", " " + _ZOOM_FURTHER,
          _THIS_IS, " " + _WITH_DIGIT, ", " + _NOT_THE, ". " + _GO_BACK, ANSWER_PREFIX, call_head, call_tail,
          observation_tail, '"}</grounding>')


def grounding(box: Box, source: int, decimals: int) -> str:
  """The tool-call text for `box` relative to image `source` (0 = original)."""
  name = "original_image" if source == 0 else f"observation_{source}"
  coords = ", ".join(f"{v:.{decimals}f}" for v in box)
  return f'<grounding>{{"bbox_2d": [{coords}], "source": "{name}"}}</grounding>'


def goal_thought(name: str) -> str:
  """The sentence every thought restating the goal opens with."""
  return f"{GOAL_PREFIX} {name}."


def window_thought(goal: str, name: str, cell: int, lead: str = "") -> str:
  """The thought of a window-first crop: the goal (`goal_thought`), the shape `name` seen in 3 x 3 cell `cell`
  (the target or a look-alike), its region first. The grounding base answers "where is the <name>?" with it
  (`data.grounding`, answer_form="agent"), so the agent's first crop is a turn the base already writes."""
  return f"{lead}{goal} {_THERE_IS} {name} {CELL_PHRASE} {cell}. {_REGION_FIRST}."


def answer_thought(name: str, digit: str) -> str:
  """The final thought: the digit read on the named shape."""
  return f"{ANSWER_PREFIX} {name} is {digit}."


def turn_text(thought: str, action: str) -> str:
  """An assistant turn: the thought, then the call or the answer."""
  return f"<think>{thought}</think>\n{action}"


def answer_text(answer: str) -> str:
  return f"<answer>{answer}</answer>"


def cell_call(cell: int, call: str) -> str:
  """The grounding base's short locate answer: the 3 x 3 cell's digit, then the call."""
  return f"{cell} {call}"


class _Episode:
  """Builds a trajectory turn by turn, running every tool call through the real crop tool."""

  def __init__(self, task: synthetic.SyntheticTask, decimals: int):
    self.task, self.decimals = task, decimals
    self.traj = agent.Trajectory(question=task.question, images=[task.image], gold=task.answer, id=task.id)
    self.region: dict[int, Box | None] = {0: None}  # image index -> its region of the original

  def zoom(self, thought: str, box: Box, source: int = 0, reflex: bool = False) -> int:
    """Crops `box` (relative to the original) out of image `source`; returns the new image's index. With
    `reflex` the turn is the base's short locate answer instead: the 3 x 3 cell of the image `source` that the
    crop is centred in, then the call."""
    rel = quantize_box(relative_to(box, self.region[source]), self.decimals)
    call = grounding(rel, source, self.decimals)
    text = cell_call(grid_cell(rel), call) if reflex else turn_text(thought, call)
    turn, image = agent.execute_turn(text, self.traj.images)
    if image is None:
      raise RuntimeError(f"scripted zoom failed on {self.task.id}: {turn.error}")
    self.traj.images.append(image)
    self.traj.turns.append(turn)
    self.region[turn.observation_index] = crop_region(rel, self.region[source], self.traj.images[source].size)
    return turn.observation_index

  def answer(self, thought: str, reflex: bool = False) -> agent.Trajectory:
    """The final turn (`reflex`: the answer alone, as the base answers a read question)."""
    final = answer_text(self.task.answer)
    self.traj.turns.append(agent.Turn(final if reflex else turn_text(thought, final)))
    self.traj.stop_reason = "answer"
    # Where each observation came from, in original coordinates (for checks and viewers).
    self.traj.metadata["regions"] = [list(self.region[i]) for i in range(1, len(self.traj.images))]
    return self.traj


@dataclasses.dataclass(frozen=True)
class ReflexSearch:
  """The grounding base's direct search for one shape, in its short answers, run through the crop tool.

  calls: the window's call (the shape's 3 x 3 cell, then the call on its half-size window), with `via_object` the
  call on the shape's `object_zoom` inside that window's observation, and the legible zoom's (the cell of the
  image it is made on that the zoom is centred in, then the call on the last observation);
  observations: the images the calls return; regions: where each lies in the original (relative).
  """
  calls: tuple[str, ...]
  observations: tuple[Image.Image, ...]
  regions: tuple[Box, ...]


def reflex_search(task: synthetic.SyntheticTask, obj: synthetic.SceneObject, decimals: int,
                  via_object: bool = False) -> ReflexSearch | None:
  """`obj`'s window, (`via_object`: its `object_zoom` from that window's observation,) then its legible zoom from
  the last observation, as "zoom_reflex" ("object_reflex") trajectories write them; None where the legible zoom
  reaches past the last observation (the explorer then zooms from the original)."""
  ep = _Episode(task, decimals)
  source = ep.zoom("", cell_window(grid_cell(obj.box)), reflex=True)
  if via_object:
    source = ep.zoom("", object_zoom(obj.box), source, reflex=True)
  if not contains(ep.region[source], obj.zoom_path[-1]):
    return None
  ep.zoom("", obj.zoom_path[-1], source, reflex=True)
  images = range(1, len(ep.traj.images))
  return ReflexSearch(calls=tuple(t.text for t in ep.traj.turns), observations=tuple(ep.traj.images[i] for i in images),
                      regions=tuple(ep.region[i] for i in images))


def _name(obj: synthetic.SceneObject) -> str:
  return f"{obj.colour} {obj.shape}"


def _goal(task: synthetic.SyntheticTask) -> str:
  target = next(o for o in task.objects if o.is_target)
  return goal_thought(_name(target))


def _follow_path(ep: _Episode, obj: synthetic.SceneObject, *, depth_first: bool, goal: str,
                 lead: str = "", window: bool = False, reflex: bool = False, zoom_reflex: bool = False,
                 via_object: bool = False) -> int:
  """Zooms from the original to where `obj`'s digit is legible; returns the last observation's index.

  `lead` opens the first thought (what the previous zoom showed, when recovering from a wrong one). With
  `window` the first crop is the window of `obj`'s grid cell, named in the thought; the legible zoom is
  then taken from that window's observation (from the original where it reaches past the window); with
  `reflex` the window's turn is the base's short answer unless it recovers from a wrong zoom (`lead`), and with
  `zoom_reflex` too the legible zoom's inside it; `via_object` (with `zoom_reflex`) zooms on the shape's
  `object_zoom` inside the window first, in the short form too.
  """
  if window:
    cell = grid_cell(obj.box)
    short = reflex and not lead
    source = ep.zoom(window_thought(goal, _name(obj), cell, lead), cell_window(cell), reflex=short)
    if via_object:
      source = ep.zoom(f"{goal} The {_name(obj)} {_ZOOM_FURTHER}", object_zoom(obj.box), source,
                       reflex=short and zoom_reflex)
    detail = obj.zoom_path[-1]
    if not contains(ep.region[source], detail):
      source, short = 0, False
    return ep.zoom(f"{goal} The {_name(obj)} {_ZOOM_FURTHER}", detail, source, reflex=short and zoom_reflex)
  path = obj.zoom_path if depth_first else obj.zoom_path[-1:]
  source = 0
  for level, box in enumerate(path):
    if level == 0:
      how = _REGION_FIRST if len(path) > 1 else _ZOOM_IN
      thought = f"{lead}{goal} {_THERE_IS} {_name(obj)}. {how}."
    else:
      thought = f"{goal} The {_name(obj)} {_ZOOM_FURTHER}"
    source = ep.zoom(thought, box, source)
  return source


def script_trajectory(task: synthetic.SyntheticTask, pattern: str, rng: np.random.Generator,
                      config: ExplorerConfig = ExplorerConfig()) -> agent.Trajectory:
  """One correct trajectory for `task` following `pattern`."""
  if pattern not in PATTERNS:
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
  target = next(o for o in task.objects if o.is_target)
  decoys = [o for o in task.objects if o.is_lookalike and not o.is_target]
  if pattern == "trial_and_error" and not decoys:
    pattern = "depth_first"
  goal = _goal(task)
  window = config.first_crop in ("cell_window", "cell_reflex", "zoom_reflex", "object_reflex")
  reflex = config.first_crop in ("cell_reflex", "zoom_reflex", "object_reflex")
  zoom_reflex = config.first_crop in ("zoom_reflex", "object_reflex")
  via_object = config.first_crop == "object_reflex"
  ep = _Episode(task, config.decimals)
  ep.traj.metadata["pattern"] = pattern
  lead = ""
  if pattern == "trial_and_error":
    n_wrong = int(rng.integers(1, min(config.max_wrong_zooms, len(decoys)) + 1))
    for i in rng.permutation(len(decoys))[:n_wrong]:
      decoy = decoys[i]
      coarse = len(decoy.zoom_path) > 1 and rng.random() < config.coarse_first_prob
      _follow_path(ep, decoy, depth_first=coarse, goal=goal, lead=lead, window=window, reflex=reflex,
                   zoom_reflex=zoom_reflex, via_object=via_object)
      lead = (f"{_THIS_IS} {_name(decoy)} {_WITH_DIGIT} {decoy.digit}, {_NOT_THE} {_name(target)}. "
              f"{_GO_BACK}")
      ep.traj.metadata.setdefault("wrong_zooms", []).append(_name(decoy))
    depth_first = len(target.zoom_path) > 1 and rng.random() < 0.5
  else:
    depth_first = pattern == "depth_first"
  _follow_path(ep, target, depth_first=depth_first, goal=goal, lead=lead, window=window, reflex=reflex,
               zoom_reflex=zoom_reflex, via_object=via_object)
  return ep.answer(answer_thought(_name(target), task.answer), reflex=reflex)


def scripted_coldstart(tier: str, n: int, split: str = "train",
                       task_config: synthetic.SyntheticConfig = synthetic.SyntheticConfig(),
                       config: ExplorerConfig = ExplorerConfig(), start: int = 0) -> Iterator[agent.Trajectory]:
  """n scripted trajectories on tasks start .. start+n-1 of (tier, split); patterns drawn by weight."""
  names = [p for p, _ in config.pattern_weights]
  weights = np.asarray([w for _, w in config.pattern_weights], np.float64)
  weights = weights / weights.sum()
  for task in synthetic.generate_split(tier, split, n, task_config, start=start):
    rng = np.random.default_rng([config.seed, *map(ord, task.id)])
    pattern = names[int(rng.choice(len(names), p=weights))]
    yield script_trajectory(task, pattern, rng, config)


def summarize(trajectories: Sequence[agent.Trajectory]) -> dict:
  """Counts per pattern and a histogram of turn counts."""
  patterns = collections.Counter(t.metadata.get("pattern", "?") for t in trajectories)
  turns = collections.Counter(t.num_turns for t in trajectories)
  return {"n": len(trajectories), "patterns": dict(patterns), "turns": dict(sorted(turns.items()))}


def write_jsonl_with_images(path: str, image_dir: str, trajectories: Sequence[agent.Trajectory]) -> None:
  """JSONL (one trajectory a line, images as relative PNG paths) in the released cold-start spirit."""
  os.makedirs(image_dir, exist_ok=True)
  base = os.path.dirname(os.path.abspath(path))
  with open(path, "w") as f:
    for t in trajectories:
      saved = t.save_images(image_dir, stem=t.id, relative_to=base)
      f.write(json.dumps(saved.to_json_dict()) + "\n")
