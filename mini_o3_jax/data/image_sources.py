"""Where a benchmark row's encoded image comes from, read lazily: a file, or a parquet cell holding
bytes, base64, a data URI or a path; decoding and a cheap full check of the bytes.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import io
import os
import re
import threading
from typing import Any, Callable, Mapping, Protocol

from PIL import Image

from mini_o3_jax.processing import image as image_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".webp")
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class ImageSource(Protocol):
  """Where a row's encoded image lives."""

  @property
  def origin(self) -> str:
    """The file (and cell) to name in error messages."""

  def read_bytes(self) -> bytes:
    """The encoded image; raises OSError / ValueError when unavailable."""


@dataclasses.dataclass(frozen=True)
class FileImage:
  """An image file on disk."""
  path: str

  @property
  def origin(self) -> str:
    return self.path

  def read_bytes(self) -> bytes:
    with open(self.path, "rb") as f:
      return f.read()


@dataclasses.dataclass(frozen=True)
class PathResolver:
  """Resolves image paths found in a release relative to its base directories.

  `folder`, when set, also maps ``<FolderName>/rest`` onto the folder actually on disk, so a
  lower-cased download of ``VisualProbe_Hard/`` still finds ``VisualProbe_Hard/data/x.jpg``.
  """
  base_dirs: tuple[str, ...]
  folder: str | None = None

  def __call__(self, path: str) -> str:
    if os.path.isabs(path):
      return path
    candidates = [os.path.join(base, path) for base in self.base_dirs]
    if self.folder is not None:
      head, _, rest = path.replace("\\", "/").partition("/")
      if rest and head.lower() == os.path.basename(self.folder).lower():
        candidates.append(os.path.join(self.folder, rest))
    for candidate in candidates:
      if os.path.exists(candidate):
        return candidate
    return candidates[0] if candidates else path


class ParquetColumn:
  """Random access to one column of a parquet file, reading one row group at a time.

  Keeps only the last row group read (encoded), so images are never all held decoded. A file
  written as a single row group (the pandas default) is therefore read whole on the first access
  and its encoded column kept in memory; for bounded memory use the TFDS copy instead
  (`tfds_builders`). Safe to share between threads and to pickle (the cache is dropped).
  """

  def __init__(self, path: str, column: str):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.path = path
    self.column = column
    metadata = pq.ParquetFile(path).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
    self.num_rows = sum(sizes)
    self._lock = threading.Lock()
    self._cache: tuple[int, Any] | None = None

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_lock"]
    state["_cache"] = None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def cell(self, row: int) -> Any:
    """The Python value of the column at file row `row`."""
    if not 0 <= row < self.num_rows:
      raise IndexError(f"row {row} out of range for {self.path} ({self.num_rows} rows)")
    group = bisect.bisect_right(self._starts, row) - 1
    with self._lock:
      if self._cache is None or self._cache[0] != group:
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
        table = pq.ParquetFile(self.path).read_row_group(group, columns=[self.column])
        self._cache = (group, table.column(0))
      values = self._cache[1]
    return values[row - self._starts[group]].as_py()


@dataclasses.dataclass(frozen=True)
class ParquetCellImage:
  """An image stored in (or referenced from) one cell of a parquet column."""
  column: ParquetColumn
  row: int
  resolve: Callable[[str], str]

  @property
  def origin(self) -> str:
    return f"{self.column.path} (row {self.row}, column {self.column.column!r})"

  def read_bytes(self) -> bytes:
    return image_bytes_from_cell(self.column.cell(self.row), self.resolve)


def image_bytes_from_cell(cell: Any, resolve: Callable[[str], str] = lambda p: p) -> bytes:
  """Encoded image bytes from a cell of an image column.

  Accepts: raw ``bytes``; a ``{"bytes", "path"}`` struct (the HF ``Image`` feature; ``bytes`` wins,
  else ``path`` is read); a base64 string, with or without a ``data:image/...;base64,`` prefix; a
  path string (resolved with `resolve`); or a one-element list of any of these.

  Raises:
    FileNotFoundError: a referenced file does not exist (``filename`` names it).
    ValueError: the cell holds none of the above.
  """
  if isinstance(cell, (list, tuple)):
    if len(cell) != 1:
      raise ValueError(f"expected exactly one image in the cell, found {len(cell)}")
    cell = cell[0]
  if isinstance(cell, (bytes, bytearray, memoryview)):
    return bytes(cell)
  if isinstance(cell, Mapping):
    if cell.get("bytes"):
      return bytes(cell["bytes"])
    if cell.get("path"):
      return FileImage(resolve(str(cell["path"]))).read_bytes()
    raise ValueError("image struct has neither bytes nor path")
  if isinstance(cell, str):
    if _looks_like_path(cell):
      return FileImage(resolve(cell)).read_bytes()
    try:
      return base64.b64decode(_DATA_URI.sub("", cell.strip()), validate=True)
    except binascii.Error as err:
      raise ValueError(f"image string is neither a path nor valid base64 ({err})") from err
  raise ValueError(f"unsupported image cell of type {type(cell).__name__}")


def _looks_like_path(text: str) -> bool:
  # Base64 has no '.', so a short string with an image extension can only be a path.
  return len(text) < 4096 and text.strip().lower().endswith(
      tuple(ext.lower() for ext in IMAGE_EXTENSIONS))


def decode_image(data: bytes) -> Image.Image:
  """Decodes encoded bytes to an upright RGB PIL image (fully loaded; see `image_lib.load_image`)."""
  return image_lib.load_image(data)


def verify_image(data: bytes) -> None:
  """Raises if `data` is not a decodable image.

  JPEGs are decoded at 1/8 scale: the whole entropy-coded stream is still read (so truncation is
  caught) at a fraction of the cost of a full 8K decode.
  """
  with Image.open(io.BytesIO(data)) as image:
    if image.format == "JPEG":
      image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()
