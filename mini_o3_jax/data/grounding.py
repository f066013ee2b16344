"""Grounding pretraining for the tiny base: fresh synthetic scenes, every object a question.

A base that can *see* must exist before the agent recipe means anything (the paper starts from
Qwen2.5-VL-7B-Instruct, which grounds already). One training row is one scene shown at the demo's view
budget, followed by short chat turns about its objects, each of one kind:

  locate  "Where is the blue diamond?"            -> the crop tool's call on the shape's box
  name    "What is at [0.56, 0.14, 0.72, 0.30]?"  -> "blue diamond"
  read    a legible crop (the shape's last zoom)  -> its digit, "<answer>3</answer>"
  zoom    the window a locate call returned       -> the call on the shape's legible crop inside it

The locate answer is the protocol's own `<grounding>` call, written as the scripted cold start writes
its boxes, so the skill transfers to the agent's first crop without a change of format. With
answer_form="agent" the locate and read answers are the agent's own turns, word for word as the scripted
explorer writes them (`coldstart`): the window-first crop's thought and call, and the final thought and
answer (a bound decoder does not carry its skills over to them in 800 steps: docs/miniature.md, session 17).
With prompt_form="agent" the questions are asked as the agent is asked (its instructions and a task question;
the read crop as the observation of the call), the answers short: the recipe's window phase. With zoom=1 too a
row is the base's whole direct search (`coldstart.reflex_search`): the window's call, the legible zoom inside its
observation, the digit of that zoom's observation, each turn as the agent's tool returns it; with zoom=2 the
search goes through the shape's own zoom between the window and the legible one. Scenes come
from `synthetic.make_task` on a split of their own (`pretrain`, never the agent's train / test
splits), one fresh scene per row: indices only grow, so no scene is ever seen twice.

Which scenes each step draws (the curriculum over scene levels) is `scene_levels`'; `SceneStream` here turns them
into rows.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from mini_o3_jax.agent import prompts
from mini_o3_jax.data import coldstart, scene_levels, synthetic
from mini_o3_jax.processing import chat
from mini_o3_jax.processing import image as image_lib

KINDS = ("locate", "name", "read", "zoom")

LOCATE_PREFIX = "Where is the"
NAME_PREFIX = "What is at ["
READ_QUESTION = "What digit is on the label?"
_LOCATE = LOCATE_PREFIX + " {name}?"
_NAME = NAME_PREFIX + "{box}]?"
_READ_NAMED = "What digit is on the {name}?"  # answer_form="agent": the final thought names the shape
ANSWER_FORMS = ("short", "agent")
PROMPT_FORMS = ("short", "agent")

@dataclasses.dataclass(frozen=True)
class GroundingConfig:
  """What one row holds.

  locate / name / read: questions of each kind per scene (fewer when the scene has fewer shapes).
  decimals: digits of every box coordinate, as the scripted cold start writes them.
  question_first: the first question's text before the scene's image (the Qwen convention is image
    first); causal attention then lets every image token see what is asked (issue 13's binding rung).
  target_first: locate questions ask about the scene's target first, then the others; False draws them
    in a random order of the uniquely named shapes, so "the shape asked first" is no shortcut.
  cell_first: a locate answer starts with the 3 x 3 grid cell of the box centre as one digit (1-9,
    row-major) before the call: one token that names the place is what the tiny decoder learns to bind
    to the question (docs/miniature.md, sessions 9-11); the call's box follows.
  cell_only_steps: (with cell_first) in a `SceneStream`'s first this many steps only the cell digit of
    a locate answer is in the loss (the call stays in the row): the binding phase of the base's recipe,
    the whole answer after it.
  cell_window: (with cell_first) the call's box is the half-size window around the cell (`cell_window`),
    not the shape's own box: a coarse first crop that holds the whole shape whenever the cell is right,
    a function of the cell alone (the agent's next zoom brings the precision).
  answer_form: "short" (the cell digit then the call; `<answer>d</answer>`) or "agent" (with cell_window: the
    scripted explorer's window-first turn, its cell named in the thought, and its final turn; the read
    question names the shape, as the final thought does).
  prompt_form: "short" (the questions above) or "agent" (the agent's own user turns: a locate question is the
    first turn of a search for that shape's digit, the instructions and a task question naming it; a read
    question's crop comes as the observation of the call before it; locate questions first, then reads).
  zoom: (with prompt_form="agent", cell_first and cell_window, 0, 1 or 2) the first located shape's window is
    returned as the observation of its call, and the answer is the call on its legible crop inside that window (the
    window's 3 x 3 cell that crop is centred in, then the call on `observation_1`); with 2 the shape's
    `coldstart.object_zoom` inside the window first, its observation returned, then the legible crop inside that
    (`coldstart.reflex_search`); the reads then read that shape's last zoom as the tool returns it. Rows where the
    legible crop reaches past the image it is asked from ask no zoom.
  last_zoom_only_steps: (with zoom) in a `SceneStream`'s first this many steps only each row's last zoom call (the
    legible crop's: with zoom=2 the label's, made on the shape's own view) is in the loss, the rest of the row its
    context: the decoder's whole gradient on where the label is.
  read_jitter: a read question's crop (outside a zoom's search) is the legible crop grown or shrunk by up to this
    fraction of its side and moved so the digit sits anywhere inside it (2 px from its edges), as the agent's own
    crops hold it; 0 = the generator's crop, the digit at its centre (a tower taught only there reads nowhere else:
    docs/miniature.md, session 18).
  """
  locate: int = 6
  name: int = 2
  read: int = 1
  decimals: int = 2
  question_first: bool = False
  target_first: bool = True
  cell_first: bool = False
  cell_only_steps: int = 0
  cell_window: bool = False
  answer_form: str = "short"
  prompt_form: str = "short"
  zoom: int = 0
  read_jitter: float = 0.0
  last_zoom_only_steps: int = 0

  def __post_init__(self):
    if not 0.0 <= self.read_jitter < 0.5:
      raise ValueError(f"read_jitter={self.read_jitter}: a fraction of the legible crop's side in [0, 0.5)")
    if self.zoom not in (0, 1, 2):
      raise ValueError(f"zoom={self.zoom}: a row asks the located shape's legible zoom (1), or its object's zoom "
                       "and then the legible one (2)")
    if self.zoom and not (self.prompt_form == "agent" and self.cell_first and self.cell_window and self.locate):
      raise ValueError('zoom asks for the legible crop inside a located window\'s observation: it needs '
                       'prompt_form="agent", cell_first, cell_window and a locate question')
    if self.prompt_form not in PROMPT_FORMS:
      raise ValueError(f"unknown prompt_form {self.prompt_form!r}; expected one of {PROMPT_FORMS}")
    if self.prompt_form == "agent" and (self.name or (self.read and not self.locate)):
      raise ValueError('prompt_form="agent" asks locate questions, then reads as their calls\' observations: '
                       "it needs name=0 and a locate question before any read")
    if self.answer_form not in ANSWER_FORMS:
      raise ValueError(f"unknown answer_form {self.answer_form!r}; expected one of {ANSWER_FORMS}")
    if self.answer_form == "agent" and not (self.cell_first and self.cell_window and not self.cell_only_steps):
      raise ValueError('answer_form="agent" writes the window-first turn: it needs cell_first and cell_window, '
                       "and the whole answer in the loss (cell_only_steps=0)")
    if self.last_zoom_only_steps and not self.zoom:
      raise ValueError("last_zoom_only_steps needs zoom (the last zoom call is what stays in the loss)")
    if self.cell_only_steps and not self.cell_first:
      raise ValueError("cell_only_steps needs cell_first (the cell digit is what stays in the loss)")
    if self.cell_window and not self.cell_first:
      raise ValueError("cell_window needs cell_first (the window is the cell's)")


def object_name(obj: synthetic.SceneObject) -> str:
  return f"{obj.colour} {obj.shape}"


def locate_question(name: str) -> str:
  return _LOCATE.format(name=name)


def box_text(box: Sequence[float], decimals: int) -> str:
  return ", ".join(f"{v:.{decimals}f}" for v in coldstart.quantize_box(box, decimals))


def locate_answer(box: Sequence[float], decimals: int, cell_first: bool = False, window: bool = False,
                  agent_turn_for: str = "") -> str:
  """The answer to "where is ...": the `<grounding>` call on `box`, led by its 3 x 3 cell with `cell_first`;
  with `window` the call's box is the cell's half-size window instead. `agent_turn_for` (a shape's name, with
  `window`): the scripted explorer's window-first turn for that shape instead, its cell named in the thought."""
  cell = coldstart.grid_cell(box)
  call = coldstart.grounding(coldstart.quantize_box(coldstart.cell_window(cell) if window else box, decimals), 0,
                             decimals)
  if agent_turn_for:
    name = agent_turn_for
    return coldstart.turn_text(coldstart.window_thought(coldstart.goal_thought(name), name, cell), call)
  return coldstart.cell_call(cell, call) if cell_first else call


def read_question(name: str, answer_form: str = "short") -> str:
  return _READ_NAMED.format(name=name) if answer_form == "agent" else READ_QUESTION


def read_answer(name: str, digit: str, answer_form: str = "short") -> str:
  """A legible crop's digit: `<answer>d</answer>`, or (answer_form="agent") the explorer's final turn."""
  if answer_form == "agent":
    return coldstart.turn_text(coldstart.answer_thought(name, digit), coldstart.answer_text(digit))
  return coldstart.answer_text(digit)


def scene_questions(task: synthetic.SyntheticTask, config: GroundingConfig,
                    rng: np.random.Generator) -> list[tuple[str, str, str, int]]:
  """[(kind, question, answer, object index)] about `task`, in a random order.

  A locate question names a shape only when its name is unique in the scene (a look-alike shares the
  colour or the shape, never both), so every answer is determined by the image. The target comes
  first in line: the agent will be asked about it, and the scene's look-alikes surround it. Name
  questions ask about shapes no locate question names, so no answer can be copied from another
  question's text.
  """
  objects = task.objects
  names = [object_name(o) for o in objects]
  target = next(i for i, o in enumerate(objects) if o.is_target)
  order = [int(i) for i in rng.permutation(len(objects))]
  if config.target_first:
    order = [target] + [i for i in order if i != target]
  located = [i for i in order if names.count(names[i]) == 1][:config.locate]
  agent = config.answer_form == "agent"
  out = [("locate", locate_question(names[i]),
          locate_answer(objects[i].box, config.decimals, config.cell_first, config.cell_window,
                        agent_turn_for=names[i] if agent else ""), i)
         for i in located]
  # Never both questions about one object: "What is at [its box]?" would hand the locate answer over in
  # the text (and "Where is the <name>?" the name answer), whichever comes first.
  out += [("name", _NAME.format(box=box_text(objects[i].box, config.decimals)), names[i], i)
          for i in [i for i in order if i not in located][:config.name]]
  search = _search(task, located[0], config.decimals, config.zoom) if config.zoom and located else None
  if search:
    out += [("zoom", "", call, located[0]) for call in search.calls[1:]]
  read = [located[0]] * config.read if search else order[:config.read]  # a zoom's reads read its observation
  out += [("read", read_question(names[i], config.answer_form), read_answer(names[i], objects[i].digit,
                                                                            config.answer_form), i)
          for i in read]
  if config.prompt_form == "agent":
    return as_agent_turns(out, objects, rng)
  return [out[j] for j in rng.permutation(len(out))]


def as_agent_turns(questions, objects: Sequence[synthetic.SceneObject],
                   rng: np.random.Generator) -> list[tuple[str, str, str, int]]:
  """`questions` (locate, zoom and read) asked as the agent's user turns, locate questions first: a locate
  question becomes the first turn of a search for its shape's digit (the instructions, a task question naming
  the shape); a zoom, then a read question, the observation turn returning the crop of the call before it."""
  turns = []
  for kind, _, answer, i in questions:
    if kind == "locate":
      template = synthetic.QUESTIONS[rng.integers(len(synthetic.QUESTIONS))]
      task_question = template.format(colour=objects[i].colour, shape=objects[i].shape)
      turns.append((kind, prompts.question_prompt(task_question), answer, i))
  observed = [q for kind in ("zoom", "read") for q in questions if q[0] == kind]
  for k, (kind, _, answer, i) in enumerate(observed):
    turns.append((kind, prompts.observation_turn(len(turns) - 1, k + 1), answer, i))
  return turns


def first_turn(question: str, question_first: bool, kind: str = "locate") -> list[dict[str, Any]]:
  """The first user turn's content as a row opening with a `kind` question has it: the scene's image (and a
  read question's crop after it) and the question, in the configured order."""
  return scene_messages([(kind, question, "", -1)], question_first)[0]["content"]


def scene_messages(questions, question_first: bool = False) -> list[dict[str, Any]]:
  """The chat: the scene in the first user turn, then one user / assistant pair per question; a read
  question brings its crop as an image of its own (where its text has the image placeholder, an observation
  turn's, there)."""
  messages = []
  for n, (kind, question, answer, _) in enumerate(questions):
    observed = kind in ("read", "zoom")
    images = [{"type": "image"}] * ((n == 0) + observed)  # the scene first, then the crop
    text = [{"type": "text", "text": question}]
    content = text + images if question_first and n == 0 else images + text
    if n and observed and prompts.IMAGE_PLACEHOLDER in question:
      head, tail = question.split(prompts.IMAGE_PLACEHOLDER)
      content = [{"type": "text", "text": head}, *images, {"type": "text", "text": tail}]
    messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
  return messages


def _search(task: synthetic.SyntheticTask, i: int, decimals: int, zooms: int) -> coldstart.ReflexSearch | None:
  """Object `i`'s reflex search as a row with `zooms` zoom questions about it asks it (through its object's zoom
  with 2)."""
  return coldstart.reflex_search(task, task.objects[i], decimals, via_object=zooms == 2)


def _observed_crops(task: synthetic.SyntheticTask, questions, config: GroundingConfig):
  """[(kind, object index, crop image, its region of the original)] per zoom and read question, in order: the
  images a zoomed shape's search returns before each of its zooms and its read (the window, the object's zoom, the
  legible crop) as the tool returns them, other reads the shape's `read_crop`."""
  zooms = collections.Counter(i for kind, _, _, i in questions if kind == "zoom")
  searches = {i: _search(task, i, config.decimals, n) for i, n in zooms.items()}
  seen = collections.Counter()  # per zoomed shape, the observations already returned
  out = []
  for kind, _, _, i in questions:
    if kind in ("zoom", "read"):
      if i in searches:
        step = min(seen[i], len(searches[i].observations) - 1)  # every read reads the last
        seen[i] += 1
        out.append((kind, i, searches[i].observations[step], searches[i].regions[step]))
      else:
        box = read_crop(task, i, config.read_jitter)
        out.append((kind, i, synthetic.crop_image(task.image, box), box))
  return out


def read_crop(task: synthetic.SyntheticTask, i: int, jitter: float = 0.0) -> coldstart.Box:
  """The crop a read question about object `i` shows (relative, pixel-aligned): its legible zoom, or with `jitter`
  a square of that side times a factor in [1 - jitter, 1 + jitter] holding the digit at a random place 2 px from its
  edges (the agent's zooms, their boxes' sides rounded up, run a few pixels over); a function of the task and `i`."""
  obj = task.objects[i]
  if not jitter:
    return obj.zoom_path[-1]
  rng = np.random.default_rng([zlib.crc32(task.id.encode()), i])
  w, h = task.image.size
  x0, y0, x1, y1 = synthetic.pixel_box(obj.zoom_path[-1], (w, h))
  gx0, gy0, gx1, gy1 = synthetic.pixel_box(obj.detail_box, (w, h))
  side = int(round((x1 - x0) * rng.uniform(1.0 - jitter, 1.0 + jitter)))
  side = min(max(side, max(gx1 - gx0, gy1 - gy0) + 4), w, h)
  left = int(rng.integers(max(0, gx1 + 2 - side), min(w - side, gx0 - 2) + 1))
  top = int(rng.integers(max(0, gy1 + 2 - side), min(h - side, gy0 - 2) + 1))
  return (left / w, top / h, (left + side) / w, (top + side) / h)


def scene_views(task: synthetic.SyntheticTask, questions, task_config: synthetic.SyntheticConfig,
                config: GroundingConfig = GroundingConfig()) -> list:
  """The views the model sees, in placeholder order: the scene, then each zoom question's window and each
  read question's crop (`read_crop`; a zoom's where its written box says: `config`'s decimals)."""
  return _views(task, _observed_crops(task, questions, config), task_config)


def _views(task: synthetic.SyntheticTask, crops, task_config: synthetic.SyntheticConfig) -> list:
  """`scene_views` from `_observed_crops`' output."""
  return [synthetic.render_view(task.image, None, task_config)] + [synthetic.render_view(crop, None, task_config)
                                                                   for _, _, crop, _ in crops]


def read_glyphs(task: synthetic.SyntheticTask, questions, task_config: synthetic.SyntheticConfig,
                config: GroundingConfig = GroundingConfig()) -> np.ndarray:
  """float32 [reads, 4]: per read question, its shape's digit (glyph) box relative to that question's crop
  view (`scene_views`), where the tower's digit target places the digit."""
  return _glyphs(task, _observed_crops(task, questions, config), task_config)


def _glyphs(task: synthetic.SyntheticTask, crops, task_config: synthetic.SyntheticConfig) -> np.ndarray:
  """`read_glyphs` from `_observed_crops`' output."""
  out = []
  for kind, i, _, region in crops:
    if kind == "read":
      x0, y0, x1, y1 = synthetic.project_box(task.objects[i].detail_box, region, task.image.size, task_config)
      cx0, cy0, cx1, cy1 = synthetic.pixel_box(region, task.image.size)
      w, h = synthetic.view_size((cx1 - cx0, cy1 - cy0), task_config)
      out.append((x0 / w, y0 / h, x1 / w, y1 / h))
  return np.asarray(out, np.float32).reshape(-1, 4)


def scene_example(task: synthetic.SyntheticTask, tokenizer, config: GroundingConfig,
                  task_config: synthetic.SyntheticConfig, rng: np.random.Generator,
                  cell_only: bool = False, image: Mapping[str, Any] | None = None,
                  last_zoom_only: bool = False) -> dict[str, Any]:
  """One training row: {input_ids, loss_mask, kinds, pixel_values, image_grid_thw, object_boxes, object_shapes,
  object_glyphs, crop_regions, read_glyphs, read_digits, read_images};
  `cell_only` keeps only each locate answer's first token (its cell, with `cell_first`) in the loss;
  `last_zoom_only` only the row's last zoom answer (`GroundingConfig.last_zoom_only_steps`); `image`:
  the model's `preprocess_image` settings (`processing.image.settings_for`; None: Qwen2.5-VL's).

  `kinds` int [T] is the index in KINDS of the question each answer token belongs to (-1 elsewhere),
  so the skills probe can score each kind separately.
  """
  questions = scene_questions(task, config, rng)
  crops = _observed_crops(task, questions, config)  # once: the views and the glyph boxes both come from them
  processed = [image_lib.preprocess_image(v, task_config.view_min_pixels, task_config.view_max_pixels, **(image or {}))
               for v in _views(task, crops, task_config)]
  grids = [g for _, g in processed]
  enc = chat.tokenize_conversation(tokenizer, scene_messages(questions, config.question_first), grids)
  kinds = _answer_kinds(enc["loss_mask"], [q[0] for q in questions])
  observed = [q[0] for q in questions if q[0] in ("zoom", "read")]  # the kinds of the images after the scene
  loss_mask = _first_token_only(enc["loss_mask"], kinds == KINDS.index("locate")) if cell_only \
      else enc["loss_mask"]
  if last_zoom_only:
    loss_mask = _last_span_only(loss_mask, kinds == KINDS.index("zoom"))
  return {
      "id": task.id,
      "input_ids": enc["input_ids"],
      "loss_mask": loss_mask,
      "kinds": kinds,
      "pixel_values": np.concatenate([pv for pv, _ in processed]).astype(np.float32),
      "image_grid_thw": np.stack(grids).astype(np.int64),
      # the scene's shapes (for the tower's feature targets: which token shows which kind)
      "object_boxes": np.asarray([o.box for o in task.objects], np.float32).reshape(-1, 4),
      "object_shapes": np.asarray([task_config.shapes.index(o.shape) for o in task.objects], np.int32),
      "object_glyphs": np.asarray([o.detail_box for o in task.objects], np.float32).reshape(-1, 4),
      # the region of the scene each later image shows, as the pixels cropped (relative), so the shapes' boxes can
      # be placed there too
      "crop_regions": (np.asarray([synthetic.pixel_box(region, task.image.size) for _, _, _, region in crops],
                                  np.float64).reshape(-1, 4) / np.tile(task.image.size, 2)).astype(np.float32),
      # each read question's digit and where it sits in its crop (the tower's digit target)
      "read_glyphs": _glyphs(task, crops, task_config),
      "read_digits": np.asarray([int(task.objects[i].digit) for kind, _, _, i in questions if kind == "read"],
                                np.int32),
      # the index among the row's images of each read question's crop (the scene is image 0)
      "read_images": np.asarray([1 + n for n, kind in enumerate(observed) if kind == "read"], np.int32),
  }


def _first_token_only(loss_mask: np.ndarray, spans: np.ndarray) -> np.ndarray:
  """`loss_mask` with each span of `spans` (bool [T], runs of answer tokens) reduced to its first token."""
  starts = spans & ~np.concatenate([[False], spans[:-1]])
  return np.where(spans, starts, loss_mask).astype(loss_mask.dtype)


def _last_span_only(loss_mask: np.ndarray, spans: np.ndarray) -> np.ndarray:
  """`loss_mask` on the last run of `spans` (bool [T]) only; all zeros when there is none."""
  out = np.zeros_like(loss_mask)
  at = np.flatnonzero(spans)
  if len(at):
    gaps = np.flatnonzero(np.diff(at) > 1)  # the last run starts after the last gap
    start = at[gaps[-1] + 1] if len(gaps) else at[0]
    out[start:at[-1] + 1] = loss_mask[start:at[-1] + 1]
  return out


def _answer_kinds(loss_mask: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
  """Per token, the KINDS index of the answer it belongs to (-1 outside answers)."""
  out = np.full(len(loss_mask), -1, np.int32)
  starts = np.flatnonzero(np.diff(np.concatenate([[0], loss_mask])) == 1)
  ends = np.flatnonzero(np.diff(np.concatenate([loss_mask, [0]])) == -1) + 1
  if len(starts) != len(kinds):
    raise ValueError(f"{len(starts)} answer spans for {len(kinds)} questions")
  for s, e, kind in zip(starts, ends, kinds):
    out[s:e] = KINDS.index(kind)
  return out


class SceneStream:
  """Fresh rows for step `step` of a curriculum: row r of step s is scene s * rows + r of its level.

  Stateless apart from the step, so a resumed run regenerates exactly the rows it would have seen. `image`:
  the model's `preprocess_image` settings, as in `scene_example`.
  """

  def __init__(self, curriculum: scene_levels.Curriculum, config: GroundingConfig, task_config: synthetic.SyntheticConfig,
               tokenizer, rows: int, seed: int, split: str = scene_levels.PRETRAIN_SPLIT, image: Mapping[str, Any] | None = None):
    self.curriculum, self.config, self.task_config = curriculum, config, task_config
    self.tokenizer, self.rows, self.seed, self.split, self.image = tokenizer, rows, seed, split, image

  def rows_for(self, step: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, step]))
    mix = self.curriculum.mixture(step)
    levels = [k for k, _ in mix]
    p = np.asarray([w for _, w in mix], np.float64)
    picks = rng.choice(len(levels), size=self.rows, p=p / p.sum())
    out = []
    for r, pick in enumerate(picks):
      task = scene_levels.make_scene(levels[pick], step * self.rows + r, self.task_config, self.split)
      out.append(scene_example(task, self.tokenizer, self.config, self.task_config, rng,
                               cell_only=step < self.config.cell_only_steps, image=self.image,
                               last_zoom_only=step < self.config.last_zoom_only_steps))
    return out
