"""Readers for the released benchmark layouts, as random-access records.

`load_benchmark(name, split, data_dir)` reads a local download in the release's own layout:

* ``visualprobe`` (splits ``train``, ``easy``, ``medium``, ``hard``): ``data_dir`` is the parent of
  ``VisualProbe_Hard/`` etc. (lower-case folder names work too). Each folder holds ``val.json``
  (``train.json`` for train): a JSON list of ``{"images": ["VisualProbe_Hard/data/x.jpg"], "doc_id",
  "problem": "<image>\\n<question>", "solution", "data_source"}`` with image paths relative to
  ``data_dir``. Without a JSON file, any ``*.parquet`` below the folder is read instead (the hub's
  parquet export): columns ``problem``, ``solution``, optional ``doc_id`` / ``data_source`` and an
  ``images`` (or ``image``) column whose cell is anything `image_sources.image_bytes_from_cell` accepts.
* ``vstar`` (split ``test``): ``data_dir/{direct_attributes,relative_position}/sa_X.json`` next to
  ``sa_X.jpg``; the JSON's ``options[0]`` is the correct one, so options are shuffled per question
  with a seed derived from ``option_seed`` and the question id (never from listing order).
* ``hrbench_4k`` / ``hrbench_8k`` (split ``test``): ``data_dir/hr_bench_{4k,8k}.parquet`` with
  columns ``index, question, answer, A, B, C, D, category, cycle_category, image`` (base64 JPEG).
  All rows are kept (200 questions x 4 option rotations); options are presented as in the file.

Images are decoded only when a record is accessed. A missing or unreadable image raises
`BenchmarkDataError` naming the row and the file; with ``skip_bad=True`` every image is checked
when the benchmark is built, bad rows are left out and reported (`Benchmark.skipped`, a warning).
EXIF orientation is not applied, as in the original's PIL loading.
"""

from __future__ import annotations

import ast
import collections
import collections.abc
import concurrent.futures
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
import random
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypedDict

from PIL import Image

from mini_o3_jax.data import image_sources

logger = logging.getLogger(__name__)

BENCHMARK_SPLITS: Mapping[str, tuple[str, ...]] = {
    "visualprobe": ("train", "easy", "medium", "hard"),
    "vstar": ("test",),
    "hrbench_4k": ("test",),
    "hrbench_8k": ("test",),
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IMAGE_PLACEHOLDER = "<image>"

_VISUALPROBE_FOLDERS = {
    "train": "VisualProbe_train",
    "easy": "VisualProbe_Easy",
    "medium": "VisualProbe_Medium",
    "hard": "VisualProbe_Hard",
}
_VSTAR_CATEGORIES = ("direct_attributes", "relative_position")


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


def _image_error(row: BenchmarkRow, err: Exception) -> BenchmarkDataError:
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
    raise _image_error(row, err) from err


def _check_row_image(row: BenchmarkRow) -> BenchmarkDataError | None:
  try:
    image_sources.verify_image(read_image_bytes(row))
  except BenchmarkDataError as err:
    return err
  except Exception as err:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...) for bad data.
    return _image_error(row, err)
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
      raise _image_error(row, err) from err
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


def _find_child_dir(parent: str, name: str) -> str | None:
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


def _as_text(value: Any) -> str | None:
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


def _malformed(where: str, file: str, reason: str) -> BenchmarkDataError:
  return BenchmarkDataError(where, file, reason, "malformed")


def unique_ids(ids: Sequence[str]) -> list[str]:
  """Suffixes repeated ids (``x``, ``x#1``...); rows themselves are never dropped."""
  seen: collections.Counter[str] = collections.Counter()
  out = []
  for row_id in ids:
    out.append(row_id if not seen[row_id] else f"{row_id}#{seen[row_id]}")
    seen[row_id] += 1
  return out


def _read_parquet_metadata(path: str, columns: Iterable[str]) -> tuple[list[str], list[dict]]:
  """Names of all columns, and the rows of the requested (present) non-image columns."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    parquet = pq.ParquetFile(path)
  except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError kinds
    raise _malformed(os.path.basename(path), path, f"not a readable parquet file ({err})") from err
  if parquet.metadata.num_rows == 0:
    raise _malformed(os.path.basename(path), path, "the file holds no rows")
  names = list(parquet.schema_arrow.names)
  wanted = [c for c in columns if c in names]
  if not wanted:  # keep one (empty) row per file row so each is reported as malformed
    return names, [{} for _ in range(parquet.metadata.num_rows)]
  return names, parquet.read(columns=wanted).to_pylist()


# ------------------------------------------------------------------------------------------------
# VisualProbe.

RowOrError = BenchmarkRow | BenchmarkDataError


def _visualprobe_folder(data_dir: str, split: str) -> str | None:
  return _find_child_dir(data_dir, _VISUALPROBE_FOLDERS[split])


def _visualprobe_files(folder: str, split: str) -> tuple[str | None, list[str]]:
  """The split's JSON file, or else its parquet shards."""
  names = ("train.json", "val.json") if split == "train" else ("val.json", "train.json")
  for name in names:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path, []
  return None, sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))


def _visualprobe_row(raw: Any, split: str, where: str, file: str,
                     image: Callable[[Mapping[str, Any]], image_sources.ImageSource | str],
                     fallback_id: str) -> RowOrError:
  """One VisualProbe row (JSON object or parquet row) -> row or malformed error."""
  if not isinstance(raw, Mapping):
    return _malformed(where, file, f"row is a {type(raw).__name__}, not an object")
  problem, answer = raw.get("problem"), _as_text(raw.get("solution"))
  if not isinstance(problem, str) or not strip_image_placeholder(problem):
    return _malformed(where, file, "missing or empty 'problem'")
  if answer is None:
    return _malformed(where, file, f"missing, empty or NaN 'solution' ({raw.get('solution')!r})")
  source = image(raw)
  if isinstance(source, str):
    return _malformed(where, file, source)
  row_id = _as_text(raw.get("doc_id")) or fallback_id
  category = _as_text(raw.get("data_source")) or f"visual_probe_{split}"
  return BenchmarkRow(id=row_id, question=strip_image_placeholder(problem), options=None,
                      answer=answer, category=category, image=source, where=where)


def _read_visualprobe(data_dir: str, split: str, option_seed: int) -> Iterator[RowOrError]:
  del option_seed  # free-form answers
  folder = _visualprobe_folder(data_dir, split)
  if folder is None:
    raise FileNotFoundError(
        f"no {_VISUALPROBE_FOLDERS[split]}/ folder in {data_dir} (download "
        f"Mini-o3/{_VISUALPROBE_FOLDERS[split]} there)")
  json_path, parquet_paths = _visualprobe_files(folder, split)
  resolver = image_sources.PathResolver((data_dir, folder), folder=folder)
  if json_path is not None:
    yield from _visualprobe_json_rows(json_path, split, resolver)
  elif parquet_paths:
    for path in parquet_paths:
      yield from _visualprobe_parquet_rows(path, split, resolver)
  else:
    raise FileNotFoundError(f"no val.json/train.json or *.parquet in {folder}")


def _visualprobe_json_rows(path: str, split: str,
                           resolver: image_sources.PathResolver) -> Iterator[RowOrError]:
  try:
    with open(path, encoding="utf-8") as f:
      raws = json.load(f)
  except json.JSONDecodeError as err:
    raise _malformed(f"visualprobe/{split}", path, f"invalid JSON ({err})") from err
  except UnicodeDecodeError as err:
    raise _malformed(f"visualprobe/{split}", path, f"not UTF-8 text ({err.reason} at byte {err.start}); "
                     "save it as UTF-8") from err
  if not isinstance(raws, list):
    raise _malformed(f"visualprobe/{split}", path, "expected a JSON list of rows")
  if not raws:
    raise _malformed(f"visualprobe/{split}", path, "the file holds no rows")

  def image(raw: Mapping[str, Any]) -> image_sources.ImageSource | str:
    images = raw.get("images")
    if isinstance(images, str):
      images = [images]
    if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], str)):
      return "'images' must be a list holding one image path"
    return image_sources.FileImage(resolver(images[0]))

  for index, raw in enumerate(raws):
    doc_id = _as_text(raw.get("doc_id")) if isinstance(raw, Mapping) else None
    where = f"visualprobe/{split} row {index}" + (f" (doc_id {doc_id})" if doc_id else "")
    yield _visualprobe_row(raw, split, where, path, image, fallback_id=f"{split}_{index}")


def _parquet_cell_image(column: image_sources.ParquetColumn, index: int, resolve: Callable[[str], str],
                        raw: Mapping[str, Any]) -> image_sources.ImageSource:
  del raw  # the image lives in its own column, read lazily
  return image_sources.ParquetCellImage(column, index, resolve)


def _visualprobe_parquet_rows(path: str, split: str,
                              resolver: image_sources.PathResolver) -> Iterator[RowOrError]:
  fields = ("problem", "solution", "doc_id", "data_source")
  names, raws = _read_parquet_metadata(path, fields)
  image_column = next((c for c in ("images", "image") if c in names), None)
  if image_column is None:
    raise _malformed(f"visualprobe/{split}", path, "no 'images' or 'image' column")
  column = image_sources.ParquetColumn(path, image_column)
  cell_resolver = dataclasses.replace(
      resolver, base_dirs=resolver.base_dirs + (os.path.dirname(path),))
  stem = os.path.splitext(os.path.basename(path))[0]
  for index, raw in enumerate(raws):
    doc_id = _as_text(raw.get("doc_id"))
    where = (f"visualprobe/{split} {os.path.basename(path)} row {index}"
             + (f" (doc_id {doc_id})" if doc_id else ""))
    image = functools.partial(_parquet_cell_image, column, index, cell_resolver)
    yield _visualprobe_row(raw, split, where, path, image, fallback_id=f"{stem}_{index}")


# ------------------------------------------------------------------------------------------------
# V* Bench.


def _vstar_image_path(json_path: str) -> str:
  stem = os.path.splitext(json_path)[0]
  for ext in image_sources.IMAGE_EXTENSIONS:
    if os.path.isfile(stem + ext):
      return stem + ext
  return stem + ".jpg"  # named in the "missing" error


def _parse_vstar_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    # Some mirrors were dumped with Python's repr (single quotes).
    return ast.literal_eval(text)


def _vstar_row(path: str, category: str, option_seed: int) -> RowOrError:
  stem = os.path.splitext(os.path.basename(path))[0]
  row_id = f"{category}/{stem}"
  where = f"vstar/test row {row_id}"
  try:
    raw = _parse_vstar_json(path)
  except (ValueError, SyntaxError, UnicodeDecodeError) as err:
    return _malformed(where, path, f"invalid JSON ({type(err).__name__}: {err})")
  if not isinstance(raw, Mapping):
    return _malformed(where, path, "expected a JSON object")
  question, options = raw.get("question"), raw.get("options")
  if not isinstance(question, str) or not question.strip():
    return _malformed(where, path, "missing or empty 'question'")
  if (not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
      or not all(_as_text(o) for o in options)):
    return _malformed(where, path, "'options' must be a list of 2+ non-empty strings")
  presented, letter = shuffle_options([_as_text(o) for o in options], row_id, option_seed)
  return BenchmarkRow(id=row_id, question=question.strip(), options=tuple(presented),
                      answer=letter, category=category,
                      image=image_sources.FileImage(_vstar_image_path(path)), where=where)


def _read_vstar(data_dir: str, split: str, option_seed: int) -> Iterator[RowOrError]:
  del split
  folders = {c: _find_child_dir(data_dir, c) for c in _VSTAR_CATEGORIES}
  missing = [c for c, folder in folders.items() if folder is None]
  if missing:
    raise FileNotFoundError(f"V* Bench folders {missing} not found in {data_dir}")
  for category, folder in folders.items():
    # Sorted so the row order is the same on every file system.
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
      yield _vstar_row(path, category, option_seed)


# ------------------------------------------------------------------------------------------------
# HR-Bench.

_HRBENCH_FIELDS = ("index", "question", "answer", "category", "cycle_category") + tuple("ABCD")


def hrbench_path(data_dir: str, name: str) -> str:
  return os.path.join(data_dir, f"hr_bench_{name.split('_')[-1]}.parquet")


def _hrbench_row(raw: Mapping[str, Any], index: int, name: str, path: str,
                 column: image_sources.ParquetColumn) -> RowOrError:
  row_label = _as_text(raw.get("index"))
  where = f"{name}/test row {index}" + (f" (index {row_label})" if row_label else "")
  question = _as_text(raw.get("question"))
  if question is None:
    return _malformed(where, path, "missing or empty 'question'")
  options = []
  for letter in "ABCD":
    text = _as_text(raw.get(letter))
    if text is None:
      break  # options are contiguous: A, B[, C[, D]]
    options.append(text)
  answer = (_as_text(raw.get("answer")) or "").strip("() .").upper()
  if len(options) < 2:
    return _malformed(where, path, "fewer than two options in columns A-D")
  if answer not in LETTERS[:len(options)]:
    return _malformed(where, path, f"answer {raw.get('answer')!r} is not one of the option letters")
  return BenchmarkRow(id=row_label or str(index), question=question, options=tuple(options),
                      answer=answer, category=_as_text(raw.get("category")) or "unknown",
                      image=image_sources.ParquetCellImage(column, index, image_sources.PathResolver((os.path.dirname(path),))),
                      where=where)


def _read_hrbench(data_dir: str, split: str, option_seed: int,
                  name: str) -> Iterator[RowOrError]:
  del split, option_seed  # options are already rotated in the file
  path = hrbench_path(data_dir, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (download DreamMr/HR-Bench there)")
  names, raws = _read_parquet_metadata(path, _HRBENCH_FIELDS)
  absent = [c for c in ("question", "answer", "A", "B", "image") if c not in names]
  if absent:
    raise _malformed(f"{name}/test", path, f"missing columns {absent}")
  column = image_sources.ParquetColumn(path, "image")
  for index, raw in enumerate(raws):
    yield _hrbench_row(raw, index, name, path, column)


# ------------------------------------------------------------------------------------------------
# Public entry points.

_READERS: Mapping[str, Callable[[str, str, int], Iterator[RowOrError]]] = {
    "visualprobe": _read_visualprobe,
    "vstar": _read_vstar,
    "hrbench_4k": lambda d, s, o: _read_hrbench(d, s, o, "hrbench_4k"),
    "hrbench_8k": lambda d, s, o: _read_hrbench(d, s, o, "hrbench_8k"),
}


def available_splits(name: str, data_dir: str) -> tuple[str, ...]:
  """The splits of `name` whose files are present in `data_dir`."""
  _check_name(name)
  if name == "visualprobe":
    found = []
    for split in BENCHMARK_SPLITS[name]:
      folder = _visualprobe_folder(data_dir, split)
      if folder is not None and any(_visualprobe_files(folder, split)):
        found.append(split)
    return tuple(found)
  if name == "vstar":
    present = all(_find_child_dir(data_dir, c) for c in _VSTAR_CATEGORIES)
  else:
    present = os.path.isfile(hrbench_path(data_dir, name))
  return ("test",) if present else ()


def _check_name(name: str, split: str | None = None) -> None:
  if name not in BENCHMARK_SPLITS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARK_SPLITS)}")
  if split is not None and split not in BENCHMARK_SPLITS[name]:
    raise ValueError(f"unknown split {split!r} for {name}; expected one of "
                     f"{list(BENCHMARK_SPLITS[name])}")


def _check_images(rows: Sequence[BenchmarkRow]) -> list[BenchmarkDataError | None]:
  # Decoding releases the GIL, so a few threads speed up the up-front check of large images.
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(_check_row_image, rows))


def load_benchmark(name: str, split: str, data_dir: str, skip_bad: bool = False,
                   option_seed: int = 0) -> Benchmark:
  """Reads a local download of a benchmark in its released layout.

  Args:
    name: "visualprobe", "vstar", "hrbench_4k" or "hrbench_8k".
    split: "train" / "easy" / "medium" / "hard" for visualprobe, "test" otherwise.
    data_dir: the download folder (see the module docstring for each layout).
    skip_bad: leave out malformed rows and rows whose image is missing or unreadable (all images
      are checked now, so ``len()`` is exact) and report them in ``.skipped`` and a warning.
      Otherwise a malformed row raises here and a bad image raises when its record is read.
    option_seed: seed of the multiple-choice option shuffle (V* only; HR-Bench keeps its order).

  Returns:
    A `Benchmark`; ``ds[i]`` is a `BenchmarkRecord` whose image is decoded on access.

  Raises:
    BenchmarkDataError: a malformed row or file (naming both), unless `skip_bad`.
    FileNotFoundError: the split's files are not in `data_dir`.
  """
  _check_name(name, split)
  data_dir = os.fspath(data_dir)
  rows: list[BenchmarkRow] = []
  skipped: list[SkippedRow] = []
  for item in _READERS[name](data_dir, split, option_seed):
    if isinstance(item, BenchmarkDataError):
      if not skip_bad:
        raise item
      skipped.append(SkippedRow.from_error(item))
    else:
      rows.append(item)
  if skip_bad:
    good = []
    for row, err in zip(rows, _check_images(rows)):
      if err is None:
        good.append(row)
      else:
        skipped.append(SkippedRow.from_error(err))
    rows = good
  if not rows and not skipped:  # a reader that found files but no rows in them
    raise BenchmarkDataError(f"{name}/{split}", data_dir, "no rows in the split's files", "malformed")
  ids = unique_ids([row.id for row in rows])
  rows = [row if row.id == new_id else dataclasses.replace(row, id=new_id)
          for row, new_id in zip(rows, ids)]
  if skipped:
    kinds = collections.Counter(s.kind for s in skipped)
    logger.warning("%s/%s: skipped %d bad rows (%s); first: %s", name, split, len(skipped),
                   ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
                   f"{skipped[0].row}: {skipped[0].reason} [file: {skipped[0].file}]")
  return Benchmark(name, split, rows, skipped, option_seed)
