"""The procedural visual-search world's vocabulary, as plain data: tiers, the generator's config, a scene's
objects and a task. `data.synthetic` generates tasks; `data.views` renders what the model sees of them.
"""

from __future__ import annotations

import dataclasses

from PIL import Image

from mini_o3_jax.data import drawing

Box = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]

TIERS = ("easy", "medium", "hard")
SPLITS = ("train", "test")
DIGITS = drawing.DIGITS  # the answers: the font's digits
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "cross")

DEFAULT_PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (215, 35, 35)),
    ("orange", (245, 135, 20)),
    ("yellow", (240, 215, 30)),
    ("green", (40, 160, 50)),
    ("cyan", (30, 200, 210)),
    ("blue", (35, 70, 215)),
    ("purple", (135, 50, 185)),
    ("pink", (245, 115, 185)),
)
# Look-alikes in the hard tier take a confusable colour / shape from these lists.


@dataclasses.dataclass(frozen=True)
class TierSpec:
  """How one difficulty tier builds its scenes.

  Attributes:
    num_objects: inclusive range of shapes per scene, the target included.
    num_lookalikes: inclusive range of shapes sharing the target's colour or shape.
    lookalike_kind: "none", "one" (all share the colour, or all the shape), "mixed", or "colour" (all share
      the colour: only the shape's kind tells them apart).
    confusable: look-alikes take a similar colour / shape (red vs orange, circle vs hexagon).
    glyph_full_view_px: upper bound on the digit's height in the full-image view.
    label_at_centre: label at the centre of the shape's box (else anywhere inside the shape).
    zoom_sides: sides of the zooms before the last one, in units of the target's side.
  """
  num_objects: tuple[int, int]
  num_lookalikes: tuple[int, int]
  lookalike_kind: str
  confusable: bool
  glyph_full_view_px: float
  label_at_centre: bool
  zoom_sides: tuple[float, ...]

  def __post_init__(self):
    if self.lookalike_kind not in ("none", "one", "mixed", "colour"):
      raise ValueError(f"lookalike_kind {self.lookalike_kind!r}: expected 'none', 'one', 'mixed' or 'colour'")


EASY = TierSpec(num_objects=(5, 8), num_lookalikes=(0, 0), lookalike_kind="none",
                confusable=False, glyph_full_view_px=0.9, label_at_centre=True, zoom_sides=())
MEDIUM = TierSpec(num_objects=(8, 11), num_lookalikes=(2, 3), lookalike_kind="one",
                  confusable=False, glyph_full_view_px=0.9, label_at_centre=False,
                  zoom_sides=(2.0,))
HARD = TierSpec(num_objects=(12, 16), num_lookalikes=(5, 8), lookalike_kind="mixed",
                confusable=True, glyph_full_view_px=0.9, label_at_centre=False,
                zoom_sides=(3.5, 2.0))


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Scene, view budget and tier parameters.

  The view budget is the image processor's: every image (the scene and every crop) is resized to
  `smart_resize(h, w, 28, view_min_pixels, view_max_pixels)`. With min == max (the default) every
  observation is shown at the same ~112x112 budget, so cropping a box of relative side s gives 1/s
  times the resolution on that region; set `view_min_pixels` lower to mimic Qwen's default instead
  (small crops are then shown at fewer pixels, and final zoom boxes shrink accordingly).
  """
  scene_size_range: tuple[int, int] = (896, 1024)  # longer side, pixels
  aspect_range: tuple[float, float] = (1.0, 1.0)  # width / height
  view_max_pixels: int = 112 * 112
  view_min_pixels: int = 112 * 112
  patch_size: int = 14
  merge_size: int = 2
  object_view_px: tuple[float, float] = (14.0, 18.0)  # shape side in the full view
  object_gap_view_px: float = 2.0
  legible_font_view_px: float = 2.0  # view pixels per font cell at the last zoom
  # How much darker than its shape the label's mean colour is, as a fraction of the shape's colour. At 0 the label's
  # paper and ink average to the shape's colour, so where the glyph is not resolved the label is a texture with no
  # mean of its own; above 0 it is also a darker spot at every scale (as a real photograph's label usually is).
  label_shade: float = 0.0
  easy: TierSpec = EASY
  medium: TierSpec = MEDIUM
  hard: TierSpec = HARD
  palette: tuple[tuple[str, tuple[int, int, int]], ...] = DEFAULT_PALETTE
  shapes: tuple[str, ...] = SHAPES
  seed: int = 0

  def __post_init__(self):
    if not 0.0 <= self.label_shade < 1.0:
      raise ValueError(f"label_shade {self.label_shade}: expected a fraction in [0, 1)")

  def tier(self, name: str) -> TierSpec:
    if name not in TIERS:
      raise ValueError(f"unknown tier {name!r}; expected one of {TIERS}")
    return getattr(self, name)


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One shape in a scene; boxes are relative [x0, y0, x1, y1] of the original image."""
  shape: str
  colour: str
  digit: str
  box: Box
  detail_box: Box  # the digit's glyph
  zoom_path: tuple[Box, ...]  # what a perfect agent crops to read this shape's digit
  is_target: bool
  is_lookalike: bool  # shares the target's colour or shape (the target counts as one)


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """One visual-search item; boxes are relative [x0, y0, x1, y1] of the original image."""
  id: str
  image: Image.Image
  question: str
  answer: str
  options: None
  difficulty: str
  category: str
  target_box: Box
  detail_box: Box
  candidate_boxes: tuple[Box, ...]  # target and look-alikes, shuffled
  zoom_path: tuple[Box, ...]  # nested, coarse to fine; the digit is legible at the last
  objects: tuple[SceneObject, ...]
  glyph_cell_px: int  # scene pixels per font cell
