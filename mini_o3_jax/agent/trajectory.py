"""One multi-turn episode in protocol terms, its HF-message form and its JSON form.

A `Trajectory` is the original image plus the question, then one `Turn` per assistant message. A
turn's text is what the model generated (up to and including its stop string); its action is
derived from the text by `tools.parse_action`, so it can never disagree with it. A turn whose tool
call ran records the index of the new image; a turn whose call failed records the error shown to
the model. The user turns in between are rebuilt from `prompts`, which is what keeps the SFT data,
the sampler and evaluation in step.

Stop reasons and over-turn (the paper's rule; over-turn trajectories get loss weight 0 in RL and
score 0 in evaluation):
  answer        last turn ends in a well-formed <answer>                 not over-turn
  no_action     last turn has neither a call nor a well-formed answer    not over-turn (wrong)
  error         the episode could not continue (environment failure)     not over-turn
  max_turns     turn limit hit with a tool call (even malformed) pending over-turn
  max_response  response-token budget ran out mid-turn                   over-turn
  max_context   the next observation would not fit in the context        over-turn
  image_limit   the next observation would exceed the image budget       over-turn
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image

from mini_o3_jax.agent import prompts
from mini_o3_jax.agent import tools
from mini_o3_jax.processing import image as image_lib

STOP_REASONS = ("answer", "no_action", "max_turns", "max_context", "max_response", "image_limit",
                "error")
OVERTURN_STOP_REASONS = frozenset({"max_turns", "max_context", "max_response", "image_limit"})


LENGTH_STOPS = ("wrong", "overturn")


def overturn_from_stop_reason(stop_reason: str, length_stop: str = "overturn") -> bool:
  """Whether an episode that ended for `stop_reason` is an over-turn (masked in RL).

  length_stop: how a turn that runs out of tokens (`max_response`) counts. "overturn" masks it like the
  turn and context limits; "wrong" (the original's "void" generation with `ignore_void` off) keeps it
  in the loss as an unanswered, reward-0 trajectory, so a policy that rambles past the cap is pushed back.
  """
  if stop_reason not in STOP_REASONS:
    raise ValueError(f"unknown stop_reason {stop_reason!r}; expected one of {STOP_REASONS}")
  if length_stop not in LENGTH_STOPS:
    raise ValueError(f"length_stop={length_stop!r}; expected one of {LENGTH_STOPS}")
  if stop_reason == "max_response" and length_stop == "wrong":
    return False
  return stop_reason in OVERTURN_STOP_REASONS


def terminal_stop_reason(action: tools.Action) -> str | None:
  """The stop reason an action ends the episode with by itself, or None if the episode goes on."""
  if isinstance(action, tools.FinalAnswer):
    return "answer"
  if isinstance(action, tools.NoAction):
    return "no_action"
  return None


@dataclasses.dataclass(frozen=True)
class Turn:
  """One assistant turn and what the tool made of it.

  Attributes:
    text: the generated text, including the stop string.
    observation_index: index in `Trajectory.images` of the crop this turn's call produced.
    error: the message of the error turn that answered this turn's call.
  """

  text: str
  observation_index: int | None = None
  error: str | None = None

  def __post_init__(self):
    if self.observation_index is not None and self.error is not None:
      raise ValueError("a turn has an observation or an error, not both")
    action = self.action
    if self.observation_index is not None:
      if not isinstance(action, tools.ToolCall):
        raise ValueError(
            f"turn has an observation but its action is {action}: {self.text[-200:]!r}")
      if self.observation_index < 1:
        raise ValueError(f"observation_index must be >= 1, got {self.observation_index}")
    if self.error is not None and not isinstance(action, (tools.ToolCall, tools.ToolCallError)):
      raise ValueError(f"turn has an error but its action is {action}: {self.text[-200:]!r}")

  @property
  def action(self) -> tools.Action:
    return tools.parse_action(self.text)

  def followup_message(self, action_index: int, image: Any = None) -> dict[str, Any] | None:
    """The user message answering this turn (observation or error), None if there is none."""
    if self.observation_index is not None:
      return prompts.observation_message(action_index, self.observation_index, image)
    if self.error is not None:
      return prompts.error_message(self.error)
    return None


def execute_turn(text: str,
                 images: Sequence[Image.Image],
                 min_side: int = tools.MIN_SIDE,
                 max_aspect: float = tools.MAX_ASPECT) -> tuple[Turn, Image.Image | None]:
  """Parses a generated turn and runs its tool call on `images` (the images so far).

  Returns the turn and the new observation image (None unless a call succeeded). The new image
  gets index len(images); a caller that finds it does not fit (context / image budget, turn limit)
  drops it and ends the episode with `Turn(text)` and the matching stop reason.
  """
  action = tools.parse_action(text)
  if isinstance(action, tools.ToolCallError):
    return Turn(text, error=action.message), None
  if isinstance(action, tools.ToolCall):
    try:
      image = tools.apply_tool_call(action, images, min_side=min_side, max_aspect=max_aspect)
    except tools.CropError as e:
      return Turn(text, error=e.message), None
    return Turn(text, observation_index=len(images)), image
  return Turn(text), None


@dataclasses.dataclass
class Trajectory:
  """One episode.

  Attributes:
    question: the question (without the instructions).
    images: images[0] is the original, images[i] observation i; PIL images or file paths.
    turns: the assistant turns, in order.
    stop_reason: one of STOP_REASONS, or None while the episode is running.
    options: multiple-choice options as presented, None for free-form questions.
    prompt: verbatim text of the first user turn when it is not `prompts.question_prompt(question,
      options)` (imported data); None means the standard template.
    gold: the reference answer (a letter for multiple choice), if known.
    id: the example id.
    metadata: anything else (judge verdict, benchmark, seed, ...); JSON-serialisable to be saved.
  """

  question: str
  images: list[Any]
  turns: list[Turn] = dataclasses.field(default_factory=list)
  stop_reason: str | None = None
  options: list[str] | None = None
  prompt: str | None = None
  gold: str | None = None
  id: str | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_turns(self) -> int:
    return len(self.turns)

  @property
  def actions(self) -> list[tools.Action]:
    return [t.action for t in self.turns]

  @property
  def final_answer(self) -> str | None:
    """The answer of the last turn if it is a well-formed answer, else None."""
    if not self.turns:
      return None
    action = self.turns[-1].action
    return action.text if isinstance(action, tools.FinalAnswer) else None

  @property
  def overturn(self) -> bool:
    return self.stop_reason is not None and overturn_from_stop_reason(self.stop_reason)

  @property
  def messages(self) -> list[dict[str, Any]]:
    return self.to_messages()

  @property
  def prompt_text(self) -> str:
    """The text of the first user turn."""
    if self.prompt is not None:
      return self.prompt
    return prompts.question_prompt(self.question, self.options)

  def validate(self) -> None:
    """Checks the bookkeeping: crops numbered 1, 2, ... in turn order, one image each."""
    if not self.images:
      raise ValueError("a trajectory needs the original image")
    observed = [t.observation_index for t in self.turns if t.observation_index is not None]
    if observed != list(range(1, len(self.images))):
      raise ValueError(f"observation indices {observed} do not match {len(self.images) - 1} crops")
    if self.stop_reason is not None and self.stop_reason not in STOP_REASONS:
      raise ValueError(f"unknown stop_reason {self.stop_reason!r}")

  def to_messages(self, embed_images: bool = False) -> list[dict[str, Any]]:
    """HF multimodal messages; with `embed_images`, image items carry the image (PIL or path)."""
    self.validate()

    def image(i: int) -> Any:
      return self.images[i] if embed_images else None

    messages = [prompts.prompt_message(self.prompt_text, image(0))]
    for k, turn in enumerate(self.turns):
      messages.append(prompts.assistant_message(turn.text))
      follow = turn.followup_message(
          k, None if turn.observation_index is None else image(turn.observation_index))
      if follow is not None:
        messages.append(follow)
    return messages

  @classmethod
  def from_messages(
      cls,
      messages: Sequence[Mapping[str, Any]],
      images: Sequence[Any] | None = None,
      *,
      stop_reason: str | None = None,
      gold: str | None = None,
      id: str | None = None,  # pylint: disable=redefined-builtin
      metadata: Mapping[str, Any] | None = None) -> Trajectory:
    """Inverse of `to_messages`; also reads same-protocol data written with other templates.

    `images` defaults to the images embedded in the image items. A first user text that is not our
    template is kept verbatim in `prompt`; an error turn not in our template keeps its first line
    after the "ERROR ... Error Information: " prefix. Leading system messages go to
    metadata["system"].
    `stop_reason` defaults to what the last turn implies: "answer", "no_action", "max_turns" for a
    pending call, None if the messages end with a user turn.
    """
    metadata = dict(metadata or {})
    msgs = list(messages)
    system = []
    while msgs and msgs[0].get("role") == "system":
      system.append(prompts.render_content(msgs.pop(0)["content"], image_token=""))
    if system:
      metadata["system"] = "\n".join(system)
    if not msgs or msgs[0].get("role") != "user":
      raise ValueError("the first non-system message must be the user's question")
    first_text, first_images = _split_content(msgs[0]["content"])
    if len(first_images) != 1:
      raise ValueError(
          f"the first user message must hold exactly one image, got {len(first_images)}")
    embedded = list(first_images)
    parsed = prompts.parse_question_prompt(first_text)
    if parsed is not None:
      question, options, prompt = parsed[0], parsed[1], None
    else:
      question, options, prompt = first_text.strip(), None, first_text

    turns: list[Turn] = []
    i = 1
    while i < len(msgs):
      msg = msgs[i]
      if msg.get("role") != "assistant":
        raise ValueError(f"message {i}: expected an assistant turn, got role {msg.get('role')!r}")
      text, _ = _split_content(msg["content"])
      follow = msgs[i + 1] if i + 1 < len(msgs) else None
      i += 2 if follow is not None else 1
      if follow is None:
        turns.append(Turn(text))
        continue
      if follow.get("role") != "user":
        raise ValueError(f"message {i - 1}: expected a user turn, got role {follow.get('role')!r}")
      follow_text, follow_images = _split_content(follow["content"])
      if len(follow_images) > 1:
        raise ValueError(f"message {i - 1}: a user turn holds at most one observation")
      if follow_images:
        embedded.extend(follow_images)
        turns.append(Turn(text, observation_index=len(embedded) - 1))
      else:
        turns.append(Turn(text, error=_error_text(follow_text)))

    if images is None:
      if any(im is None for im in embedded):
        raise ValueError("images not given and not embedded in the messages")
      images = embedded
    elif len(images) != len(embedded):
      raise ValueError(f"{len(images)} images given, the messages hold {len(embedded)}")
    if stop_reason is None and turns and len(msgs) % 2 == 0:
      # Ends with an assistant turn: infer from its action.
      stop_reason = terminal_stop_reason(turns[-1].action) or "max_turns"
    traj = cls(
        question=question,
        images=list(images),
        turns=turns,
        stop_reason=stop_reason,
        options=options,
        prompt=prompt,
        gold=gold,
        id=id,
        metadata=metadata)
    traj.validate()
    return traj

  # ------------------------------------------------------------------------------------------------
  # JSON, with images as file paths.

  def to_json_dict(self) -> dict[str, Any]:
    """A JSON-ready dict; images must be file paths (see `save_images`).

    "messages", "num_turns", "overturn", "final_answer" and each turn's "action" are derived,
    written for readers and other tools, and ignored by `from_json_dict`.
    """
    self.validate()
    paths = []
    for i, im in enumerate(self.images):
      if not isinstance(im, (str, os.PathLike)):
        raise TypeError(f"image {i} is a {type(im).__name__}, not a path; call save_images() first")
      paths.append(os.fspath(im))
    return {
        "id": self.id,
        "question": self.question,
        "options": self.options,
        "prompt": self.prompt,
        "gold": self.gold,
        "images": paths,
        "turns": [{
            "text": t.text,
            "observation_index": t.observation_index,
            "error": t.error,
            "action": tools.action_to_dict(t.action),
        } for t in self.turns],
        "stop_reason": self.stop_reason,
        "num_turns": self.num_turns,
        "overturn": self.overturn,
        "final_answer": self.final_answer,
        "messages": self.to_messages(),
        "metadata": self.metadata,
    }

  @classmethod
  def from_json_dict(cls, d: Mapping[str, Any]) -> Trajectory:
    """Inverse of `to_json_dict`; a dict with only "messages" (+ "images") uses `from_messages`."""
    if "turns" not in d:
      return cls.from_messages(
          d["messages"],
          d.get("images"),
          stop_reason=d.get("stop_reason"),
          gold=d.get("gold"),
          id=d.get("id"),
          metadata=d.get("metadata"))
    traj = cls(
        question=d["question"],
        images=list(d["images"]),
        turns=[Turn(t["text"], t.get("observation_index"), t.get("error")) for t in d["turns"]],
        stop_reason=d.get("stop_reason"),
        options=None if d.get("options") is None else list(d["options"]),
        prompt=d.get("prompt"),
        gold=d.get("gold"),
        id=d.get("id"),
        metadata=dict(d.get("metadata") or {}),
    )
    traj.validate()
    return traj

  def to_json(self) -> str:
    return json.dumps(self.to_json_dict(), ensure_ascii=False)

  @classmethod
  def from_json(cls, line: str, where: str | None = None) -> Trajectory:
    """Inverse of `to_json`; with `where` (e.g. "file:line"), a bad line is a ValueError naming it."""
    if where is None:
      return cls.from_json_dict(json.loads(line))
    try:
      return cls.from_json_dict(json.loads(line))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{where}: not a trajectory ({type(e).__name__}: {e})") from e

  def save_images(self,
                  directory: str | os.PathLike[str],
                  stem: str | None = None,
                  relative_to: str | os.PathLike[str] | None = None) -> Trajectory:
    """Writes PIL images as PNG ("{stem}_{i}.png") and returns a copy whose images are paths.

    Images that already are paths are kept. Paths are relative to `relative_to` when given (e.g. the
    directory of the JSONL file), else as joined from `directory`.
    """
    stem = stem or self.id or "trajectory"
    os.makedirs(directory, exist_ok=True)
    paths: list[Any] = []
    for i, im in enumerate(self.images):
      if isinstance(im, (str, os.PathLike)):
        paths.append(os.fspath(im))
        continue
      path = os.path.join(directory, f"{stem}_{i}.png")
      im.save(path, format="PNG")
      paths.append(os.path.relpath(path, relative_to) if relative_to is not None else path)
    return dataclasses.replace(
        self, images=paths, turns=list(self.turns), metadata=dict(self.metadata))

  def load_images(self, base_dir: str | os.PathLike[str] | None = None) -> Trajectory:
    """Returns a copy with path images opened (relative paths resolved against `base_dir`)."""
    loaded = []
    for im in self.images:
      if isinstance(im, (str, os.PathLike)):
        path = os.path.join(base_dir, im) if base_dir is not None else os.fspath(im)
        loaded.append(image_lib.load_image(path))
      else:
        loaded.append(im)
    return dataclasses.replace(
        self, images=loaded, turns=list(self.turns), metadata=dict(self.metadata))


def _split_content(content: Any) -> tuple[str, list[Any]]:
  """(text, images) of message content; a string's "<image>" placeholders count as images."""
  if isinstance(content, str):
    n = content.count(prompts.IMAGE_PLACEHOLDER)
    text = content.replace(prompts.IMAGE_PLACEHOLDER, "") if n else content
    return text, [None] * n
  text = prompts.render_content(content, image_token="")
  images = [
      item.get("image", item.get("image_url"))
      for item in content
      if item.get("type") in ("image", "image_url")
  ]
  return text, images


def _error_text(text: str) -> str:
  """The message of an error turn (ours, or the first line after the original's prefix)."""
  ours = prompts.parse_error_turn(text)
  if ours is not None:
    return ours
  if text.startswith(prompts.ERROR_PREFIX):
    return text[len(prompts.ERROR_PREFIX):].split("\n", 1)[0]
  return text


def write_jsonl(path: str | os.PathLike[str], trajectories: Iterable[Trajectory]) -> None:
  """One `to_json()` line per trajectory (images must already be paths)."""
  with open(path, "w", encoding="utf-8") as f:
    for traj in trajectories:
      f.write(traj.to_json() + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[Trajectory]:
  """The trajectories of a `write_jsonl` file; a bad line is a ValueError naming file and line."""
  with open(path, encoding="utf-8") as f:
    return [Trajectory.from_json(line, f"{os.fspath(path)}:{n}") for n, line in enumerate(f, 1) if line.strip()]
