"""A benchmark's rows and the random-access `Benchmark` over them, the errors a bad row raises, and the
helpers every release layout shares (option shuffling, tolerant field parsing, parquet metadata).
The layouts themselves are read in `data.benchmark_layouts`; `data.benchmarks.load_benchmark` is the entry.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import hashlib
import math
import os
import random
from typing import Any, Iterable, Sequence, TypedDict

from PIL import Image

from mini_o3_jax.data import image_sources

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IMAGE_PLACEHOLDER = "<image>"


class BenchmarkRecord(TypedDict):
  """One benchmark item, as returned by ``Benchmark[i]``."""
  id: str
  image: Image.Image
  question: str
  options: list[str] | None
  answer: str
  category: str


class BenchmarkDataError(ValueError):
  """A row that cannot be used: missing or unreadable image, or malformed fields."""

  def __init__(self, row: str, file: str, reason: str, kind: str):
    super().__init__(f"{row}: {reason} [file: {file}]")
    self.row = row
    self.file = file
    self.reason = reason
    self.kind = kind  # "missing", "unreadable" or "malformed"

  def __reduce__(self):
    # Keeps the error picklable across grain worker processes despite the custom signature.
    return (type(self), (self.row, self.file, self.reason, self.kind))


@dataclasses.dataclass(frozen=True)
class SkippedRow:
  """A row left out under ``skip_bad=True``, and why."""
  row: str
  file: str
  reason: str
  kind: str

  @classmethod
  def from_error(cls, err: BenchmarkDataError) -> SkippedRow:
    return cls(row=err.row, file=err.file, reason=err.reason, kind=err.kind)


# ------------------------------------------------------------------------------------------------
# Rows and the random-access benchmark.


@dataclasses.dataclass(frozen=True)
class BenchmarkRow:
  """A benchmark item's metadata; the image stays encoded where the release keeps it."""
  id: str
  question: str
  options: tuple[str, ...] | None
  answer: str
  category: str
  image: image_sources.ImageSource
  where: str  # names the row in error messages, e.g. "visualprobe/hard row 3 (id '60')"


def image_error(row: BenchmarkRow, err: Exception) -> BenchmarkDataError:
  if isinstance(err, FileNotFoundError):
    return BenchmarkDataError(row.where, err.filename or row.image.origin,
                              "image file is missing", "missing")
  # PIL names the in-memory buffer ("<_io.BytesIO object at ...>"), which says nothing useful.
  detail = "not a recognised image format" if "_io.BytesIO" in str(err) else str(err)
  return BenchmarkDataError(row.where, getattr(err, "filename", None) or row.image.origin,
                            f"image is unreadable ({type(err).__name__}: {detail})", "unreadable")


def read_image_bytes(row: BenchmarkRow) -> bytes:
  """The row's encoded image; raises `BenchmarkDataError` naming the row and file."""
  try:
    return row.image.read_bytes()
  except (OSError, ValueError) as err:
    raise image_error(row, err) from err


def check_row_image(row: BenchmarkRow) -> BenchmarkDataError | None:
  try:
    image_sources.verify_image(read_image_bytes(row))
  except BenchmarkDataError as err:
    return err
  except Exception as err:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...) for bad data.
    return image_error(row, err)
  return None


class Benchmark(collections.abc.Sequence):
  """A random-access benchmark split: ``len(ds)``, ``ds[i]`` -> `BenchmarkRecord`."""

  def __init__(self, name: str, split: str, rows: Sequence[BenchmarkRow],
               skipped: Sequence[SkippedRow] = (), option_seed: int = 0):
    self.name = name
    self.split = split
    self.option_seed = option_seed
    self._rows = tuple(rows)
    self.skipped = tuple(skipped)

  @property
  def num_skipped(self) -> int:
    """How many rows were left out under ``skip_bad=True``."""
    return len(self.skipped)

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> BenchmarkRecord:  # type: ignore[override]
    row = self.row(index)
    data = read_image_bytes(row)
    try:
      image = image_sources.decode_image(data)
    except Exception as err:  # pylint: disable=broad-except
      raise image_error(row, err) from err
    return BenchmarkRecord(
        id=row.id, image=image, question=row.question,
        options=list(row.options) if row.options is not None else None,
        answer=row.answer, category=row.category)

  def row(self, index: int) -> BenchmarkRow:
    """Metadata of item `index` without touching its image."""
    if not isinstance(index, int):
      raise TypeError(f"index must be an int, got {type(index).__name__}")
    return self._rows[index]

  def image_bytes(self, index: int) -> bytes:
    """The encoded image of item `index`, exactly as released (for lossless re-packaging)."""
    return read_image_bytes(self.row(index))

  def category_counts(self) -> dict[str, int]:
    return dict(collections.Counter(row.category for row in self._rows))

  def __repr__(self) -> str:
    return (f"Benchmark({self.name!r}, split={self.split!r}, rows={len(self)}, "
            f"skipped={self.num_skipped})")


# ------------------------------------------------------------------------------------------------
# Shared helpers.


def shuffle_options(options: Sequence[str], row_id: str,
                    option_seed: int) -> tuple[list[str], str]:
  """Shuffles `options` whose correct entry is ``options[0]``.

  The permutation depends only on (`option_seed`, `row_id`), so it is the same whatever order the
  files are listed in. Returns the presented options and the letter of the correct one.
  """
  if not 1 <= len(options) <= len(LETTERS):
    raise ValueError(f"need 1..{len(LETTERS)} options, got {len(options)}")
  digest = hashlib.sha256(f"{option_seed}\x00{row_id}".encode()).digest()
  order = list(range(len(options)))
  random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
  return [options[j] for j in order], LETTERS[order.index(0)]


def strip_image_placeholder(problem: str) -> str:
  return problem.replace(IMAGE_PLACEHOLDER, "").strip()


def find_child_dir(parent: str, name: str) -> str | None:
  """`parent/name`, matching the name case-insensitively when the exact one is absent."""
  exact = os.path.join(parent, name)
  if os.path.isdir(exact):
    return exact
  if not os.path.isdir(parent):
    return None
  for entry in sorted(os.listdir(parent)):
    candidate = os.path.join(parent, entry)
    if entry.lower() == name.lower() and os.path.isdir(candidate):
      return candidate
  return None


def as_text(value: Any) -> str | None:
  """A string field; numbers are accepted (answers like 6 or 2.5), null/empty/NaN are not."""
  if isinstance(value, bool) or value is None:
    return None
  if isinstance(value, float) and not math.isfinite(value):
    return None  # pandas writes a missing cell as NaN: 'nan' is no answer
  if isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, str) and value.strip():
    return value.strip()
  return None


def malformed(where: str, file: str, reason: str) -> BenchmarkDataError:
  return BenchmarkDataError(where, file, reason, "malformed")


def unique_ids(ids: Sequence[str]) -> list[str]:
  """Suffixes repeated ids (``x``, ``x#1``...); rows themselves are never dropped."""
  seen: collections.Counter[str] = collections.Counter()
  out = []
  for row_id in ids:
    out.append(row_id if not seen[row_id] else f"{row_id}#{seen[row_id]}")
    seen[row_id] += 1
  return out


def read_parquet_metadata(path: str, columns: Iterable[str]) -> tuple[list[str], list[dict]]:
  """Names of all columns, and the rows of the requested (present) non-image columns."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    parquet = pq.ParquetFile(path)
  except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError kinds
    raise malformed(os.path.basename(path), path, f"not a readable parquet file ({err})") from err
  if parquet.metadata.num_rows == 0:
    raise malformed(os.path.basename(path), path, "the file holds no rows")
  names = list(parquet.schema_arrow.names)
  wanted = [c for c in columns if c in names]
  if not wanted:  # keep one (empty) row per file row so each is reported as malformed
    return names, [{} for _ in range(parquet.metadata.num_rows)]
  return names, parquet.read(columns=wanted).to_pylist()


RowOrError = BenchmarkRow | BenchmarkDataError
