"""The three release layouts read into benchmark rows (see `data.benchmarks`' docstring for each):
VisualProbe (JSON or the hub's parquet), V* (a JSON beside each image) and HR-Bench (one parquet file).
Each reader yields a `BenchmarkRow`, or a `BenchmarkDataError` for a row it cannot use.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import json
import os
from typing import Any, Callable, Iterator, Mapping

from mini_o3_jax.data import image_sources
from mini_o3_jax.data.benchmark_rows import (LETTERS, BenchmarkRow, RowOrError, as_text, find_child_dir, malformed,
                                             read_parquet_metadata, shuffle_options, strip_image_placeholder)

VISUALPROBE_FOLDERS = {
    "train": "VisualProbe_train",
    "easy": "VisualProbe_Easy",
    "medium": "VisualProbe_Medium",
    "hard": "VisualProbe_Hard",
}
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")


# ------------------------------------------------------------------------------------------------
# VisualProbe.

def visualprobe_folder(data_dir: str, split: str) -> str | None:
  return find_child_dir(data_dir, VISUALPROBE_FOLDERS[split])


def visualprobe_files(folder: str, split: str) -> tuple[str | None, list[str]]:
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
    return malformed(where, file, f"row is a {type(raw).__name__}, not an object")
  problem, answer = raw.get("problem"), as_text(raw.get("solution"))
  if not isinstance(problem, str) or not strip_image_placeholder(problem):
    return malformed(where, file, "missing or empty 'problem'")
  if answer is None:
    return malformed(where, file, f"missing, empty or NaN 'solution' ({raw.get('solution')!r})")
  source = image(raw)
  if isinstance(source, str):
    return malformed(where, file, source)
  row_id = as_text(raw.get("doc_id")) or fallback_id
  category = as_text(raw.get("data_source")) or f"visual_probe_{split}"
  return BenchmarkRow(id=row_id, question=strip_image_placeholder(problem), options=None,
                      answer=answer, category=category, image=source, where=where)


def read_visualprobe(data_dir: str, split: str, option_seed: int) -> Iterator[RowOrError]:
  del option_seed  # free-form answers
  folder = visualprobe_folder(data_dir, split)
  if folder is None:
    raise FileNotFoundError(
        f"no {VISUALPROBE_FOLDERS[split]}/ folder in {data_dir} (download "
        f"Mini-o3/{VISUALPROBE_FOLDERS[split]} there)")
  json_path, parquet_paths = visualprobe_files(folder, split)
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
    raise malformed(f"visualprobe/{split}", path, f"invalid JSON ({err})") from err
  except UnicodeDecodeError as err:
    raise malformed(f"visualprobe/{split}", path, f"not UTF-8 text ({err.reason} at byte {err.start}); "
                     "save it as UTF-8") from err
  if not isinstance(raws, list):
    raise malformed(f"visualprobe/{split}", path, "expected a JSON list of rows")
  if not raws:
    raise malformed(f"visualprobe/{split}", path, "the file holds no rows")

  def image(raw: Mapping[str, Any]) -> image_sources.ImageSource | str:
    images = raw.get("images")
    if isinstance(images, str):
      images = [images]
    if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], str)):
      return "'images' must be a list holding one image path"
    return image_sources.FileImage(resolver(images[0]))

  for index, raw in enumerate(raws):
    doc_id = as_text(raw.get("doc_id")) if isinstance(raw, Mapping) else None
    where = f"visualprobe/{split} row {index}" + (f" (doc_id {doc_id})" if doc_id else "")
    yield _visualprobe_row(raw, split, where, path, image, fallback_id=f"{split}_{index}")


def _parquet_cell_image(column: image_sources.ParquetColumn, index: int, resolve: Callable[[str], str],
                        raw: Mapping[str, Any]) -> image_sources.ImageSource:
  del raw  # the image lives in its own column, read lazily
  return image_sources.ParquetCellImage(column, index, resolve)


def _visualprobe_parquet_rows(path: str, split: str,
                              resolver: image_sources.PathResolver) -> Iterator[RowOrError]:
  fields = ("problem", "solution", "doc_id", "data_source")
  names, raws = read_parquet_metadata(path, fields)
  image_column = next((c for c in ("images", "image") if c in names), None)
  if image_column is None:
    raise malformed(f"visualprobe/{split}", path, "no 'images' or 'image' column")
  column = image_sources.ParquetColumn(path, image_column)
  cell_resolver = dataclasses.replace(
      resolver, base_dirs=resolver.base_dirs + (os.path.dirname(path),))
  stem = os.path.splitext(os.path.basename(path))[0]
  for index, raw in enumerate(raws):
    doc_id = as_text(raw.get("doc_id"))
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
    return malformed(where, path, f"invalid JSON ({type(err).__name__}: {err})")
  if not isinstance(raw, Mapping):
    return malformed(where, path, "expected a JSON object")
  question, options = raw.get("question"), raw.get("options")
  if not isinstance(question, str) or not question.strip():
    return malformed(where, path, "missing or empty 'question'")
  if (not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
      or not all(as_text(o) for o in options)):
    return malformed(where, path, "'options' must be a list of 2+ non-empty strings")
  presented, letter = shuffle_options([as_text(o) for o in options], row_id, option_seed)
  return BenchmarkRow(id=row_id, question=question.strip(), options=tuple(presented),
                      answer=letter, category=category,
                      image=image_sources.FileImage(_vstar_image_path(path)), where=where)


def read_vstar(data_dir: str, split: str, option_seed: int) -> Iterator[RowOrError]:
  del split
  folders = {c: find_child_dir(data_dir, c) for c in VSTAR_CATEGORIES}
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
  row_label = as_text(raw.get("index"))
  where = f"{name}/test row {index}" + (f" (index {row_label})" if row_label else "")
  question = as_text(raw.get("question"))
  if question is None:
    return malformed(where, path, "missing or empty 'question'")
  options = []
  for letter in "ABCD":
    text = as_text(raw.get(letter))
    if text is None:
      break  # options are contiguous: A, B[, C[, D]]
    options.append(text)
  answer = (as_text(raw.get("answer")) or "").strip("() .").upper()
  if len(options) < 2:
    return malformed(where, path, "fewer than two options in columns A-D")
  if answer not in LETTERS[:len(options)]:
    return malformed(where, path, f"answer {raw.get('answer')!r} is not one of the option letters")
  return BenchmarkRow(id=row_label or str(index), question=question, options=tuple(options),
                      answer=answer, category=as_text(raw.get("category")) or "unknown",
                      image=image_sources.ParquetCellImage(column, index, image_sources.PathResolver((os.path.dirname(path),))),
                      where=where)


def read_hrbench(data_dir: str, split: str, option_seed: int,
                  name: str) -> Iterator[RowOrError]:
  del split, option_seed  # options are already rotated in the file
  path = hrbench_path(data_dir, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (download DreamMr/HR-Bench there)")
  names, raws = read_parquet_metadata(path, _HRBENCH_FIELDS)
  absent = [c for c in ("question", "answer", "A", "B", "image") if c not in names]
  if absent:
    raise malformed(f"{name}/test", path, f"missing columns {absent}")
  column = image_sources.ParquetColumn(path, "image")
  for index, raw in enumerate(raws):
    yield _hrbench_row(raw, index, name, path, column)
