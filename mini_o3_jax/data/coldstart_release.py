"""Reader for the released cold-start SFT set (``Mini-o3/Mini-o3-Coldstart-Dataset``).

Assumed layout (from the original's ``scripts/preprocess_coldstart.py``, which loads it with
``datasets.load_dataset`` and feeds LLaMA-Factory's ShareGPT format): one or more parquet files
(``data/train-*.parquet`` in a hub snapshot) with one trajectory per row and columns

* ``conversations``: the turns, either a string (a JSON or Python-literal list; the original calls
  ``eval`` on it) or an already-structured list. A turn is ``{"from": "human"|"gpt"|"system",
  "value": str}`` (ShareGPT) or ``{"role": "user"|"assistant"|"system", "content": str}``; each
  ``<image>`` in the text marks where the next image goes (the question's image, then one per
  zoom-in observation turn).
* ``images``: a list of HF ``Image`` structs ``{"bytes", "path"}`` (any cell accepted by
  `image_sources.image_bytes_from_cell`: bytes, base64, or a path relative to the parquet file).
* optional ``image_names``, ``data_source``, ``sample_index``, ``rollout_index`` (used for ids).

Every name above is configurable through `ColdStartLayout`. A row becomes a `ColdStartTrajectory`:
HF multimodal messages (``{"role", "content": [{"type": "image"}, {"type": "text", "text"}]}``,
text kept byte-for-byte around the placeholders) plus its PIL images in order. Rows are validated
when the release is opened (known roles, parseable turns, ``<image>`` count == image count);
images are decoded on access. The messages feed ``agent.trajectory.Trajectory.from_messages(
t.messages, t.images, id=t.id)`` directly (a leading system turn goes to its metadata).
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import glob
import json
import logging
import os
from typing import Any, Mapping, Sequence

from PIL import Image

from mini_o3_jax.data import benchmarks, image_sources

logger = logging.getLogger(__name__)

_DEFAULT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant",
    "system": "system",
}


@dataclasses.dataclass(frozen=True)
class ColdStartLayout:
  """Column and key names of the release; defaults follow the original's ShareGPT parquet."""
  messages_column: str | None = None  # None: the first of `messages_candidates` in the file
  messages_candidates: tuple[str, ...] = ("conversations", "messages")
  images_column: str = "images"
  role_keys: tuple[str, ...] = ("from", "role")
  content_keys: tuple[str, ...] = ("value", "content")
  roles: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(_DEFAULT_ROLES))
  placeholder: str = benchmarks.IMAGE_PLACEHOLDER
  id_columns: tuple[str, ...] = ("data_source", "sample_index", "rollout_index")
  data_source_column: str = "data_source"


@dataclasses.dataclass
class ColdStartTrajectory:
  """One SFT trajectory: HF multimodal messages and the images their image parts refer to."""
  id: str
  messages: list[dict[str, Any]]
  images: list[Image.Image]
  data_source: str


class ColdStartDataError(ValueError):
  """A malformed trajectory row or an unreadable image; names the row and the file."""

  def __init__(self, row: str, file: str, reason: str):
    super().__init__(f"{row}: {reason} [file: {file}]")
    self.row, self.file, self.reason = row, file, reason

  def __reduce__(self):
    return (type(self), (self.row, self.file, self.reason))


@dataclasses.dataclass(frozen=True)
class _Row:
  id: str
  messages: tuple[dict[str, Any], ...]
  data_source: str
  images: image_sources.ParquetColumn
  file_row: int
  where: str


def parse_turns(value: Any) -> list[Any]:
  """The turn list of a ``conversations`` cell: a list, or a JSON / Python-literal string."""
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      value = ast.literal_eval(value)  # safe subset of the original's eval()
  if not isinstance(value, (list, tuple)):
    raise ValueError(f"turns must be a list, got {type(value).__name__}")
  return list(value)


def _split_on_placeholder(text: str, placeholder: str) -> list[dict[str, Any]]:
  """Text with placeholders -> content parts; the text between them is kept exactly."""
  parts: list[dict[str, Any]] = []
  for i, piece in enumerate(text.split(placeholder)):
    if i:
      parts.append({"type": "image"})
    if piece:
      parts.append({"type": "text", "text": piece})
  return parts


def _first(mapping: Mapping[str, Any], keys: Sequence[str]) -> Any:
  return next((mapping[k] for k in keys if k in mapping), None)


def convert_turns(turns: Sequence[Any], layout: ColdStartLayout) -> list[dict[str, Any]]:
  """ShareGPT / chat turns -> HF multimodal messages (raises ValueError on a bad turn)."""
  messages = []
  for t, turn in enumerate(turns):
    if not isinstance(turn, Mapping):
      raise ValueError(f"turn {t} is a {type(turn).__name__}, not an object")
    role = layout.roles.get(str(_first(turn, layout.role_keys)))
    if role is None:
      raise ValueError(f"turn {t} has unknown role {_first(turn, layout.role_keys)!r}")
    content = _first(turn, layout.content_keys)
    if isinstance(content, str):
      parts = _split_on_placeholder(content, layout.placeholder)
    elif isinstance(content, list) and all(isinstance(p, Mapping) and "type" in p
                                           for p in content):
      parts = [dict(p) for p in content]  # already HF multimodal parts
    else:
      raise ValueError(f"turn {t} has no text content")
    messages.append({"role": role, "content": parts})
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError("no assistant turn")
  return messages


def count_image_parts(messages: Sequence[Mapping[str, Any]]) -> int:
  return sum(part.get("type") == "image" for m in messages for part in m["content"])


def _list_lengths(path: str, column: str) -> list[int]:
  """Number of images per row, reading a small leaf (the struct's path) when there is one."""
  import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  parquet = pq.ParquetFile(path)
  leaves = [parquet.schema.column(i).path for i in range(parquet.metadata.num_columns)]
  small = [p for p in leaves if p.startswith(column + ".") and not p.endswith(".bytes")]
  values = parquet.read(columns=small[:1] or [column]).column(0)
  if not hasattr(values.type, "value_type"):  # one image per cell, not a list
    return [0 if v is None else 1 for v in values.to_pylist()]
  return [n or 0 for n in pc.list_value_length(values).to_pylist()]


def find_parquet_files(path: str) -> list[str]:
  """`path` itself, or the parquet files below a snapshot folder (``data/`` preferred)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return [path]
  for pattern in ("data/*.parquet", "*.parquet", "**/*.parquet"):
    found = sorted(glob.glob(os.path.join(path, pattern), recursive=True))
    if found:
      return found
  raise FileNotFoundError(f"no parquet files in {path}")


class ColdStartRelease(collections.abc.Sequence):
  """Random access to the released cold-start trajectories: ``len(ds)``, ``ds[i]``."""

  def __init__(self, path: str, layout: ColdStartLayout | None = None, skip_bad: bool = False,
               verify_images: bool = False):
    """Opens and validates the release.

    Args:
      path: a parquet file, or a folder (a hub snapshot) holding them.
      layout: column and key names; defaults match the original release.
      skip_bad: leave out malformed rows (and, with `verify_images`, rows with unreadable images)
        and report them in ``.skipped`` and a warning, instead of raising `ColdStartDataError`.
      verify_images: also decode every image now (slow on the full set).
    """
    self.layout = layout or ColdStartLayout()
    self.skipped: list[ColdStartDataError] = []
    rows = []
    for file in find_parquet_files(path):
      for item in self._read_file(file):
        if isinstance(item, _Row) and verify_images:
          item = self._verify(item)
        if isinstance(item, ColdStartDataError):
          if not skip_bad:
            raise item
          self.skipped.append(item)
        else:
          rows.append(item)
    ids = benchmarks.unique_ids([r.id for r in rows])
    self._rows = [dataclasses.replace(r, id=i) for r, i in zip(rows, ids)]
    if self.skipped:
      logger.warning("cold-start release: skipped %d bad rows; first: %s", len(self.skipped),
                     self.skipped[0])

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def _messages_column(self, names: Sequence[str], file: str) -> str:
    candidates = ((self.layout.messages_column,) if self.layout.messages_column
                  else self.layout.messages_candidates)
    for name in candidates:
      if name in names:
        return name
    raise ColdStartDataError("cold-start release", file, f"no messages column among {candidates}")

  def _read_file(self, file: str):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    names = pq.ParquetFile(file).schema_arrow.names
    column = self._messages_column(names, file)
    if self.layout.images_column not in names:
      raise ColdStartDataError("cold-start release", file,
                               f"no images column {self.layout.images_column!r}")
    extra = [c for c in dict.fromkeys(self.layout.id_columns + (self.layout.data_source_column,))
             if c in names and c != column]
    table = pq.ParquetFile(file).read(columns=[column] + extra).to_pylist()
    counts = _list_lengths(file, self.layout.images_column)
    images = image_sources.ParquetColumn(file, self.layout.images_column)
    for index, (raw, count) in enumerate(zip(table, counts)):
      yield self._row(raw, column, count, images, index, file)

  def _row(self, raw: Mapping[str, Any], column: str, num_images: int,
           images: image_sources.ParquetColumn, index: int, file: str) -> _Row | ColdStartDataError:
    parts = [str(raw[c]) for c in self.layout.id_columns if raw.get(c) is not None]
    row_id = ":".join(parts) if parts else f"{os.path.basename(file)}:{index}"
    where = f"cold-start row {index} (id {row_id})"
    try:
      messages = convert_turns(parse_turns(raw[column]), self.layout)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
      return ColdStartDataError(where, file, f"malformed {column!r} ({err})")
    placeholders = count_image_parts(messages)
    if placeholders != num_images:
      return ColdStartDataError(
          where, file, f"{placeholders} {self.layout.placeholder} placeholders but "
          f"{num_images} images")
    data_source = str(raw.get(self.layout.data_source_column) or "minio3_coldstart")
    return _Row(row_id, tuple(messages), data_source, images, index, where)

  def _load_images(self, row: _Row) -> list[Image.Image]:
    cells = row.images.cell(row.file_row)
    if cells is not None and not isinstance(cells, list):
      cells = [cells]
    resolve = image_sources.PathResolver((os.path.dirname(row.images.path),))
    images = []
    for k, cell in enumerate(cells or []):
      try:
        images.append(image_sources.decode_image(image_sources.image_bytes_from_cell(cell, resolve)))
      except Exception as err:  # pylint: disable=broad-except
        # PIL raises assorted types for bad data; report them all the same way.
        file = getattr(err, "filename", None) or row.images.path
        raise ColdStartDataError(row.where, file, f"image {k} is unreadable ({err})") from err
    return images

  def _verify(self, row: _Row) -> _Row | ColdStartDataError:
    try:
      self._load_images(row)
    except ColdStartDataError as err:
      return err
    return row

  def __len__(self) -> int:
    return len(self._rows)

  def messages(self, index: int) -> tuple[str, list[dict[str, Any]]]:
    """(id, messages) of row `index` without decoding its images."""
    row = self._rows[index]
    return row.id, [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in row.messages]

  def __getitem__(self, index: int) -> ColdStartTrajectory:  # type: ignore[override]
    if not isinstance(index, int):
      raise TypeError(f"index must be an int, got {type(index).__name__}")
    row = self._rows[index]
    messages = [{"role": m["role"], "content": [dict(p) for p in m["content"]]}
                for m in row.messages]
    return ColdStartTrajectory(id=row.id, messages=messages, images=self._load_images(row),
                               data_source=row.data_source)

  def __repr__(self) -> str:
    return f"ColdStartRelease(rows={len(self)}, skipped={self.num_skipped})"


def load_coldstart_release(path: str, layout: ColdStartLayout | None = None,
                           skip_bad: bool = False) -> ColdStartRelease:
  """Opens a local copy of ``Mini-o3/Mini-o3-Coldstart-Dataset`` (see the module docstring)."""
  return ColdStartRelease(path, layout=layout, skip_bad=skip_bad)
