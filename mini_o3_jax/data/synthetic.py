"""Synthetic visual-search tasks that need zooming, sized by the view budget.

A scene is a noisy grey canvas with coloured shapes scattered without overlap. Every shape carries a
small label with a digit drawn in a bitmap font (`data.drawing`) (no system fonts, so pixels are
identical on every machine). The question names one shape by its colour and shape ("the red
triangle"); the answer is the digit on its label.

Sizes are derived from the image processor's view of the scene, so the claims hold by construction
rather than by tuning:

* every shape spans `object_view_px` (>= 1 patch of 14 px) in the full-image view, so the cue that
  names the target is visible in the first observation;
* a digit is one scene pixel per font cell and at most `TierSpec.glyph_full_view_px` (< 1) view
  pixels tall in the full view. Its 5x7 glyph has the same ink and the same ink centroid as every
  other digit, and its label's colours average to the shape's colour, so what survives the resize
  (the lowest moments) says nothing about the digit and barely shows the label;
* the last box of `zoom_path` is the largest crop whose view shows each font cell at least
  `legible_font_view_px` view pixels wide, so the digit is legible there.

Tiers (as VisualProbe's easy / medium / hard):

* easy: no other shape shares the target's colour or shape; the label sits at the centre of the
  shape's box; one zoom (a small box on the blob's centre) reads it.
* medium: 2-3 look-alikes share the colour *or* the shape; the label sits anywhere on the shape and
  only shows once zoomed; two zooms (the object, then its label).
* hard: 5-8 look-alikes of confusable colours and shapes (red / orange / pink, circle / hexagon);
  three zooms (a region, the object, the label).

Determinism: item `index` of `split` is generated from its own `np.random.default_rng` seeded with
(config.seed, tier, split, index), so any item can be regenerated alone, on any machine.

`view_size` is the image processor's `smart_resize` and `render_view` crops with the crop tool's own
pixel box and LANCZOS upscale, so what the generator calls legible is what the agent sees.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from mini_o3_jax.data import drawing
# The world's types and its view geometry, under the names this module has always offered.
from mini_o3_jax.data.scene import (DEFAULT_PALETTE, DIGITS, EASY, HARD, MEDIUM, SHAPES, SPLITS, TIERS, Box,  # noqa: F401
                                    PixelBox, SceneObject, SyntheticConfig, SyntheticTask, TierSpec)
from mini_o3_jax.data.views import (crop_image, final_zoom_side, nearest_budget_side, pixel_box,  # noqa: F401
                                    project_box, render_view, view_size)

_SIMILAR_COLOURS = {
    "red": ("orange", "pink"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "green"),
    "green": ("cyan", "yellow"),
    "cyan": ("green", "blue"),
    "blue": ("purple", "cyan"),
    "purple": ("blue", "pink"),
    "pink": ("purple", "red"),
}
_SIMILAR_SHAPES = {
    "circle": ("hexagon", "square"),
    "square": ("hexagon", "diamond"),
    "triangle": ("diamond", "hexagon"),
    "diamond": ("triangle", "square"),
    "hexagon": ("circle", "square"),
    "cross": ("square", "diamond"),
}
QUESTIONS = (  # the task's question, naming its target: one of these
    "What is the digit written on the {colour} {shape}?",
    "Which digit is printed on the {colour} {shape}?",
    "Read the digit on the label of the {colour} {shape}.",
    "What number is shown on the {colour} {shape}?",
)


# ----------------------------------------------------------------------------- generation


def _rng(config: SyntheticConfig, tier: str, split: str, index: int) -> np.random.Generator:
  # crc32 rather than hash(): Python salts str hashes per process.
  entropy = [config.seed, TIERS.index(tier), zlib.crc32(split.encode()), index]
  return np.random.default_rng(np.random.SeedSequence(entropy))


def task_id(tier: str, split: str, index: int) -> str:
  return f"synthetic-{tier}-{split}-{index:07d}"


def parse_task_id(item_id: str) -> tuple[str, str, int]:
  """Inverse of `task_id`."""
  prefix, tier, split, index = item_id.split("-")
  if prefix != "synthetic":
    raise ValueError(f"not a synthetic task id: {item_id!r}")
  return tier, split, int(index)


def is_task_id(item_id: str | None) -> bool:
  return bool(item_id) and item_id.startswith("synthetic-") and item_id.count("-") == 3


def task_from_id(item_id: str, config: SyntheticConfig) -> SyntheticTask:
  """The task a `task_id` names, regenerated (a task is a pure function of its id and the config)."""
  tier, split, index = parse_task_id(item_id)
  return make_task(tier, index, config, split)


def _scene_size(rng: np.random.Generator, config: SyntheticConfig) -> tuple[int, int]:
  """(width, height) with a full-budget view (avoids sizes Qwen's rounding maps to 84x84)."""
  lo, hi = config.scene_size_range
  size = (int(hi), int(hi))
  for _ in range(64):
    longer = int(rng.integers(lo, hi + 1))
    aspect = float(rng.uniform(*config.aspect_range))
    if aspect >= 1.0:
      size = (longer, max(56, int(round(longer / aspect))))
    else:
      size = (max(56, int(round(longer * aspect))), longer)
    vw, vh = view_size(size, config)
    if vw * vh >= 0.7 * config.view_max_pixels:
      return size
  return size


def _place_boxes(rng: np.random.Generator, sides: Sequence[int], size: tuple[int, int],
                 gap: int, required: int) -> list[PixelBox]:
  """Non-overlapping square boxes; the first `required` must be placed, the rest may be dropped."""
  w, h = size
  placed = np.zeros((0, 4), np.int64)
  boxes: list[PixelBox] = []
  for i, s in enumerate(sides):
    for _ in range(20):
      xs = rng.integers(0, w - s + 1, size=64)
      ys = rng.integers(0, h - s + 1, size=64)
      if len(placed):
        # Separated along x or along y by at least `gap` from every placed box.
        sep = ((xs[:, None] + s + gap <= placed[None, :, 0]) |
               (placed[None, :, 2] + gap <= xs[:, None]) |
               (ys[:, None] + s + gap <= placed[None, :, 1]) |
               (placed[None, :, 3] + gap <= ys[:, None]))
        ok = np.flatnonzero(sep.all(axis=1))
      else:
        ok = np.arange(64)
      if len(ok):
        j = ok[0]
        box = (int(xs[j]), int(ys[j]), int(xs[j]) + s, int(ys[j]) + s)
        boxes.append(box)
        placed = np.vstack([placed, np.array(box)[None]])
        break
    else:
      if i < required:
        raise RuntimeError("could not place the target and its look-alikes")
      boxes.append(None)  # type: ignore[arg-type]
  return boxes


def _attributes(rng: np.random.Generator, spec: TierSpec, config: SyntheticConfig,
                n_objects: int) -> tuple[list[tuple[str, str]], int, str]:
  """(colour, shape) per object (target first, then look-alikes), #look-alikes, category."""
  colours = [name for name, _ in config.palette]
  shapes = list(config.shapes)
  t_colour = colours[rng.integers(len(colours))]
  t_shape = shapes[rng.integers(len(shapes))]
  n_look = int(rng.integers(spec.num_lookalikes[0], spec.num_lookalikes[1] + 1))
  n_look = min(n_look, n_objects - 1)
  if spec.lookalike_kind == "none":
    kinds, category = [], "unique"
  elif spec.lookalike_kind in ("one", "colour"):
    kind = "colour" if spec.lookalike_kind == "colour" or rng.random() < 0.5 else "shape"
    kinds, category = [kind] * n_look, f"same_{kind}"
  else:
    kinds = ["colour" if rng.random() < 0.5 else "shape" for _ in range(n_look)]
    kinds[0], kinds[-1] = "colour", "shape"  # both kinds of confusion in every hard scene
    category = "mixed"
  other_colours = [c for c in colours if c != t_colour]
  other_shapes = [s for s in shapes if s != t_shape]
  attrs = [(t_colour, t_shape)]
  for kind in kinds:
    if kind == "colour":  # same colour, another shape
      pool = [s for s in _SIMILAR_SHAPES.get(t_shape, ()) if s in other_shapes]
      pool = pool if spec.confusable and pool else other_shapes
      attrs.append((t_colour, pool[rng.integers(len(pool))]))
    else:  # same shape, another colour
      pool = [c for c in _SIMILAR_COLOURS.get(t_colour, ()) if c in other_colours]
      pool = pool if spec.confusable and pool else other_colours
      attrs.append((pool[rng.integers(len(pool))], t_shape))
  for _ in range(n_objects - 1 - n_look):
    attrs.append((other_colours[rng.integers(len(other_colours))],
                  other_shapes[rng.integers(len(other_shapes))]))
  return attrs, n_look, category


def _glyph_cell(spec: TierSpec, scale: float) -> int:
  """Largest font cell (scene px) whose glyph stays <= glyph_full_view_px in the full view."""
  return max(1, int(math.floor(spec.glyph_full_view_px / (drawing.FONT_H * scale) + 1e-9)))


def _label_box(rng: np.random.Generator, shape: str, box: PixelBox, plate_w: int, plate_h: int,
               centre: bool) -> tuple[int, int]:
  """Top-left corner of a plate that lies inside the shape.

  `centre`: at the centre of the shape's bounding box, where an agent that saw only a blob would
  zoom; otherwise uniformly inside one of the shape's label regions.
  """
  x0, y0, x1, _ = box
  s = x1 - x0
  bounds = []
  for u0, v0, u1, v1 in drawing.LABEL_REGIONS[shape]:
    lo_x, hi_x = x0 + math.ceil(u0 * s), x0 + math.floor(u1 * s) - plate_w
    lo_y, hi_y = y0 + math.ceil(v0 * s), y0 + math.floor(v1 * s) - plate_h
    if lo_x <= hi_x and lo_y <= hi_y:
      bounds.append((lo_x, hi_x, lo_y, hi_y))
  if not bounds:
    raise ValueError(f"a {plate_w}x{plate_h} label does not fit in a {s}px {shape}")
  if centre:
    px, py = x0 + (s - plate_w) // 2, y0 + (s - plate_h) // 2
    for lo_x, hi_x, lo_y, hi_y in bounds:
      if lo_x <= px <= hi_x and lo_y <= py <= hi_y:
        return px, py
    lo_x, hi_x, lo_y, hi_y = bounds[0]
    return (lo_x + hi_x) // 2, (lo_y + hi_y) // 2
  lo_x, hi_x, lo_y, hi_y = bounds[rng.integers(len(bounds))]
  return int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))


def _square_around(cx: float, cy: float, side: int, size: tuple[int, int],
                   inside: PixelBox | None = None) -> PixelBox:
  """A side x side box centred near (cx, cy), shifted into the image (and into `inside`)."""
  w, h = size
  lx0, ly0, lx1, ly1 = inside if inside is not None else (0, 0, w, h)
  side = min(side, lx1 - lx0, ly1 - ly0)
  x0 = int(round(cx - side / 2))
  y0 = int(round(cy - side / 2))
  x0 = min(max(x0, lx0), lx1 - side)
  y0 = min(max(y0, ly0), ly1 - side)
  return x0, y0, x0 + side, y0 + side


def _rel(box: PixelBox, size: tuple[int, int]) -> Box:
  w, h = size
  return (box[0] / w, box[1] / h, box[2] / w, box[3] / h)


def _zoom_path(rng: np.random.Generator, spec: TierSpec, config: SyntheticConfig,
               obj: PixelBox, glyph: PixelBox, cell: int, size: tuple[int, int]
               ) -> list[PixelBox]:
  """Nested square pixel boxes, coarse to fine, ending at the legible crop of `glyph`."""
  s = obj[2] - obj[0]
  limit = min(size)
  boxes: list[PixelBox] = []
  parent: PixelBox | None = None
  ocx, ocy = (obj[0] + obj[2]) / 2, (obj[1] + obj[3]) / 2
  for factor in spec.zoom_sides:
    side = nearest_budget_side(factor * s, config, limit)
    # Off-centre by up to a quarter of the slack, so paths vary; the object stays inside.
    slack = max(0, side - s)
    jx, jy = rng.uniform(-slack / 4, slack / 4, size=2) if slack else (0.0, 0.0)
    parent = _square_around(ocx + jx, ocy + jy, side, size, parent)
    boxes.append(parent)
  final = final_zoom_side(cell, config)
  gcx, gcy = (glyph[0] + glyph[2]) / 2, (glyph[1] + glyph[3]) / 2
  boxes.append(_square_around(gcx, gcy, final, size, parent))
  return boxes


def make_task(tier: str, index: int, config: SyntheticConfig = SyntheticConfig(),
              split: str = "train") -> SyntheticTask:
  """Item `index` of `split` in `tier`; a pure function of its arguments."""
  spec = config.tier(tier)
  rng = _rng(config, tier, split, index)
  size = _scene_size(rng, config)
  vw, vh = view_size(size, config)
  scale = min(vw / size[0], vh / size[1])  # view px per scene px (the coarser axis)
  fine_scale = max(vw / size[0], vh / size[1])
  cell = _glyph_cell(spec, fine_scale)
  if drawing.FONT_H * cell * fine_scale > spec.glyph_full_view_px + 1e-9:
    raise ValueError(
        f"a {size[0]}x{size[1]} scene is too small for a {tier} digit of at most "
        f"{spec.glyph_full_view_px} view px under a {vw}x{vh} view: use scenes of at least "
        f"{math.ceil(drawing.FONT_H * max(vw, vh) / spec.glyph_full_view_px)} px or a larger bound")
  # Shapes are sized in view pixels, so each is >= ~1 patch in the first observation.
  lo, hi = (v / scale for v in config.object_view_px)
  n_objects = int(rng.integers(spec.num_objects[0], spec.num_objects[1] + 1))
  attrs, n_look, category = _attributes(rng, spec, config, n_objects)
  sides = [int(round(rng.uniform(lo, hi))) for _ in attrs]
  gap = int(math.ceil(config.object_gap_view_px / scale))
  boxes = _place_boxes(rng, sides, size, gap, required=1 + n_look)
  digits = [DIGITS[rng.integers(10)] for _ in attrs]
  target_digit = digits[0]
  for i in range(1, 1 + n_look):  # a wrong look-alike must give a wrong answer
    if digits[i] == target_digit:
      digits[i] = DIGITS[(int(target_digit) + 1 + int(rng.integers(9))) % 10]

  image = drawing.background(rng, size)
  draw = ImageDraw.Draw(image)
  rgb = dict(config.palette)
  objects: list[SceneObject] = []
  for i, ((colour, shape), box, digit) in enumerate(zip(attrs, boxes, digits)):
    if box is None:
      continue
    jitter = rng.integers(-12, 13, size=3).tolist()
    fill = tuple(min(255, max(0, c + j)) for c, j in zip(rgb[colour], jitter))
    drawing.draw_shape(draw, shape, box, fill)
    # Plate margins of 1-2 cells per side, drawn at random, so the plate's outline in a blurry view
    # does not pin down where the glyph's ink sits.
    ml, mr, mt, mb = (int(m) * cell for m in rng.integers(1, 3, size=4))
    plate_w, plate_h = drawing.FONT_W * cell + ml + mr, drawing.FONT_H * cell + mt + mb
    px, py = _label_box(rng, shape, box, plate_w, plate_h, spec.label_at_centre)
    label_mean = tuple(int(round(c * (1.0 - config.label_shade))) for c in fill)
    paper, ink = drawing.label_colours(label_mean, plate_w * plate_h, drawing.INK_CELLS * cell * cell,
                                       lift=int(rng.integers(50, 71)))
    draw.rectangle((px, py, px + plate_w - 1, py + plate_h - 1), fill=paper)
    gx, gy = px + ml, py + mt
    draw.bitmap((gx, gy), drawing.glyph_mask(digit, cell), fill=ink)
    glyph = (gx, gy, gx + drawing.FONT_W * cell, gy + drawing.FONT_H * cell)
    path = _zoom_path(rng, spec, config, box, glyph, cell, size)
    objects.append(SceneObject(
        shape=shape, colour=colour, digit=digit, box=_rel(box, size),
        detail_box=_rel(glyph, size), zoom_path=tuple(_rel(b, size) for b in path),
        is_target=i == 0, is_lookalike=i <= n_look))

  target = objects[0]
  candidates = [o.box for o in objects if o.is_lookalike]
  order = rng.permutation(len(candidates))
  question = QUESTIONS[rng.integers(len(QUESTIONS))].format(colour=target.colour,
                                                               shape=target.shape)
  return SyntheticTask(
      id=task_id(tier, split, index), image=image, question=question, answer=target.digit,
      options=None, difficulty=tier, category=category, target_box=target.box,
      detail_box=target.detail_box, candidate_boxes=tuple(candidates[j] for j in order),
      zoom_path=target.zoom_path, objects=tuple(objects), glyph_cell_px=cell)


def generate_split(tier: str, split: str, n: int, config: SyntheticConfig = SyntheticConfig(),
                   start: int = 0) -> Iterator[SyntheticTask]:
  """Items start .. start + n - 1 of (tier, split)."""
  for index in range(start, start + n):
    yield make_task(tier, index, config, split)


# ----------------------------------------------------------------------------- reading, debugging


def describe(task: SyntheticTask, config: SyntheticConfig = SyntheticConfig()) -> str:
  """A few human-readable lines about a task."""
  w, h = task.image.size
  vw, vh = view_size((w, h), config)
  fmt = lambda b: "[" + ", ".join(f"{c:.3f}" for c in b) + "]"
  lines = [
      f"{task.id}: {task.question} -> {task.answer} ({task.difficulty}, {task.category})",
      f"  image {w}x{h}, full view {vw}x{vh}, font cell {task.glyph_cell_px}px, "
      f"{len(task.objects)} objects, {len(task.candidate_boxes)} candidates",
      f"  target {fmt(task.target_box)} detail {fmt(task.detail_box)}",
  ]
  for k, box in enumerate(task.zoom_path, 1):
    x0, y0, x1, y1 = pixel_box(box, (w, h))
    gx0, gy0, gx1, gy1 = project_box(task.detail_box, box, (w, h), config)
    lines.append(f"  zoom {k}: {fmt(box)} = {x1 - x0}x{y1 - y0}px, glyph {gy1 - gy0:.1f} view px "
                 f"tall")
  for o in task.objects:
    flag = "T" if o.is_target else ("L" if o.is_lookalike else " ")
    lines.append(f"  {flag} {o.colour:>6} {o.shape:<8} {o.digit} {fmt(o.box)}")
  return "\n".join(lines)


def save_examples_png(path: str, tasks: Sequence[SyntheticTask],
                      config: SyntheticConfig = SyntheticConfig(), thumb: int = 336) -> None:
  """Contact sheet: per task, the scene (target red, look-alikes orange, zooms yellow), the
  full low-res view and every zoom view, views upscaled with NEAREST so their pixels show."""
  pad = 8
  ncols = 2 + max((len(t.zoom_path) for t in tasks), default=0)
  sheet = Image.new("RGB", (pad + ncols * (thumb + pad), pad + len(tasks) * (thumb + 24 + pad)),
                    (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for r, task in enumerate(tasks):
    top = pad + r * (thumb + 24 + pad)
    # Captions use PIL's default font: debug output only, never part of the data.
    draw.text((pad, top), f"{task.id}  Q: {task.question}  A: {task.answer}  "
              f"({task.category})", fill=(0, 0, 0))
    top += 16
    w, h = task.image.size
    k = thumb / max(w, h)
    scene = task.image.resize((round(w * k), round(h * k)), Image.Resampling.LANCZOS)
    sd = ImageDraw.Draw(scene)
    for o in task.objects:
      if o.is_lookalike:
        sd.rectangle([c * d * k for c, d in zip(o.box, (w, h, w, h))],
                     outline=(255, 0, 0) if o.is_target else (255, 150, 0), width=2)
    for box in task.zoom_path:
      sd.rectangle([c * d * k for c, d in zip(box, (w, h, w, h))], outline=(255, 255, 0))
    sheet.paste(scene, (pad, top))
    views = [render_view(task.image, None, config)]
    views += [render_view(task.image, b, config) for b in task.zoom_path]
    for c, view in enumerate(views, 1):
      f = max(1, thumb // max(view.size))
      sheet.paste(view.resize((view.size[0] * f, view.size[1] * f), Image.Resampling.NEAREST),
                  (pad + c * (thumb + pad), top))
  sheet.save(path)
