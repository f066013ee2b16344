"""Progress bars for long work: a live tqdm bar on a terminal, periodic plain lines in a log file.

Under `nohup` (a TPU worker, a background run) stderr is a file, where tqdm's carriage-return
redraws pile up into one unreadable line; there the bar prints one ordinary line (with its metrics
postfix) at most every `LOG_INTERVAL_S` seconds instead.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _PlainLines:
  """A file for tqdm that turns each redraw into one newline-terminated line of `stream`."""

  def __init__(self, stream: TextIO):
    self.stream = stream

  def write(self, text: str) -> None:
    line = text.replace("\r", "").strip()
    if line:
      self.stream.write(line + "\n")

  def flush(self) -> None:
    self.stream.flush()


class _PeriodicBar(tqdm):
  """A bar whose postfix updates wait for the next periodic redraw (tqdm redraws on each by default)."""

  def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):  # noqa: ARG002
    super().set_postfix(ordered_dict, refresh=False, **kwargs)

  def set_postfix_str(self, s="", refresh=True):  # noqa: ARG002
    super().set_postfix_str(s, refresh=False)


def bar(iterable: Any = None, *, stream: TextIO | None = None, **kwargs: Any) -> tqdm:
  """`tqdm(iterable, **kwargs)` on `stream` (default stderr), as plain periodic lines unless it is a terminal."""
  stream = sys.stderr if stream is None else stream
  if hasattr(stream, "isatty") and stream.isatty():
    return tqdm(iterable, file=stream, **kwargs)
  return _PeriodicBar(iterable, file=_PlainLines(stream), mininterval=LOG_INTERVAL_S,
                     maxinterval=LOG_INTERVAL_S * 10, ascii=True, dynamic_ncols=False, ncols=100, **kwargs)
