"""Qwen2-VL image preprocessing: RGB conversion, smart resize, normalise, patchify.

Numerically identical to `transformers`' `Qwen2VLImageProcessorPil` (the torch-free
reference) for the same `min_pixels` / `max_pixels`:

  1. convert to RGB; images with an alpha band or palette transparency are composited
     onto white first;
  2. resize (PIL bicubic, in uint8) to `smart_resize(h, w)`: both sides multiples of
     `patch_size * merge_size`, area within [min_pixels, max_pixels];
  3. x / 255 (computed in float64, stored as float32), then (x - mean) / std with the
     OpenAI CLIP statistics in float32;
  4. cut into `patch_size` patches, ordered merge-block by merge-block (the 2x2
     patches that the vision tower's merger fuses into one token are adjacent), each
     patch repeated `temporal_patch_size` times along time (a still image is a
     one-frame video).

Output: `pixel_values` float32 [grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]
with features in (channel, time, row, col) order, and `grid_thw` int64 [3] = (1, grid_h,
grid_w) in patch units.
"""

from __future__ import annotations

import io
import math
import os
from typing import Sequence

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
  """Target (height, width): multiples of `factor`, area in range, aspect kept.

  Same arithmetic as Qwen2-VL's (Python's round-half-to-even included), so the
  token counts agree with the reference model to the last token.

  Raises:
    ValueError: a non-positive side, or an aspect ratio above 200.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image must have positive height and width, got {height}x{width}")
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ValueError(
        f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got "
        f"{max(height, width) / min(height, width):.3f} ({height}x{width})")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """Any PIL mode -> RGB; transparency is composited onto white (as the reference)."""
  has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
  if has_alpha:
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def normalize(rgb: np.ndarray,
              mean: Sequence[float] = OPENAI_CLIP_MEAN,
              std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [3, H, W], rescaled to [0, 1] then standardised."""
  # The reference rescales in float64 and rounds once to float32, then normalises in
  # float32; doing the same keeps the result bit-identical, not just close.
  x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.ascontiguousarray(x.transpose(2, 0, 1))


def patchify(chw: np.ndarray, patch_size: int = 14, temporal_patch_size: int = 2,
             merge_size: int = 2) -> np.ndarray:
  """float [C, H, W] -> [grid_h * grid_w, C * temporal_patch_size * patch_size**2].

  Rows go merge block by merge block (row-major over blocks, row-major inside a
  block); each row is (channel, time, patch_row, patch_col) flattened.
  """
  c, h, w = chw.shape
  unit = patch_size * merge_size
  if h % unit or w % unit:
    raise ValueError(f"image size {h}x{w} is not a multiple of patch*merge={unit}")
  bh, bw = h // unit, w // unit
  # [C, bh, mh, ph, bw, mw, pw] -> [bh, bw, mh, mw, C, ph, pw]
  x = chw.reshape(c, bh, merge_size, patch_size, bw, merge_size, patch_size)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)
  # A still image is a clip of identical frames: time sits between channel and rows.
  x = np.broadcast_to(x[:, :, :, :, :, None],
                      x.shape[:5] + (temporal_patch_size,) + x.shape[5:])
  grid = bh * bw * merge_size * merge_size
  return np.ascontiguousarray(
      x.reshape(grid, c * temporal_patch_size * patch_size * patch_size),
      dtype=np.float32)


def resized_size(image: PIL.Image.Image, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, patch_size: int = 14,
                 merge_size: int = 2) -> tuple[int, int]:
  """(height, width) the image is resized to before patchifying."""
  width, height = image.size
  return smart_resize(height, width, factor=patch_size * merge_size,
                      min_pixels=min_pixels, max_pixels=max_pixels)


def preprocess_image(
    image: PIL.Image.Image,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
  """PIL image -> (pixel_values float32 [N, 3*tps*ps*ps], grid_thw int64 [3]).

  Same numbers as `Qwen2VLImageProcessorPil(min_pixels=..., max_pixels=...)`.

  Raises:
    TypeError: not a PIL image.
    ValueError: an empty image or an aspect ratio above 200.
  """
  if not isinstance(image, PIL.Image.Image):
    raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
  if min_pixels <= 0 or max_pixels < min_pixels:
    raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
  height, width = resized_size(image, min_pixels, max_pixels, patch_size, merge_size)
  rgb = to_rgb(image)
  # Resizing the uint8 image (not floats) is what the reference does, rounding and all.
  rgb = rgb.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
  pixel_values = patchify(normalize(np.asarray(rgb)), patch_size, temporal_patch_size,
                          merge_size)
  grid_thw = np.array([1, height // patch_size, width // patch_size], dtype=np.int64)
  return pixel_values, grid_thw


def num_image_tokens(grid_thw: Sequence[int] | np.ndarray, merge_size: int = 2) -> int:
  """Number of `<|image_pad|>` tokens (merged vision tokens) for one image."""
  n = int(np.prod(np.asarray(grid_thw, dtype=np.int64)))
  if n % (merge_size * merge_size):
    raise ValueError(f"grid {list(np.asarray(grid_thw))} is not divisible by merge_size**2")
  return n // (merge_size * merge_size)


def load_image(source: str | os.PathLike | bytes) -> PIL.Image.Image:
  """Reads an image file (path or encoded bytes) fully and returns it as RGB.

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: the file is not a readable image (unknown format, corrupt, truncated),
      with the file named in the message.
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    name = f"<{len(source)} bytes>"
    opener = lambda: PIL.Image.open(io.BytesIO(bytes(source)))  # noqa: E731
  else:
    name = os.fspath(source)
    if not os.path.isfile(name):
      raise FileNotFoundError(f"image file not found: {name}")
    opener = lambda: PIL.Image.open(name)  # noqa: E731
  try:
    with opener() as img:
      # Decode now: PIL opens lazily, and a truncated file only fails on load().
      img.load()
      if img.width == 0 or img.height == 0:
        raise ValueError("empty image")
      return to_rgb(img)
  except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {name}: {type(e).__name__}: {e}") from e
