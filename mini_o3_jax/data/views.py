"""What the model sees of a scene: the image processor's view size, the crop tool's crops, boxes projected
into a view, and the crop sides that the view budget shows in full (the zoom paths' sizes).

Views use the crop tool's own pixel box and LANCZOS upscale and `smart_resize`, so what the generator calls
legible is what the agent gets.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

from PIL import Image

from mini_o3_jax.agent import tools
from mini_o3_jax.data import drawing
from mini_o3_jax.data.scene import Box, SyntheticConfig
from mini_o3_jax.processing.image import smart_resize

def view_size(image_size: tuple[int, int], config: SyntheticConfig) -> tuple[int, int]:
  """(width, height) the image processor resizes an image of PIL size `image_size` to."""
  width, height = image_size
  h, w = smart_resize(height, width, config.patch_size * config.merge_size,
                      config.view_min_pixels, config.view_max_pixels)
  return w, h


# The crop tool's own geometry, so views and zoom paths are exactly what the agent gets.
pixel_box = tools.pixel_box


def crop_image(image: Image.Image, box_rel: Sequence[float] | None,
               min_side: int = 28) -> Image.Image:
  """Crops a relative box of full-resolution `image`, LANCZOS-upscaled so no side is < min_side."""
  if box_rel is None:
    return image
  return tools.upscale_to_min_side(image.crop(pixel_box(box_rel, image.size)), min_side)


def render_view(image: Image.Image, box_rel: Sequence[float] | None,
                config: SyntheticConfig) -> Image.Image:
  """What the model sees: crop `box_rel` (None = whole image), then resize to the view budget."""
  region = crop_image(image, box_rel)
  size = view_size(region.size, config)
  if size == region.size:
    return region
  return region.resize(size, Image.Resampling.BICUBIC)


def project_box(box_rel: Sequence[float], crop_rel: Sequence[float] | None,
                image_size: tuple[int, int], config: SyntheticConfig) -> Box:
  """A relative box of the original image in the pixel coordinates of `render_view(crop_rel)`.

  Continuous coordinates: pixel i spans [i, i + 1). Assumes crops of >= 28 px sides (no LANCZOS
  step), which all zoom paths satisfy.
  """
  w, h = image_size
  cx0, cy0, cx1, cy1 = pixel_box(crop_rel if crop_rel is not None else (0, 0, 1, 1), image_size)
  vw, vh = view_size((cx1 - cx0, cy1 - cy0), config)
  sx, sy = vw / (cx1 - cx0), vh / (cy1 - cy0)
  x0, y0, x1, y1 = box_rel
  return ((x0 * w - cx0) * sx, (y0 * h - cy0) * sy, (x1 * w - cx0) * sx, (y1 * h - cy0) * sy)


def view_scale(side: int, config: SyntheticConfig) -> float:
  """View pixels per scene pixel for a square crop of `side` pixels."""
  vw, _ = view_size((side, side), config)
  return vw / side


def fits_budget(side: int, config: SyntheticConfig) -> bool:
  """Whether a square crop is shown at (close to) the full budget, never above it."""
  vw, vh = view_size((side, side), config)
  area = vw * vh
  # Qwen's floor/ceil arithmetic sometimes lands a step below (84x84) or above (140x140) the
  # budget for a crop of a given side; zoom boxes avoid those sides.
  return area <= config.view_max_pixels and (
      area >= 0.7 * config.view_max_pixels or side * side < config.view_min_pixels)


@functools.lru_cache(maxsize=256)
def final_zoom_side(cell_px: int, config: SyntheticConfig) -> int:
  """Largest square crop side at which one font cell spans >= legible_font_view_px view pixels."""
  need = config.legible_font_view_px / cell_px
  upper = int(math.ceil(math.sqrt(config.view_max_pixels) / need)) + 1
  for side in range(upper, drawing.FONT_H * cell_px, -1):
    if view_scale(side, config) >= need and fits_budget(side, config):
      return side
  raise ValueError(f"no crop side makes a {cell_px}px font cell legible under {config}")


@functools.lru_cache(maxsize=4096)
def nearest_budget_side(side: float, config: SyntheticConfig, limit: int) -> int:
  """The crop side closest to `side` (<= limit) that is shown at the full view budget."""
  target = int(round(side))
  for delta in range(0, max(target, 1)):
    for cand in (target - delta, target + delta):
      if 8 <= cand <= limit and fits_budget(cand, config):
        return cand
  return min(target, limit)
