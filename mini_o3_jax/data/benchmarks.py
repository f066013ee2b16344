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

import collections
import concurrent.futures
import dataclasses
import logging
import os
from typing import Callable, Iterator, Mapping, Sequence

from mini_o3_jax.data.benchmark_layouts import (VSTAR_CATEGORIES, hrbench_path, read_hrbench, read_visualprobe,
                                                read_vstar, visualprobe_files, visualprobe_folder)
# The rows, the random-access benchmark and the shared helpers, under the names this module has always offered.
from mini_o3_jax.data.benchmark_rows import (IMAGE_PLACEHOLDER, Benchmark, BenchmarkDataError,  # noqa: F401
                                             BenchmarkRecord, BenchmarkRow, RowOrError, SkippedRow, check_row_image,
                                             find_child_dir, shuffle_options, unique_ids)

logger = logging.getLogger(__name__)

BENCHMARK_SPLITS: Mapping[str, tuple[str, ...]] = {
    "visualprobe": ("train", "easy", "medium", "hard"),
    "vstar": ("test",),
    "hrbench_4k": ("test",),
    "hrbench_8k": ("test",),
}


# ------------------------------------------------------------------------------------------------
# Public entry points.

_READERS: Mapping[str, Callable[[str, str, int], Iterator[RowOrError]]] = {
    "visualprobe": read_visualprobe,
    "vstar": read_vstar,
    "hrbench_4k": lambda d, s, o: read_hrbench(d, s, o, "hrbench_4k"),
    "hrbench_8k": lambda d, s, o: read_hrbench(d, s, o, "hrbench_8k"),
}


def available_splits(name: str, data_dir: str) -> tuple[str, ...]:
  """The splits of `name` whose files are present in `data_dir`."""
  _check_name(name)
  if name == "visualprobe":
    found = []
    for split in BENCHMARK_SPLITS[name]:
      folder = visualprobe_folder(data_dir, split)
      if folder is not None and any(visualprobe_files(folder, split)):
        found.append(split)
    return tuple(found)
  if name == "vstar":
    present = all(find_child_dir(data_dir, c) for c in VSTAR_CATEGORIES)
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
    return list(pool.map(check_row_image, rows))


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
