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
import PIL.ImageOps
import transformers

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Qwen3-VL's processor settings (its preprocessor_config.json): 16-pixel patches, mean = std = 0.5.
QWEN3_VL_MEAN = QWEN3_VL_STD = (0.5, 0.5, 0.5)


def normalization(model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) the image processor of a model family normalises with."""
  return (QWEN3_VL_MEAN, QWEN3_VL_STD) if model_type == "qwen3_vl" else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def settings_for(model_config) -> dict:
  """`preprocess_image` keyword arguments for a model config (its vision geometry and family)."""
  v = model_config.vision
  mean, std = normalization(model_config.model_type)
  return dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
              mean=mean, std=std)

DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200
PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def hf_preprocessor_config(model_config, min_pixels: int = DEFAULT_MIN_PIXELS,
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
  """preprocessor_config.json for transformers' `Qwen2VLImageProcessor`, equal to `preprocess_image(min, max)`.

  Built by the image processor class itself (`to_dict`: transformers 5's `size` {shortest_edge,
  longest_edge}), plus the hub's `min_pixels` / `max_pixels` / `processor_class`, which transformers 4.x
  and vLLM read.
  """
  if not 0 < min_pixels <= max_pixels:
    raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
  v = model_config.vision
  mean, std = normalization(model_config.model_type)
  processor = transformers.Qwen2VLImageProcessorPil(
      size={"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}, patch_size=v.patch_size,
      temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size, image_mean=list(mean),
      image_std=list(std), resample=PIL.Image.Resampling.BICUBIC, do_convert_rgb=True)
  return {**processor.to_dict(), "image_processor_type": "Qwen2VLImageProcessor",
          "processor_class": PROCESSOR_CLASS[model_config.model_type],
          "min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}


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


def _to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
  """16-bit and float greyscale ("I;16*", "I", "F") scaled to 8 bits ("L"), rather than clipped.

  PIL's own conversion clips these to 0..255, so a 16-bit scan turns white and a float image in [0, 1]
  black. Values already in 0..255 (an 8-bit image in a wider container) are kept, as `transformers`
  keeps them; integers past 255 are read as 16-bit, floats up to 1.0 as [0, 1].
  """
  pixels = np.asarray(image, np.float64)
  lo, hi = float(np.nanmin(pixels)), float(np.nanmax(pixels))
  if image.mode == "F":
    if not np.isfinite(pixels).all() or lo < 0 or hi > 255:
      raise ValueError(f"a float image must hold finite values in [0, 1] or [0, 255], got [{lo:g}, {hi:g}]")
    scale = 255.0 if 0 < hi <= 1.0 else 1.0
  else:
    scale = 255.0 / 65535.0 if hi > 255 else 1.0
  if scale == 1.0:
    return image  # PIL's conversion is right here, and rounds as the reference does
  return PIL.Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """Any PIL mode -> RGB; transparency is composited onto white (as the reference)."""
  if image.mode == "F" or image.mode.startswith("I"):
    image = _to_8bit(image)
  has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
  if has_alpha:
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


# EXIF orientations that turn the stored image by 90 degrees (5-8): width and height swap on display.
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def displayed_size(image: PIL.Image.Image) -> tuple[int, int]:
  """(width, height) as shown, EXIF orientation applied, from the header alone."""
  width, height = image.size
  if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) in _TRANSPOSED_ORIENTATIONS:
    return height, width
  return width, height


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
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
  """PIL image -> (pixel_values float32 [N, 3*tps*ps*ps], grid_thw int64 [3]).

  Same numbers as `Qwen2VLImageProcessorPil(min_pixels=..., max_pixels=...)` with these patch sizes and
  normalisation (Qwen2.5-VL's by default; Qwen3-VL: patch_size=16, `normalization("qwen3_vl")`).

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
  pixel_values = patchify(normalize(np.asarray(rgb), mean, std), patch_size, temporal_patch_size,
                          merge_size)
  grid_thw = np.array([1, height // patch_size, width // patch_size], dtype=np.int64)
  return pixel_values, grid_thw


def _first_frame_pixels(pixel_values: np.ndarray, patch_size: int, temporal_patch_size: int,
                        mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """float [P, C * t * p * p] normalised patches -> float32 [P, C, p * p] de-normalised first-frame pixels."""
  pv = np.asarray(pixel_values, np.float32)
  n_channels = pv.shape[-1] // (temporal_patch_size * patch_size * patch_size)
  x = pv.reshape(pv.shape[0], n_channels, temporal_patch_size, patch_size * patch_size)[:, :, 0]  # [P, C, pixels]
  return x * np.asarray(std, np.float32)[None, :, None] + np.asarray(mean, np.float32)[None, :, None]


def _image_token_spans(grid_thw: np.ndarray, unit: int, total: int) -> list[tuple[int, int]]:
  """[(start, stop)] of each image's merged tokens in a row's processor order (`total` tokens in all)."""
  spans, start = [], 0
  for n in (np.prod(np.asarray(grid_thw, np.int64).reshape(-1, 3), -1) // unit).tolist():
    spans.append((start, start + n))
    start += n
  if start != total:
    raise ValueError(f"grids give {start} tokens, pixel_values {total}")
  return spans


def token_saliency(pixel_values: np.ndarray, grid_thw: np.ndarray, *, patch_size: int = 14,
                   temporal_patch_size: int = 2, merge_size: int = 2,
                   mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                   power: float = 4.0) -> np.ndarray:
  """Each merged token's colourfulness relative to its image's most colourful token, to `power`.

  pixel_values: float [P, C * temporal_patch_size * patch_size**2], one row's images in processor order
  (`patchify`: merge block by merge block); grid_thw: int [images, 3]. Returns float32 [P / merge_size**2]
  in [0, 1]: per pixel of the first frame the chroma max(RGB) - min(RGB) of the de-normalised image, its
  mean over a token's pixels, divided by the image's largest token mean (+1e-6), raised to `power`. The
  target of the objectness loss (`train.sft`): on the synthetic scenes only the shapes are colourful.
  """
  unit = merge_size * merge_size
  x = _first_frame_pixels(pixel_values, patch_size, temporal_patch_size, mean, std)
  token = (x.max(1) - x.min(1)).mean(-1).reshape(-1, unit).mean(-1)              # [P / unit]
  out = np.zeros_like(token)
  for start, stop in _image_token_spans(grid_thw, unit, len(token)):
    t = token[start:stop]
    out[start:stop] = (t / (t.max(initial=0.0) + 1e-6)) ** power
  return out.astype(np.float32)


def token_colours(pixel_values: np.ndarray, grid_thw: np.ndarray, palette: np.ndarray, *,
                  chroma_floor: float = 0.08, power: float = 4.0, patch_size: int = 14,
                  temporal_patch_size: int = 2, merge_size: int = 2,
                  mean: Sequence[float] = OPENAI_CLIP_MEAN,
                  std: Sequence[float] = OPENAI_CLIP_STD) -> tuple[np.ndarray, np.ndarray]:
  """Each merged token's palette colour and its saliency within that colour (issue 13's feature targets).

  palette: float [K, 3] RGB in [0, 1]. Per token: its colour is the palette entry nearest the token's
  chroma^2-weighted mean RGB (the fill of the shape it holds, when it holds one); its saliency is its
  mean chroma (as `token_saliency`) relative to the most colourful token of the same colour in its image,
  to `power`, and 0 where the mean chroma is at most `chroma_floor` (the canvas). Relative to its own
  colour, so every shape gets a saliency near 1 however pale its colour.

  Returns (saliency float32 [P / merge_size**2] in [0, 1], colour int32 [P / merge_size**2] in [0, K)).
  """
  unit = merge_size * merge_size
  palette = np.asarray(palette, np.float32).reshape(-1, 3)
  x = _first_frame_pixels(pixel_values, patch_size, temporal_patch_size, mean, std)   # [P, 3, pixels]
  chroma = (x.max(1) - x.min(1)).mean(-1).reshape(-1, unit).mean(-1)             # [T]
  x = x.reshape(-1, unit, 3, x.shape[-1]).transpose(0, 2, 1, 3).reshape(len(chroma), 3, -1)  # [T, 3, pixels]
  w = (x.max(1) - x.min(1)) ** 2                                                 # [T, pixels]
  rgb = np.sum(x * w[:, None], -1) / (np.sum(w, -1)[:, None] + 1e-6)             # [T, 3]
  colour = np.argmin(np.sum((rgb[:, None] - palette[None]) ** 2, -1), -1).astype(np.int32)
  saliency = np.zeros_like(chroma)
  for start, stop in _image_token_spans(grid_thw, unit, len(chroma)):
    c, k = chroma[start:stop], colour[start:stop]
    best = np.zeros(len(palette), np.float32)
    np.maximum.at(best, k, c)
    saliency[start:stop] = np.where(c > chroma_floor, (c / (best[k] + 1e-6)) ** power, 0.0)
  return saliency.astype(np.float32), colour


def token_cells(grid_thw: np.ndarray, merge_size: int = 2) -> np.ndarray:
  """int32 [tokens, 2]: each merged token's (row, column) in its image's merged grid, in processor order
  (frame by frame, rows then columns), for a row's images `grid_thw` int [images, 3]."""
  cells = []
  for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3).tolist():
    rows, cols = np.meshgrid(np.arange(h // merge_size), np.arange(w // merge_size), indexing="ij")
    cells.append(np.tile(np.stack([rows.ravel(), cols.ravel()], -1), (t, 1)))
  return np.concatenate(cells).astype(np.int32) if cells else np.zeros((0, 2), np.int32)


def token_boxes(boxes: np.ndarray, grid_thw: Sequence[int], merge_size: int = 2) -> np.ndarray:
  """For one image of grid `grid_thw` (t, h, w patches): int32 [t * h * w / merge_size**2], per merged token in
  processor order the index of the box (relative [x0, y0, x1, y1], float [n, 4]) that covers most of the
  token's area, -1 where none touches it."""
  t, h, w = (int(v) for v in grid_thw)
  th, tw = h // merge_size, w // merge_size
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  rows, cols = np.meshgrid(np.arange(th), np.arange(tw), indexing="ij")
  x0, y0 = cols.ravel() / tw, rows.ravel() / th                                      # [tokens] each token's corner
  ix = np.clip(np.minimum(x0[:, None] + 1 / tw, boxes[None, :, 2]) - np.maximum(x0[:, None], boxes[None, :, 0]), 0, None)
  iy = np.clip(np.minimum(y0[:, None] + 1 / th, boxes[None, :, 3]) - np.maximum(y0[:, None], boxes[None, :, 1]), 0, None)
  area = ix * iy                                                                     # [tokens, boxes]
  best = np.where(area.max(-1, initial=0.0) > 0, np.argmax(area, -1) if len(boxes) else 0, -1)
  return np.tile(best, t).astype(np.int32)


def token_centres(boxes: np.ndarray, grid_thw: Sequence[int], merge_size: int = 2) -> np.ndarray:
  """For one image of grid `grid_thw` (t, h, w patches): int32 [t * h * w / merge_size**2], per merged token in
  processor order the index of the box (relative [x0, y0, x1, y1], float [n, 4]) whose centre it holds (the
  last such box where several do), -1 where none does."""
  t, h, w = (int(v) for v in grid_thw)
  th, tw = h // merge_size, w // merge_size
  out = np.full(th * tw, -1, np.int32)
  for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
    out[min(th - 1, int(th * (y0 + y1) / 2)) * tw + min(tw - 1, int(tw * (x0 + x1) / 2))] = i
  return np.tile(out, t)


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
      # Cameras store pixels as the sensor saw them and the turn in EXIF; a viewer (and a person
      # asking about the photo) sees it upright.
      return to_rgb(PIL.ImageOps.exif_transpose(img))
  except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {name}: {type(e).__name__}: {e}") from e
