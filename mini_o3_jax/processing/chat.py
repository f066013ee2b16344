"""Qwen2.5-VL chat template: render conversations and tokenise them with loss masks.

Messages use the Hugging Face multimodal format:
  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}
or plain string content. A part counts as an image when its type is "image" or it has
an "image" / "image_url" key (the image itself is not read here), as in the official
template.

Loss-mask convention (`tokenize_conversation`): 1 on the tokens an assistant turn
generates, i.e. its content and its closing `<|im_end|>`; 0 on the
`<|im_start|>assistant\\n` header, on the "\\n" after `<|im_end|>`, on system / user
(observation) turns and on image tokens. The model is trained to stop by emitting
`<|im_end|>`, and the header is what the sampler feeds as the generation prompt.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping, Sequence

import numpy as np
import transformers

from mini_o3_jax.processing import tokenizer as tokenizer_lib

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

Message = Mapping[str, Any]


class _Kind(enum.IntEnum):
  """What a rendered piece of text is, for masks."""
  CONTEXT = 0  # prompt text: system, user, headers, separators
  GENERATED = 1  # assistant output: trained on
  IMAGE = 2  # one <|image_pad|> placeholder
  VIDEO = 3  # one <|video_pad|> placeholder


def _part_kind(part: Mapping[str, Any]) -> str | None:
  """"image" / "video" / "text" / None (ignored), exactly as the jinja template decides."""
  if not isinstance(part, Mapping):
    raise ValueError(f"message content parts must be dicts, got {type(part).__name__}")
  if part.get("type") == "image" or "image" in part or "image_url" in part:
    return "image"
  if part.get("type") == "video" or "video" in part:
    return "video"
  if "text" in part:
    return "text"
  return None


def _render_pieces(messages: Sequence[Message], add_generation_prompt: bool,
                   add_default_system: bool, add_vision_id: bool) -> list[tuple[str, _Kind]]:
  """The rendered conversation as (text, kind) pieces; their concatenation is the prompt."""
  pieces: list[tuple[str, _Kind]] = []
  ctx, gen = _Kind.CONTEXT, _Kind.GENERATED
  images = videos = 0
  for i, message in enumerate(messages):
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
      raise ValueError(f"message {i} has no string 'role': {message!r:.200}")
    if i == 0 and role != "system" and add_default_system:
      pieces.append((f"{tokenizer_lib.IM_START}system\n{DEFAULT_SYSTEM_PROMPT}"
                     f"{tokenizer_lib.IM_END}\n", ctx))
    text_kind = gen if role == "assistant" else ctx
    pieces.append((f"{tokenizer_lib.IM_START}{role}\n", ctx))
    if isinstance(content, str):
      pieces.append((content, text_kind))
    elif isinstance(content, Sequence):
      for part in content:
        kind = _part_kind(part)
        if kind == "image":
          images += 1
          if add_vision_id:
            pieces.append((f"Picture {images}: ", text_kind))
          pieces += [(tokenizer_lib.VISION_START, ctx), (tokenizer_lib.IMAGE_PAD, _Kind.IMAGE),
                     (tokenizer_lib.VISION_END, ctx)]
        elif kind == "video":
          videos += 1
          if add_vision_id:
            pieces.append((f"Video {videos}: ", text_kind))
          pieces += [(tokenizer_lib.VISION_START, ctx), (tokenizer_lib.VIDEO_PAD, _Kind.VIDEO),
                     (tokenizer_lib.VISION_END, ctx)]
        elif kind == "text":
          pieces.append((str(part["text"]), text_kind))
    else:
      raise ValueError(f"message {i} content must be a string or a list of parts, got "
                       f"{type(content).__name__}")
    pieces += [(tokenizer_lib.IM_END, text_kind), ("\n", ctx)]
  if add_generation_prompt:
    pieces.append((f"{tokenizer_lib.IM_START}assistant\n", ctx))
  return pieces


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False,
                add_default_system: bool = True, add_vision_id: bool = False) -> str:
  """The prompt string; equals `tokenizer.apply_chat_template(..., tokenize=False)`.

  `add_default_system=False` drops the default system turn the template inserts when
  the first message is not a system message (the official template always adds it).
  """
  pieces = _render_pieces(messages, add_generation_prompt, add_default_system, add_vision_id)
  return "".join(text for text, _ in pieces)


def count_images(messages: Sequence[Message]) -> int:
  """How many image placeholders the template renders for `messages`."""
  return sum(1 for m in messages if not isinstance(m.get("content"), str)
             for part in (m.get("content") or ()) if _part_kind(part) == "image")


def tokenize_conversation(
    tokenizer: transformers.PreTrainedTokenizerBase,
    messages: Sequence[Message],
    image_grid_thws: Sequence[Sequence[int] | np.ndarray] = (),
    merge_size: int = 2,
    add_generation_prompt: bool = False,
    add_default_system: bool = True,
) -> dict[str, np.ndarray]:
  """Chat messages -> model inputs with a loss mask (see the module docstring).

  Each image placeholder becomes prod(grid_thw) // merge_size**2 `<|image_pad|>` tokens,
  as `Qwen2_5_VLProcessor` does. The ids equal tokenising the whole rendered prompt
  at once (then expanding the image pads): the text is encoded in one call and the
  masks come from character offsets, so no segment boundary can change a merge. A
  token straddling the assistant header and its content (content starting with a
  newline) carries generated text and gets mask 1.

  Args:
    tokenizer: a fast tokenizer with the Qwen-VL special tokens.
    messages: the conversation.
    image_grid_thws: one (t, h, w) patch grid per image placeholder, in order.
    merge_size: the vision merger's spatial merge size.
    add_generation_prompt: end with the `<|im_start|>assistant\\n` header.
    add_default_system: as in `render_chat`.

  Returns:
    {"input_ids", "loss_mask", "mm_token_type_ids"}: int32 [T] each; the token type is
    0 for text and 1 for image pads.

  Raises:
    ValueError: image placeholders and grids disagree in number, a grid is not
      divisible by merge_size**2, or the conversation holds a video.
  """
  pieces = _render_pieces(messages, add_generation_prompt, add_default_system, False)
  kinds = [kind for _, kind in pieces]
  if _Kind.VIDEO in kinds:
    raise ValueError("videos are not supported")
  n_images = kinds.count(_Kind.IMAGE)
  if n_images != len(image_grid_thws):
    raise ValueError(f"the messages hold {n_images} image placeholder(s) but "
                     f"{len(image_grid_thws)} image_grid_thw(s) were given")
  counts = []
  for grid in image_grid_thws:
    grid = np.asarray(grid, dtype=np.int64)
    if grid.shape != (3,) or (grid <= 0).any():
      raise ValueError(f"image_grid_thw must be 3 positive ints, got {grid.tolist()}")
    if int(np.prod(grid)) % (merge_size * merge_size):
      raise ValueError(f"grid {grid.tolist()} is not divisible by merge_size**2={merge_size**2}")
    counts.append(int(np.prod(grid)) // (merge_size * merge_size))

  text = "".join(t for t, _ in pieces)
  is_generated = np.zeros(len(text), np.int64)  # per character
  start = 0
  for piece, kind in pieces:
    if kind == _Kind.GENERATED:
      is_generated[start:start + len(piece)] = 1
    start += len(piece)
  generated = np.concatenate([[0], np.cumsum(is_generated)])  # prefix sums, [len + 1]

  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int64).reshape(-1)
  offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
  loss = (generated[offsets[:, 1]] - generated[offsets[:, 0]]) > 0

  image_id = tokenizer_lib.special_token_ids(tokenizer)["image_token_id"]
  is_image = ids == image_id
  if int(is_image.sum()) != n_images:
    raise ValueError(f"found {int(is_image.sum())} {tokenizer_lib.IMAGE_PAD} tokens for "
                     f"{n_images} images: does a text part contain the literal token?")
  repeats = np.ones(len(ids), np.int64)
  repeats[is_image] = counts
  return {
      "input_ids": np.repeat(ids, repeats).astype(np.int32),
      "loss_mask": np.repeat(loss & ~is_image, repeats).astype(np.int32),
      "mm_token_type_ids": np.repeat(is_image, repeats).astype(np.int32),
  }
