"""Text templates of the visual-search protocol and HF multimodal message builders.

Every prompt the agent sees comes from here, so the cold-start data writer, the sampler and
evaluation all render exactly the same turns.

Image placement. Messages use the HF multimodal format: an image is a `{"type": "image"}` item in
the content list (optionally with the image itself under `"image"`), and the chat template renders
one `<|vision_start|><|image_pad|><|vision_end|>` per item, in order, with the text items
concatenated around it.

- The first user turn puts the original image first, then the question text (the Qwen convention,
  and the original's `"<image>\\n<question>"` problems).
- An observation turn puts the crop in the middle of its text, right after
  "... (Observation {i}):\\n" and before "\\nContinue your reasoning ...", as the original's
  rollout does. `observation_turn` returns the whole text with `IMAGE_PLACEHOLDER` ("<image>") at
  that spot; `observation_message` splits it there into text / image / text items.
- An error turn has no image.

Numbering. Action k is the 0-based index of the assistant turn that issued the tool call;
Observation i is the index of the new image in the trajectory's image list (0 = the original), so
"observation_i" in a later tool call names exactly that image. Without errors this is the original's
"Action k -> Observation k + 1"; after a failed call the observation index lags the action index,
which keeps sources resolvable.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

IMAGE_PLACEHOLDER = "<image>"

# Generation stops at whichever comes first; the stop string is kept in the output.
STOP_STRINGS = ("</grounding>", "</answer>")

ORIGINAL_IMAGE = "original_image"
OBSERVATION_PREFIX = "observation_"

INSTRUCTIONS = (
    "Answer the question based on the image. Think step by step inside <think> and </think>. "
    "Whenever anything is unclear or too small to see, zoom in on a region of an image by "
    'outputting <grounding>{"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}</grounding>, '
    "where (x0, y0) and (x1, y1) are the top-left and bottom-right corners of the region in "
    "relative coordinates (the width and height of the image are both 1.0), and \"source\" names "
    "the image to zoom in on: \"original_image\" or \"observation_i\" for the i-th zoom-in image. "
    "Once the final answer is confirmed, put it inside <answer> and </answer>.")

_QUESTION_HEADER = "\n\nQuestion: "
_OPTIONS_HEADER = "\nOptions:\n"
CHOICE_INSTRUCTION = (
    "Answer with the option's letter from the given choices inside <answer> and </answer>.")

_OBSERVATION_HEAD = "After the above Action {k}, here is the zoom-in image (Observation {i}):\n"
_OBSERVATION_TAIL = (
    "\nContinue your reasoning process inside <think> and </think>. If needed, continue to zoom "
    "in on the original image or any observation by outputting <grounding> and </grounding> as "
    "before. If the final answer is confirmed, put it inside <answer> and </answer>.")

# The thought the no-tools baseline opens with when it answers from the full view at once.
DIRECT_ANSWER_THOUGHT = "I answer from the image."

ERROR_PREFIX = "ERROR occurs during grounding. Error Information: "
# The original spells "Countinue"; the typo is not kept.
ERROR_SUFFIX = (
    "\nPlease analyze the error information obtained from the function tool and adjust your "
    "response. Continue your reasoning process inside <think> and </think>.")



def fixed_phrases() -> tuple[str, ...]:
  """The protocol's fixed text between its variable parts (instructions, headers, the observation and
  error turns): what a small tokenizer can hold as single tokens."""
  action_head, rest = _OBSERVATION_HEAD.split("{k}")
  observation_head = rest.split("{i}")[0]
  return (INSTRUCTIONS, _QUESTION_HEADER, ERROR_SUFFIX, ERROR_PREFIX, action_head, observation_head,
          _OBSERVATION_TAIL)


_LEADING_IMAGE_TOKENS = re.compile(r"^(?:\s*<image>\s*)+")


def option_letter(index: int) -> str:
  """0 -> "A", 1 -> "B", ..."""
  if not 0 <= index < 26:
    raise ValueError(f"option index {index} out of range (at most 26 options)")
  return chr(ord("A") + index)


def format_options(options: Sequence[str]) -> str:
  """"A. first\\nB. second..." (one option per line)."""
  return "\n".join(f"{option_letter(i)}. {opt}" for i, opt in enumerate(options))


def question_prompt(question: str, options: Sequence[str] | None = None) -> str:
  """The text of the first user turn: instructions, question, and options for multiple choice.

  Leading "<image>" tokens (VisualProbe's "<image>\\n<question>" problems) are dropped: the image
  is a separate content item of the message.
  """
  question = _LEADING_IMAGE_TOKENS.sub("", question).strip()
  text = INSTRUCTIONS + _QUESTION_HEADER + question
  if options:
    text += _OPTIONS_HEADER + format_options(options) + "\n" + CHOICE_INSTRUCTION
  return text


def parse_question_prompt(text: str) -> tuple[str, list[str] | None] | None:
  """Inverse of `question_prompt`: (question, options), or None if `text` is not one of ours."""
  prefix = INSTRUCTIONS + _QUESTION_HEADER
  if not text.startswith(prefix):
    return None
  body = text[len(prefix):]
  choice_tail = "\n" + CHOICE_INSTRUCTION
  if not (body.endswith(choice_tail) and _OPTIONS_HEADER in body):
    return (body, None) if question_prompt(body) == text else None
  question, _, listing = body[:-len(choice_tail)].rpartition(_OPTIONS_HEADER)
  options = []
  for i, line in enumerate(listing.split("\n")):
    label = f"{option_letter(i)}. "
    if not line.startswith(label):
      return None
    options.append(line[len(label):])
  if question_prompt(question, options) != text:
    return None
  return question, options


def observation_turn(action_index: int, observation_index: int) -> str:
  """The user turn returning a crop, with `IMAGE_PLACEHOLDER` where the image goes."""
  return (_OBSERVATION_HEAD.format(k=action_index, i=observation_index) + IMAGE_PLACEHOLDER +
          _OBSERVATION_TAIL)


def error_turn(message: str) -> str:
  """The user turn answering a bad tool call."""
  return ERROR_PREFIX + message.strip() + ERROR_SUFFIX


def parse_error_turn(text: str) -> str | None:
  """Inverse of `error_turn`: the error message, or None if `text` is not an error turn."""
  if not (text.startswith(ERROR_PREFIX) and text.endswith(ERROR_SUFFIX)):
    return None
  return text[len(ERROR_PREFIX):len(text) - len(ERROR_SUFFIX)]


def _image_item(image: Any = None) -> dict[str, Any]:
  return {"type": "image"} if image is None else {"type": "image", "image": image}


def _text_item(text: str) -> dict[str, Any]:
  return {"type": "text", "text": text}


def user_message(question: str,
                 options: Sequence[str] | None = None,
                 image: Any = None) -> dict[str, Any]:
  """First user turn: the original image, then the question prompt."""
  return {
      "role": "user",
      "content": [_image_item(image),
                  _text_item(question_prompt(question, options))]
  }


def prompt_message(prompt: str, image: Any = None) -> dict[str, Any]:
  """First user turn with a verbatim prompt text (data not written with our template)."""
  return {"role": "user", "content": [_image_item(image), _text_item(prompt)]}


def observation_message(action_index: int,
                        observation_index: int,
                        image: Any = None) -> dict[str, Any]:
  """User turn returning crop `observation_index` after action `action_index` (image mid-text)."""
  head, tail = observation_turn(action_index, observation_index).split(IMAGE_PLACEHOLDER)
  return {"role": "user", "content": [_text_item(head), _image_item(image), _text_item(tail)]}


def error_message(message: str) -> dict[str, Any]:
  """User turn reporting a failed tool call."""
  return {"role": "user", "content": [_text_item(error_turn(message))]}


def assistant_message(text: str) -> dict[str, Any]:
  """An assistant turn; its content is plain text."""
  return {"role": "assistant", "content": text}


def render_content(content: str | Sequence[Mapping[str, Any]],
                   image_token: str = IMAGE_PLACEHOLDER) -> str:
  """Flattens message content to text, writing `image_token` for each image item."""
  if isinstance(content, str):
    return content
  parts = []
  for item in content:
    kind = item.get("type")
    if kind == "text":
      parts.append(item["text"])
    elif kind in ("image", "image_url"):
      parts.append(image_token)
    else:
      raise ValueError(f"unsupported content item type {kind!r}")
  return "".join(parts)


def count_images(content: str | Sequence[Mapping[str, Any]]) -> int:
  """Number of image items in message content."""
  if isinstance(content, str):
    return 0
  return sum(1 for item in content if item.get("type") in ("image", "image_url"))
