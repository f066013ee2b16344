"""Tool-call parsing and the crop tool.

An assistant turn ends at the first stop string (`</grounding>` or `</answer>`, kept in the text),
as the sampler generates it; anything after that point is ignored, so whichever tag closes first
decides the action. A turn ending in `</answer>` is final; one ending in `</grounding>` is a tool
call whose payload is the text after the last `<grounding>` before it; any other turn (EOS or
truncated) is `NoAction`.

Grounding payloads are parsed as JSON, falling back to `ast.literal_eval` (literals only, never
code), so single quotes, trailing commas and tuples are accepted. The structure is strict: exactly
the keys "bbox_2d" (4 finite numbers) and "source" ("original_image" or "observation_i"). Every
problem becomes a `ToolCallError` whose message the error turn shows; `parse_action` never raises
on a string.

Checks that need the image (box geometry, whether the source exists yet) happen in `crop` /
`resolve_source` / `apply_tool_call`, which raise `CropError` with the message for the error turn.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import warnings
from typing import Any, Sequence, Union

from PIL import Image

from mini_o3_jax.agent import judge
from mini_o3_jax.agent import prompts

GROUNDING_OPEN = "<grounding>"
GROUNDING_CLOSE = "</grounding>"
BBOX_KEY = "bbox_2d"
SOURCE_KEY = "source"
CALL_EXAMPLE = '{"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}'
MIN_SIDE = 28
MAX_ASPECT = 200.0

_COORD_NAMES = ("x0", "y0", "x1", "y1")
_MAX_PAYLOAD_CHARS = 2000  # A real call is ~80 chars; bounds the literal_eval fallback.
_OBSERVATION_RE = re.compile(r"observation_(\d{1,6})")
# Pixel coordinates this close to an integer are that integer, so 0.7 * 10 = 7.000000000000001
# does not grow the crop by a pixel.
_SNAP_TOL = 1e-6


class ToolError(ValueError):
  """A bad tool call; `message` is what the error turn shows the model."""

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message


class CropError(ToolError):
  """A tool call that cannot be executed on the images at hand."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """A well-formed crop call; `bbox` is relative to image `source_index` (0 = original)."""

  bbox: tuple[float, float, float, float]
  source: str
  source_index: int


@dataclasses.dataclass(frozen=True)
class FinalAnswer:
  """A turn ending in a non-empty `<answer>…</answer>`; `text` is the stripped content."""

  text: str


@dataclasses.dataclass(frozen=True)
class NoAction:
  """A turn with neither a tool call nor a well-formed answer."""


@dataclasses.dataclass(frozen=True)
class ToolCallError:
  """A turn ending in `</grounding>` whose call is malformed."""

  message: str


Action = Union[ToolCall, FinalAnswer, NoAction, ToolCallError]


def truncate_at_stop(text: str, stop_strings: Sequence[str] = prompts.STOP_STRINGS) -> str:
  """`text` up to and including the earliest stop string (all of it if there is none)."""
  ends = [i + len(s) for s in stop_strings if (i := text.find(s)) >= 0]
  return text[:min(ends)] if ends else text


def _short_repr(value: Any, limit: int = 60) -> str:
  """`value` as JSON (the model wrote JSON) for error messages, capped in length."""
  try:
    r = json.dumps(value, ensure_ascii=False)
  except (TypeError, ValueError):
    r = repr(value)
  return r if len(r) <= limit else r[:limit - 3] + "..."


def canonical_source(index: int) -> str:
  return prompts.ORIGINAL_IMAGE if index == 0 else f"{prompts.OBSERVATION_PREFIX}{index}"


def parse_source(source: Any) -> int:
  """Image index named by `source` ("original_image" -> 0, "observation_i" -> i); format only."""
  if not isinstance(source, str):
    raise CropError(f'"source" must be a string such as "original_image" or "observation_1", got '
                    f"{_short_repr(source)}.")
  name = source.strip().lower()
  if name == prompts.ORIGINAL_IMAGE:
    return 0
  m = _OBSERVATION_RE.fullmatch(name)
  if m is None:
    raise CropError(f'unknown source {_short_repr(source)}: it must be "original_image" or '
                    '"observation_i" with i the number of a zoom-in image.')
  if int(m.group(1)) == 0:  # zoom-ins count from 1; the protocol names the original only one way
    raise CropError(f'unknown source {_short_repr(source)}: zoom-in images count from observation_1; '
                    'the original is "original_image".')
  return int(m.group(1))


def _available_images(num_images: int) -> str:
  if num_images <= 1:
    return "only original_image is available"
  if num_images == 2:
    return "the available images are original_image and observation_1"
  last = num_images - 1
  return f"the available images are original_image and observation_1 to observation_{last}"


def resolve_source(source: Any, num_images: int) -> int:
  """Index into the trajectory's images (0 = original); CropError if it does not exist yet."""
  index = parse_source(source)
  if index >= num_images:
    raise CropError(f'source "{source}" does not exist; {_available_images(num_images)}.')
  return index


def parse_bbox(value: Any, error: type[ToolError] = ToolError) -> tuple[float, float, float, float]:
  """4 finite numbers as floats; raises `error` otherwise (bools, numeric strings rejected)."""
  if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
    raise error(
        f'"bbox_2d" must be a list of 4 numbers [x0, y0, x1, y1], got {_short_repr(value)}.')
  if len(value) != 4:
    raise error(f'"bbox_2d" must have exactly 4 numbers [x0, y0, x1, y1], got {len(value)}.')
  coords = []
  for name, v in zip(_COORD_NAMES, value):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise error(f'"bbox_2d" {name} is not a number: {_short_repr(v)}.')
    try:
      f = float(v)
    except OverflowError:
      f = math.inf
    if not math.isfinite(f):
      raise error(f'"bbox_2d" {name} is not a finite number: {_short_repr(v)}.')
    coords.append(f)
  return tuple(coords)


def _load_payload(payload: str) -> Any:
  text = payload.strip()
  if not text:
    raise ToolError(f"the <grounding> tag is empty; write {CALL_EXAMPLE} inside it.")
  if len(text) > _MAX_PAYLOAD_CHARS:
    raise ToolError(f"the content of <grounding> is too long ({len(text)} characters); write "
                    f"{CALL_EXAMPLE} inside it.")
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    json_error = e
  try:
    # Literals only (no names, calls or operators besides +/- on numbers), so this never runs code. A
    # model's run-on number ("0.4or 1") would make the compiler warn on stderr; its error turn says it.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", SyntaxWarning)
      return ast.literal_eval(text)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    raise ToolError(f"the content of <grounding> is not valid JSON ({json_error.msg} at character "
                    f"{json_error.pos}); write {CALL_EXAMPLE} inside it.") from None


def parse_grounding(payload: str) -> ToolCall:
  """Parses the text between `<grounding>` and `</grounding>`; raises ToolError with the reason."""
  obj = _load_payload(payload)
  if not isinstance(obj, dict):
    raise ToolError(f"the content of <grounding> must be one JSON object {CALL_EXAMPLE}, got "
                    f"{type(obj).__name__} {_short_repr(obj)}.")
  missing = [k for k in (BBOX_KEY, SOURCE_KEY) if k not in obj]
  if missing:
    got = ", ".join(_short_repr(str(k)) for k in obj) or "none"
    raise ToolError(f"missing key {', '.join(_short_repr(k) for k in missing)} (got keys: {got}); "
                    f"write {CALL_EXAMPLE}.")
  extra = sorted(str(k) for k in obj if k not in (BBOX_KEY, SOURCE_KEY))
  if extra:
    raise ToolError(f"unexpected key {', '.join(_short_repr(k) for k in extra)}; only \"bbox_2d\" "
                    "and \"source\" are allowed.")
  bbox = parse_bbox(obj[BBOX_KEY])
  index = parse_source(obj[SOURCE_KEY])
  return ToolCall(bbox=bbox, source=canonical_source(index), source_index=index)


def _parse_action(text: str) -> Action:
  turn = truncate_at_stop(text)
  if turn.endswith(judge.ANSWER_CLOSE):
    answer = judge.extract_answer(turn)
    return NoAction() if answer is None else FinalAnswer(answer)
  if turn.endswith(GROUNDING_CLOSE):
    start = turn.rfind(GROUNDING_OPEN)
    if start < 0:
      return ToolCallError(f"found </grounding> without <grounding>; write "
                           f"<grounding>{CALL_EXAMPLE}</grounding>.")
    try:
      return parse_grounding(turn[start + len(GROUNDING_OPEN):-len(GROUNDING_CLOSE)])
    except ToolError as e:
      return ToolCallError(e.message)
  return NoAction()


def parse_action(text: str) -> Action:
  """The action of one assistant turn (see the module docstring for the rules). Never raises."""
  try:
    return _parse_action(text)
  except Exception as e:  # pylint: disable=broad-except
    # A parser bug must not kill a rollout; the model sees it as a tool error.
    return ToolCallError(f"the tool call could not be parsed ({type(e).__name__}).")


def _snap(v: float) -> float:
  r = round(v)
  return float(r) if abs(v - r) < _SNAP_TOL else v


def pixel_box(bbox_rel: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
  """Relative box -> pixel box (left, top, right, bottom), clamped, right/bottom exclusive.

  floor for x0, y0 and ceil for x1, y1, so the crop covers every pixel the box touches.
  """
  w, h = size
  x0, y0, x1, y1 = (min(max(c, 0.0), 1.0) for c in bbox_rel)
  return (math.floor(_snap(x0 * w)), math.floor(_snap(y0 * h)), math.ceil(_snap(x1 * w)),
          math.ceil(_snap(y1 * h)))


def _fmt_box(bbox: Sequence[float]) -> str:
  return "[" + ", ".join(f"{c:g}" for c in bbox) + "]"


def upscale_to_min_side(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
  """LANCZOS-upscales so the shorter side is `min_side`, keeping aspect ratio; else unchanged."""
  w, h = image.size
  short = min(w, h)
  if short >= min_side:
    return image
  scale = min_side / short
  size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
  if image.mode not in ("RGB", "RGBA", "L", "LA", "I", "F"):
    # Pillow silently falls back to NEAREST for palette / bilevel images.
    image = image.convert("RGB")
  return image.resize(size, Image.Resampling.LANCZOS)


def crop(image: Image.Image,
         bbox_rel: Sequence[float],
         min_side: int = MIN_SIDE,
         max_aspect: float = MAX_ASPECT) -> Image.Image:
  """Crops relative box `bbox_rel` from full-resolution `image`, upscaled to at least `min_side`.

  Raises CropError for: a malformed box, x1 <= x0 or y1 <= y0, a box entirely outside [0, 1]
  (touching an edge counts as outside), a box covering no whole pixel after clamping, and a pixel
  region whose aspect ratio is `max_aspect` or more.
  """
  x0, y0, x1, y1 = bbox = parse_bbox(bbox_rel, error=CropError)
  if x1 <= x0 or y1 <= y0:
    axis = "x" if x1 <= x0 else "y"
    lo, hi = (x0, x1) if axis == "x" else (y0, y1)
    raise CropError(
        f"bbox_2d {_fmt_box(bbox)} is degenerate: {axis}1 ({hi:g}) must be greater than "
        f"{axis}0 ({lo:g}); the box is [x0, y0, x1, y1] with (x0, y0) the top-left corner.")
  if x1 <= 0 or y1 <= 0 or x0 >= 1 or y0 >= 1:
    raise CropError(f"bbox_2d {_fmt_box(bbox)} lies entirely outside the image; coordinates are "
                    "relative to the source image, between 0 and 1.")
  width, height = image.size
  left, top, right, bottom = pixel_box(bbox, image.size)
  if right <= left or bottom <= top:
    raise CropError(
        f"bbox_2d {_fmt_box(bbox)} has zero area after clamping to the {width}x{height} "
        "source image; choose a larger region.")
  w, h = right - left, bottom - top
  ratio = max(w / h, h / w)
  if ratio >= max_aspect:
    raise CropError(f"bbox_2d {_fmt_box(bbox)} is a {w}x{h} pixel region with aspect ratio "
                    f"{ratio:.0f}; the aspect ratio must be below {max_aspect:g}.")
  return upscale_to_min_side(image.crop((left, top, right, bottom)), min_side)


def apply_tool_call(call: ToolCall,
                    images: Sequence[Image.Image],
                    min_side: int = MIN_SIDE,
                    max_aspect: float = MAX_ASPECT) -> Image.Image:
  """Runs `call` on the images so far (0 = original, i = observation_i); CropError if it fails."""
  if not images:
    raise ValueError("apply_tool_call needs at least the original image")
  index = resolve_source(call.source, len(images))
  return crop(images[index], call.bbox, min_side=min_side, max_aspect=max_aspect)


def action_to_dict(action: Action) -> dict[str, Any]:
  """JSON-friendly summary of an action (for logs and trajectory files)."""
  if isinstance(action, ToolCall):
    return {"type": "tool_call", "bbox_2d": list(action.bbox), "source": action.source}
  if isinstance(action, FinalAnswer):
    return {"type": "answer", "text": action.text}
  if isinstance(action, ToolCallError):
    return {"type": "tool_call_error", "message": action.message}
  return {"type": "no_action"}
