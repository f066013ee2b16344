"""The cold-start collector's output directory: appended per question, repaired on resume.

trajectories.jsonl (kept trajectories, images under images/), progress.jsonl (one line per finished
question), run.json (the settings a rerun must match) and summary.json; every write is one flushed and
fsynced append or an atomic replace (see `data.coldstart_gen`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import zlib
from typing import Any, Mapping

from mini_o3_jax.agent.trajectory import Trajectory

log = logging.getLogger(__name__)

TRAJECTORIES = "trajectories.jsonl"
PROGRESS = "progress.jsonl"
SUMMARY = "summary.json"
RUN = "run.json"
IMAGES = "images"


def read_jsonl_lines(path: str) -> list[tuple[int, str]]:
  with open(path, encoding="utf-8") as f:
    return [(n, line) for n, line in enumerate(f, 1) if line.strip()]


def _safe_stem(question_id: str) -> str:
  """A file-name stem for an id; ids that had to change get a hash so two never collide."""
  stem = re.sub(r"[^A-Za-z0-9_.-]", "_", question_id)
  return stem if stem == question_id else f"{stem}-{zlib.crc32(question_id.encode()):08x}"


def _write_atomically(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _append(path: str, text: str) -> None:
  if not text:
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _parse_lines(path: str) -> tuple[list[dict], bool]:
  """JSON lines of `path` and whether a torn (unparseable or unterminated) last line was dropped."""
  if not os.path.exists(path):
    return [], False
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  torn = lines[-1] != ""  # a complete file ends with a newline
  body = lines[:-1]
  out = []
  for n, line in enumerate(body, 1):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n == len(body) and not torn:
        torn = True  # the last complete line is garbage: a crash mid-write (e.g. after a partial fsync)
        break
      raise ValueError(f"{path}:{n}: corrupt line in the middle of the file: {e}") from e
  return out, torn


class OutputDir:
  """trajectories.jsonl + images/ + progress.jsonl + run.json + summary.json under one directory."""

  def __init__(self, directory: str):
    self.dir = os.fspath(directory)
    self.trajectories = os.path.join(self.dir, TRAJECTORIES)
    self.progress = os.path.join(self.dir, PROGRESS)
    self.images = os.path.join(self.dir, IMAGES)

  def check_settings(self, settings: Mapping[str, Any]) -> None:
    """Writes run.json on the first run; a later run must bring the same settings."""
    os.makedirs(self.images, exist_ok=True)
    path = os.path.join(self.dir, RUN)
    settings = json.loads(json.dumps(settings))
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        before = json.load(f)
      if before != settings:
        diff = {k: (before.get(k), settings.get(k)) for k in set(before) | set(settings)
                if before.get(k) != settings.get(k)}
        raise ValueError(f"{self.dir} was written with other settings (before, now): {diff}; resume with "
                         "the same settings or use a new output directory")
    else:
      _write_atomically(path, json.dumps(settings, indent=2) + "\n")

  def recover(self) -> list[dict]:
    """Progress records of the finished questions, after making the files agree with them."""
    records, torn = _parse_lines(self.progress)
    if torn:
      log.warning("%s: dropped a torn last line", self.progress)
      _write_atomically(self.progress, "".join(json.dumps(r) + "\n" for r in records))
    kept_by_id = {r["id"]: r["kept"] for r in records}
    if len(kept_by_id) != len(records):
      raise ValueError(f"{self.progress} lists a question twice")
    if not os.path.exists(self.trajectories):
      _write_atomically(self.trajectories, "")  # exists even when nothing is kept
    lines, torn = _parse_lines(self.trajectories)
    good = [d for d in lines if d.get("id") in kept_by_id]
    counts = collections.Counter(d["id"] for d in good)
    bad = {q: (counts.get(q, 0), n) for q, n in kept_by_id.items() if counts.get(q, 0) != n}
    if bad:
      raise ValueError(f"{self.trajectories} disagrees with {self.progress} (lines, expected) for {bad}")
    if torn or len(good) != len(lines):
      log.warning("%s: dropped %d line(s) of unfinished questions%s", self.trajectories, len(lines) - len(good),
                  " and a torn last line" if torn else "")
      _write_atomically(self.trajectories, "".join(json.dumps(d) + "\n" for d in good))
    return records

  def append(self, outcome) -> None:
    """Images, then the kept lines, then the progress line: a crash anywhere leaves a repairable state.
    `outcome` is a `coldstart_gen.QuestionOutcome`."""
    stem = _safe_stem(outcome.id)
    lines = []
    original = None
    for traj in outcome.kept:
      if original is None:
        original = os.path.join(self.images, f"{stem}_0.png")
        traj.images[0].save(original, format="PNG")
      # The original is shared by the question's samples; each sample's crops get their own files.
      traj = dataclasses.replace(traj, images=[os.path.relpath(original, self.dir)] + list(traj.images[1:]))
      saved = traj.save_images(self.images, stem=f"{stem}_s{traj.metadata['sample']}", relative_to=self.dir)
      lines.append(json.dumps(saved.to_json_dict()) + "\n")
    _append(self.trajectories, "".join(lines))
    _append(self.progress, json.dumps(outcome.record()) + "\n")

  def write_summary(self, summary: Mapping[str, Any]) -> str:
    path = os.path.join(self.dir, SUMMARY)
    _write_atomically(path, json.dumps(summary, indent=2) + "\n")
    return path


def load_collected(directory: str) -> list[Trajectory]:
  """The kept trajectories of an output directory, image paths made absolute (ready for SFT)."""
  path = os.path.join(os.fspath(directory), TRAJECTORIES)
  base = os.path.dirname(os.path.abspath(path))
  out = []
  for n, line in read_jsonl_lines(path):
    traj = Trajectory.from_json(line, f"{path}:{n}")
    images = [im if os.path.isabs(im) else os.path.join(base, im) for im in traj.images]
    out.append(dataclasses.replace(traj, images=images))
  return out
