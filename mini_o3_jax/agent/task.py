"""What the agent is asked: one question about one image, as the sampler, the cold-start collector and
evaluation hand it over."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from PIL import Image


@dataclasses.dataclass(frozen=True)
class Task:
  """One question about one image (a benchmark record or a training example)."""
  image: Image.Image
  question: str
  options: Sequence[str] | None = None
  prompt: str | None = None   # verbatim first-turn text instead of the protocol's template
  gold: str | None = None
  id: str | None = None
  # Messages put before the question (few-shot exemplars); image items embed their image under "image".
  context: Sequence[Mapping[str, Any]] | None = None

  @classmethod
  def from_record(cls, rec: Mapping[str, Any]) -> Task:
    """From a `data.load_benchmark` record ({"id", "image", "question", "options", "answer"})."""
    return cls(image=rec["image"], question=rec["question"], options=rec.get("options"),
               gold=rec.get("answer"), id=rec.get("id"))
