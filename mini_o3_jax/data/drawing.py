"""The synthetic world's pixels: the bitmap font, the canvas, the shapes, label colours, a font reader.

Everything is drawn from these definitions (no system fonts), so a scene's pixels are identical on
every machine; `oracle_read` reads a digit back by template matching (a test of legibility, not a model).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

PixelBox = tuple[int, int, int, int]
DIGITS = tuple("0123456789")

FONT_W, FONT_H = 5, 7
# 5x7 digits with 17 ink cells each and their ink centroid within 1/17 cell of the grid's centre
# (2, 3). Below about one view pixel per glyph only the lowest moments of a glyph survive the
# resize: equal ink (zeroth moment) and a common centroid (first) leave almost nothing to read.
_FONT_ROWS = {
    "0": (".###.", "#...#", "#...#", "#.#.#", "#...#", "#...#", ".###."),
    "1": ("..###", ".###.", "###..", "..#..", "..#..", "..#..", "#####"),
    "2": ("#####", "....#", "....#", ".###.", "#....", "#....", "#####"),
    "3": ("####.", "#...#", "....#", ".###.", "....#", "#...#", "####."),
    "4": ("#..#.", "#..#.", "#..#.", "#####", "#..#.", "...#.", "..###"),
    "5": (".####", "#....", "#....", "#####", "....#", "....#", "####."),
    "6": ("..###", ".#..#", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..##.", ".##..", ".##..", "####."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "#..#.", "###.."),
}
INK_CELLS = 17
FONT: dict[str, np.ndarray] = {
    d: np.array([[c == "#" for c in row] for row in rows], dtype=bool)
    for d, rows in _FONT_ROWS.items()
}


# Rectangles (relative to the shape's bounding box) that lie inside the shape: labels go there.
LABEL_REGIONS = {
    "circle": ((0.17, 0.17, 0.83, 0.83),),
    "square": ((0.08, 0.08, 0.92, 0.92),),
    "triangle": ((0.31, 0.40, 0.69, 0.95),),
    "diamond": ((0.27, 0.27, 0.73, 0.73),),
    "hexagon": ((0.23, 0.16, 0.77, 0.84),),
    "cross": ((0.04, 0.33, 0.96, 0.67), (0.33, 0.04, 0.67, 0.96)),
}

def background(rng: np.random.Generator, size: tuple[int, int], texture: float = 1.0) -> Image.Image:
  """Tinted grey canvas with soft blotches and 2x2-pixel grain.

  Built at half resolution in uint8 and enlarged with NEAREST; the tint is a palette lookup (mode
  "P" -> "RGB"), which keeps a 1000 px scene at a few milliseconds. `texture` scales the blotches and
  grain about their mean level (0: a flat canvas; the issue-13 ladder's canvas rungs).
  """
  w, h = size
  hw, hh = (w + 1) // 2, (h + 1) // 2
  coarse = np.frombuffer(rng.bytes(max(2, h // 64) * max(2, w // 64)), np.uint8)
  coarse = (coarse % 28).reshape(max(2, h // 64), max(2, w // 64))
  blotch = np.asarray(Image.fromarray(coarse).resize((hw, hh), Image.Resampling.BILINEAR))
  grain = np.frombuffer(rng.bytes(hw * hh), np.uint8).reshape(hh, hw) & np.uint8(15)
  tex = blotch + grain
  if texture != 1.0:
    tex = np.round(texture * tex.astype(np.float32) + (1 - texture) * 21.0).astype(np.uint8)
  half = Image.fromarray(tex, mode="L").resize((w, h), Image.Resampling.NEAREST)
  base = int(rng.integers(80, 125))
  tint = rng.integers(-8, 9, size=3)
  levels = np.arange(256)[:, None] + base + tint[None, :]
  canvas = Image.frombytes("P", size, half.tobytes())
  canvas.putpalette(np.clip(levels, 0, 255).astype(np.uint8).ravel().tobytes())
  return canvas.convert("RGB")


@functools.lru_cache(maxsize=64)
def glyph_mask(digit: str, cell: int) -> Image.Image:
  """The digit's bitmap scaled by `cell`, as an "L" mask for ImageDraw.bitmap (read-only use)."""
  mask = np.kron(FONT[digit], np.ones((cell, cell), bool)).astype(np.uint8) * 255
  return Image.fromarray(mask, mode="L")


def shape_polygon(shape: str, x0: float, y0: float, s: float) -> list[tuple[float, float]]:
  rel = {
      "square": ((0, 0), (1, 0), (1, 1), (0, 1)),
      "triangle": ((0.5, 0), (1, 1), (0, 1)),
      "diamond": ((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)),
      "hexagon": ((0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5)),
      "cross": ((0.3, 0), (0.7, 0), (0.7, 0.3), (1, 0.3), (1, 0.7), (0.7, 0.7), (0.7, 1),
                (0.3, 1), (0.3, 0.7), (0, 0.7), (0, 0.3), (0.3, 0.3)),
  }[shape]
  # (s - 1): the polygon's last pixel column is x0 + s - 1, as for a box of side s.
  return [(x0 + u * (s - 1), y0 + v * (s - 1)) for u, v in rel]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: PixelBox,
                colour: tuple[int, int, int]) -> None:
  x0, y0, x1, _ = box
  if shape == "circle":
    draw.ellipse((x0, y0, x1 - 1, box[3] - 1), fill=colour)
  else:
    draw.polygon(shape_polygon(shape, x0, y0, x1 - x0), fill=colour)


def label_colours(fill: tuple[int, ...], plate_area: int, ink_area: int,
                   lift: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(paper, ink) colours whose area-weighted mean over the plate is the shape's colour.

  The paper is up to `lift` brighter than the shape and the ink darker by whatever balances it,
  channel by channel. So the label blends into its shape when it spans a view pixel or less (it
  cannot be spotted, let alone read, in the full view) yet shows high contrast once zoomed.
  """
  ratio = (plate_area - ink_area) / ink_area  # paper pixels per ink pixel
  paper, ink = [], []
  for c in fill:
    up = min(255 - c, lift)
    down = min(c, up * ratio)
    up = down / ratio  # rebalanced where the ink reached black
    paper.append(int(round(c + up)))
    ink.append(int(round(c - down)))
  return tuple(paper), tuple(ink)


def oracle_read(view: Image.Image, glyph_box_view: Sequence[float], search_px: float = 1.0,
                step_px: float = 0.25) -> str:
  """Reads a digit by template matching at a known scale and approximate position.

  A legibility oracle: for every shift of `glyph_box_view` (view pixel coordinates, see
  `project_box`) within +-search_px, samples the view's darkness on a 3x3 grid inside each font cell
  and correlates it with every digit's template; the digit with the best match at any shift wins.
  """
  grey = np.asarray(view.convert("L"), np.float32)
  x0, y0, x1, y1 = glyph_box_view
  sub = (np.arange(3) + 0.5) / 3
  shifts = np.arange(-search_px, search_px + 1e-9, step_px)
  # Sample coordinates (array index space) for every shift: [S, 3 * FONT_W] and [S, 3 * FONT_H].
  xs = x0 - 0.5 + shifts[:, None] + (
      (np.arange(FONT_W)[:, None] + sub).ravel() * (x1 - x0) / FONT_W)[None, :]
  ys = y0 - 0.5 + shifts[:, None] + (
      (np.arange(FONT_H)[:, None] + sub).ravel() * (y1 - y0) / FONT_H)[None, :]
  cells = _bilinear_grid(grey, ys, xs)  # [Sy, Sx, 3 * FONT_H, 3 * FONT_W]
  n = len(shifts)
  ink = -cells.reshape(n, n, FONT_H, 3, FONT_W, 3).mean(axis=(3, 5)).reshape(n, n, -1)
  ink = (ink - ink.mean(-1, keepdims=True)) / (ink.std(-1, keepdims=True) + 1e-6)
  templates = np.stack([_zscore(FONT[d]).ravel() for d in DIGITS])  # [10, 35]
  scores = (ink @ templates.T).reshape(-1, len(DIGITS)).max(axis=0)
  return DIGITS[int(np.argmax(scores))]


def _zscore(bitmap: np.ndarray) -> np.ndarray:
  x = bitmap.astype(np.float32)
  return (x - x.mean()) / x.std()


def _bilinear_grid(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """img at every (ys[a, i], xs[b, j]) -> [A, B, I, J]; array-index coordinates, edge-clamped."""
  h, w = img.shape
  ys = np.clip(ys, 0, h - 1)
  xs = np.clip(xs, 0, w - 1)
  y0 = np.minimum(np.floor(ys).astype(int), max(h - 2, 0))
  x0 = np.minimum(np.floor(xs).astype(int), max(w - 2, 0))
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy = (ys - y0)[:, None, :, None]
  fx = (xs - x0)[None, :, None, :]
  row0, row1 = y0[:, None, :, None], y1[:, None, :, None]
  col0, col1 = x0[None, :, None, :], x1[None, :, None, :]
  top = img[row0, col0] * (1 - fx) + img[row0, col1] * fx
  bottom = img[row1, col0] * (1 - fx) + img[row1, col1] * fx
  return top * (1 - fy) + bottom * fy
