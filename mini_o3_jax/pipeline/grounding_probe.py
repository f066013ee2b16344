"""What the grounding base can do, on held-out scenes: per-skill accuracy and greedy boxes.

Teacher-forced (cheap, every `eval_every` steps), per answer-token role:
  cell   the 3 x 3 grid cell a `cell_first` locate answer starts with, or (answer_form="agent") its thought
         names (the binding the decoder learns);
  where  the tenths digit of x0 and y0 of a located box (the coarse position: where to look);
  box    the box's other digits (its fine position and size);
  name   the name of the shape at a given box;
  read   the digit of a legible crop (the first digit of the answer);
  zoom_cell, zoom_box  (with `zoom`) the cell of the window a zoom answer starts with, and its box's digits;
each beside `prior_<role>`, the accuracy of always writing the role's most frequent token.

Greedy (the numbers the base is judged by): the target of each held-out scene is asked for alone
("Where is the <target>?", or the agent's first turn with prompt_form="agent"), the box is decoded by the
sampler and parsed by the agent's own parser, and `on_target` counts boxes that contain the target's centre (a
crop there shows the target), `on_object` boxes that contain any shape's centre (localising some shape, named or
not: on_object high with on_target low is a binding failure), `iou50` boxes with IoU >= 0.5; `read` answers the
agent's parser takes for a final answer with the digit of the target's legible crop, asked as training asks it
(the scene, then the crop; with prompt_form="agent" the crop as the observation of the located call),
`read_digit` answers whose first digit is that digit whatever their form; `cell` (with `cell_first`) answers
that name the target's grid cell. With `zoom` the zoom is asked too, after the gold window call and its
observation: `zoom_hit` counts calls whose crop holds the target's digit at a legible size (no larger than the
scripted zoom's, one step of the written box's grid allowed), `zoom_cell` those naming the scripted zoom's cell;
with zoom=2 the object's zoom is asked after the gold window (`object_hit`: the crop holds the whole shape and is no
larger than the scripted one's plus a step; `object_cell`), and the legible zoom after the gold object's zoom.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mini_o3_jax.agent import tools
from mini_o3_jax.data import coldstart, grounding, scene_levels, synthetic
from mini_o3_jax.eval import diagnostics
from mini_o3_jax.model import hf
from mini_o3_jax.pipeline import probe as probe_lib
from mini_o3_jax.processing import chat
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.sampler import generate
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import losses

ROLES = ("cell", "where", "box", "name", "read", "zoom_cell", "zoom_box")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  levels: tuple[str, ...] = ("easy", "medium", "hard")
  scenes: int = 64  # held-out scenes per level
  batch_size: int = 16
  seq_len: int = 512
  num_patches: int = 192


_NAMED_CELL = coldstart.CELL_PHRASE + " "  # an agent-form locate answer's thought names the cell after it


def token_roles(pieces, kinds) -> list[str | None]:
  """Per token, its role in ROLES (None outside answers). pieces: decoded tokens; kinds: KINDS index."""
  roles: list[str | None] = [None] * len(pieces)
  coord, digits_seen, answer = -1, 0, ""
  for t, (piece, kind) in enumerate(zip(pieces, kinds)):
    if kind < 0:
      coord, answer = -1, ""
      continue
    answer, before = answer + piece, answer
    name = grounding.KINDS[kind]
    if name == "zoom":  # the window's cell, then the box's digits
      if piece.strip().isdigit():
        roles[t] = "zoom_box" if any(c.isdigit() for c in before) else "zoom_cell"
      continue
    if name != "locate":  # a read answer's digit is its first (the agent form repeats it in <answer>)
      first_digit = piece.strip().isdigit() and not any(c.isdigit() for c in before)
      roles[t] = name if name != "read" or first_digit else None
      continue
    if piece.strip().isdigit() and (not before or before.endswith(_NAMED_CELL)):  # the cell, first or named
      roles[t] = "cell"
      continue
    if piece.endswith("0.") or piece.endswith("1.") or piece.endswith("1.00"):
      coord, digits_seen = coord + 1, 0
      continue
    if piece.isdigit() and coord >= 0:
      roles[t] = "where" if coord < 2 and digits_seen == 0 else "box"
      digits_seen += 1
  return roles


def iou(a, b) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


class GroundingProbe:
  """Held-out rows and greedy questions per level, built once; `run(model)` scores a model."""

  def __init__(self, config: ProbeConfig, grounding_config: grounding.GroundingConfig,
               task_config: synthetic.SyntheticConfig, tokenizer, model_config, seed: int = 0):
    self.config, self.tokenizer, self.model_config, self.task_config = config, tokenizer, model_config, task_config
    self.question_first = grounding_config.question_first
    self.cell_first = grounding_config.cell_first
    self.grounding_config = grounding_config
    self.image = image_lib.settings_for(model_config)
    self.rows, self.tasks = {}, {}
    for level in config.levels:
      rng = np.random.default_rng(np.random.SeedSequence([seed, 1 + scene_levels.level_salt(level)]))
      tasks = [scene_levels.make_scene(level, i, task_config, scene_levels.HELDOUT_SPLIT) for i in range(config.scenes)]
      self.tasks[level] = tasks
      self.rows[level] = [grounding.scene_example(t, tokenizer, grounding_config, task_config, rng, image=self.image)
                          for t in tasks]

  def run(self, model, greedy: bool = True) -> dict[str, float]:
    out = {}
    for level in self.config.levels:
      for k, v in self.teacher_forced(model, self.rows[level]).items():
        out[f"{level}/{k}"] = v
      if greedy:
        for k, v in self.greedy(model, self.tasks[level]).items():
          out[f"{level}/{k}"] = v
    return out

  def teacher_forced(self, model, rows) -> dict[str, float]:
    cfg = self.config
    batch_cfg = batch_lib.BatchConfig(batch_size=cfg.batch_size, pad_token_id=self.model_config.text.pad_token_id)
    graphdef, params = nnx.split(model)
    correct_fn = probe_lib.correct_fn(graphdef)
    hits, counts = collections.Counter(), collections.Counter()
    seen = {r: collections.Counter() for r in ROLES}
    for start in range(0, len(rows), cfg.batch_size):
      chunk = rows[start:start + cfg.batch_size]
      batch = batch_lib.collate_sft(chunk, self.model_config, batch_cfg, seq_len=cfg.seq_len,
                                    num_patches=cfg.num_patches)
      targets, _ = losses.next_token_targets(batch.inputs.input_ids, batch.loss_mask)
      correct = np.asarray(correct_fn(params, batch.inputs, jnp.asarray(targets)))
      for r, ex in enumerate(chunk):
        ids = [int(i) for i in ex["input_ids"]]
        roles = token_roles([self.tokenizer.decode([i]) for i in ids], ex["kinds"])
        for t in range(1, len(ids)):
          if roles[t] is not None:
            hits[roles[t]] += float(correct[r, t - 1])
            counts[roles[t]] += 1
            seen[roles[t]][ids[t]] += 1
    out = {f"tf_{k}": hits[k] / counts[k] for k in ROLES if counts[k]}
    out.update({f"prior_{k}": max(seen[k].values()) / counts[k] for k in ROLES if counts[k]})
    return out

  def _prompt(self, images, question: str, kind: str = "locate"):
    """(input ids, pixel values, [images, 3] grids) of a first turn asking `question` about `images`."""
    content = grounding.first_turn(question, self.question_first, kind)
    return self._encode(images, [{"role": "user", "content": content}])

  def _encode(self, images, messages):
    """(input ids, pixel values, [images, 3] grids) of the chat `messages` (ending in a user turn) on `images`."""
    processed = [image_lib.preprocess_image(im, self.task_config.view_min_pixels, self.task_config.view_max_pixels,
                                            **self.image) for im in images]
    grids = [g for _, g in processed]
    enc = chat.tokenize_conversation(self.tokenizer, messages, grids, add_generation_prompt=True)
    return enc["input_ids"], np.concatenate([pv for pv, _ in processed]), np.stack(grids)

  def _generate(self, model, prompts, max_new_tokens: int) -> list[str]:
    texts = []
    for start in range(0, len(prompts), self.config.batch_size):
      chunk = prompts[start:start + self.config.batch_size]
      width = max(len(p[0]) for p in chunk)
      ids = np.full((len(chunk), width), self.model_config.text.pad_token_id, np.int32)
      mask = np.zeros_like(ids)
      for r, (p, _, _) in enumerate(chunk):  # left padding
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
      out = generate(model, ids, mask, np.concatenate([c[1] for c in chunk]), np.concatenate([c[2] for c in chunk]),
                     max_new_tokens=max_new_tokens, temperature=0.0,
                     pad_token_id=self.model_config.text.pad_token_id)
      texts += [self.tokenizer.decode(out.tokens[r, :out.lengths[r]], skip_special_tokens=False)
                for r in range(len(chunk))]
    return texts

  def _agent_prompt(self, task, kind: str, rng: np.random.Generator, nth: int = 0):
    """The target's `nth` question of `kind` as prompt_form="agent" rows ask it: the search's first turn
    ("locate"), or after it the gold answers and the observations up to that zoom's or the read's; None where the
    row asks none."""
    cfg = dataclasses.replace(self.grounding_config, locate=1, read=int(kind == "read"), target_first=True)
    questions = grounding.scene_questions(task, cfg, rng)
    asked = [n for n, q in enumerate(questions) if q[0] == kind]
    if len(asked) <= nth:
      return None
    asked = asked[nth]
    questions = questions[:asked + 1]
    messages = grounding.scene_messages(questions, self.question_first)[:-1]
    return self._encode(grounding.scene_views(task, questions, self.task_config, cfg), messages)

  def greedy(self, model, tasks) -> dict[str, float]:
    answer_form = self.grounding_config.answer_form
    view = lambda t, box: synthetic.render_view(t.image, box, self.task_config)
    target = lambda t: next(o for o in t.objects if o.is_target)
    if self.grounding_config.prompt_form == "agent":
      rng = np.random.default_rng(0)  # the task question's wording
      locate = [self._agent_prompt(t, "locate", rng) for t in tasks]
      read = [self._agent_prompt(t, "read", rng) for t in tasks]
    else:
      locate = [self._prompt([view(t, None)], grounding.locate_question(grounding.object_name(target(t))))
                for t in tasks]
      read = [self._prompt([view(t, None), view(t, target(t).zoom_path[-1])],
                           grounding.read_question(grounding.object_name(target(t)), answer_form), "read")
              for t in tasks]
    agent = answer_form == "agent"
    on_target, on_object, iou50, reads, read_digits, cells = [], [], [], [], [], []
    for t, text in zip(tasks, self._generate(model, locate, 40 if agent else 20 + 2 * self.cell_first)):
      if self.cell_first:
        named = re.search(re.escape(_NAMED_CELL) + r"(\d)", text) if agent else None
        cell = named.group(1) if named else ("" if agent else text.strip()[:1])
        cells.append(cell == str(coldstart.grid_cell(t.target_box)))
      action = tools.parse_action(tools.truncate_at_stop(text))
      box = action.bbox if isinstance(action, tools.ToolCall) else None
      on_target.append(box is not None and diagnostics.centre_in(t.target_box, box))
      on_object.append(box is not None and any(diagnostics.centre_in(o.box, box) for o in t.objects))
      iou50.append(box is not None and iou(box, t.target_box) >= 0.5)
    for t, text in zip(tasks, self._generate(model, read, 20 if agent else 8)):
      reads.append(tools.parse_action(tools.truncate_at_stop(text)) == tools.FinalAnswer(t.answer))
      read_digits.append(next((c for c in text if c.isdigit()), None) == t.answer)
    out = {"on_target": float(np.mean(on_target)), "on_object": float(np.mean(on_object)),
           "iou50": float(np.mean(iou50)), "read": float(np.mean(reads)), "read_digit": float(np.mean(read_digits))}
    if self.cell_first:  # the cell the answer starts with: the target's?
      out["cell"] = float(np.mean(cells))
    if self.grounding_config.zoom:
      out.update(self.greedy_zoom(model, tasks))
    return out

  def greedy_zoom(self, model, tasks) -> dict[str, float]:
    """zoom_hit and zoom_cell, and with zoom=2 object_hit and object_cell (module docstring), over the tasks whose
    target's legible crop lies in the image it is asked from."""
    out = {}
    via_object = self.grounding_config.zoom == 2
    for nth, name in enumerate(("object", "zoom") if via_object else ("zoom",)):
      rng = np.random.default_rng(1)
      asked = [(t, p) for t in tasks if (p := self._agent_prompt(t, "zoom", rng, nth)) is not None]
      texts = self._generate(model, [p for _, p in asked], 24)
      scored = [score_zoom(text, t, self.grounding_config.decimals, nth, via_object) for (t, _), text in zip(asked, texts)]
      if asked:
        out.update({f"{name}_hit": float(np.mean([h for h, _ in scored])),
                    f"{name}_cell": float(np.mean([c for _, c in scored]))})
    return out


def score_zoom(text: str, task, decimals: int, nth: int = 0, via_object: bool = False) -> tuple[bool, bool]:
  """(hit, cell) of the `nth` zoom answer `text` of the search for `task`'s target (`coldstart.reflex_search`,
  `via_object` as the rows ask it), after the gold calls before it: hit, its call's crop of the last observation
  holds what the scripted zoom aims at (the target's digit for the legible zoom, the whole shape for its object's
  zoom) and is no larger than the scripted zoom's plus one step of the written box's grid (larger crops turn
  illegible); cell, it starts with the scripted zoom's cell."""
  target = next(o for o in task.objects if o.is_target)
  gold = coldstart.reflex_search(task, target, decimals, via_object)
  parent, scripted = gold.regions[nth], gold.regions[nth + 1]
  cell = text.strip()[:1] == gold.calls[nth + 1][:1]
  action = tools.parse_action(tools.truncate_at_stop(text))
  if not (isinstance(action, tools.ToolCall) and action.source == f"observation_{nth + 1}"):
    return False, cell
  region = coldstart.crop_region(action.bbox, parent, gold.observations[nth].size)
  step = 10.0**-decimals * (parent[2] - parent[0])  # one step of the written box, in the original
  small = all(region[k + 2] - region[k] <= scripted[k + 2] - scripted[k] + step + 1e-9 for k in (0, 1))
  aim = target.detail_box if nth + 2 == len(gold.calls) else target.box
  return small and coldstart.contains(region, aim), cell


def probe_export(path: str, questions: grounding.GroundingConfig, task_config: synthetic.SyntheticConfig,
                 config: ProbeConfig, seed: int) -> dict[str, float]:
  """The probe's table (greedy included) for an exported base, read back from its directory's files alone:
  its config, weights, tokenizer and chat template."""
  model, model_config = hf.load_pretrained(path)
  return GroundingProbe(config, questions, task_config, tok_lib.load_tokenizer(path), model_config,
                        seed=seed).run(model, greedy=True)


def redo_check(path: str, check: dict, task_config: synthetic.SyntheticConfig) -> dict[str, float]:
  """`probe_export` with the settings an export's skills_check.json records (`check`), in `task_config`'s world with
  the recorded label shade: what a copy of the directory must reproduce."""
  probe = ProbeConfig(levels=tuple(check["levels"]), scenes=check["scenes"], seq_len=check["seq_len"],
                      num_patches=check["num_patches"])
  world = dataclasses.replace(task_config, label_shade=check.get("label_shade", 0.0))
  return probe_export(path, grounding.GroundingConfig(**check["questions"]), world, probe, seed=check["seed"])


def format_skills(skills: dict[str, float]) -> str:
  return " ".join(f"{k}={100 * v:.0f}" for k, v in skills.items() if not k.split("/")[-1].startswith("prior"))
