"""Reports a person reads: metrics.json, a markdown table, the turn-scaling plot, trajectory viewers."""

from __future__ import annotations

import collections
import json
import os
import textwrap
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from mini_o3_jax.agent import tools
from mini_o3_jax.agent.trajectory import Trajectory

_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def write_metrics(path: str, rows: Sequence[dict], **extra: Any) -> None:
  """metrics.json: {"eval": rows, ...extra}; written atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"eval": list(rows), **extra}, f, indent=2, default=str)
  os.replace(tmp, path)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def accuracy_grid(rows: Sequence[dict]) -> str:
  """One line per (model, tier), one column per turn budget: accuracy ± standard error."""
  budgets = sorted({r["max_turns"] for r in rows})
  cells = collections.defaultdict(dict)
  for r in rows:
    cells[(r["model"], r["tier"])][r["max_turns"]] = r
  lines = ["| model | tier | n | " + " | ".join(f"{b} turns" for b in budgets) + " |",
           "|---|---|---|" + "---|" * len(budgets)]
  for (model, tier), by_budget in cells.items():
    n = next(iter(by_budget.values()))["n"]
    vals = [f"{100 * by_budget[b]['accuracy']:.1f} ± {100 * by_budget[b]['accuracy_se']:.1f}" if b in by_budget
            else "" for b in budgets]
    lines.append(f"| {model} | {tier} | {n} | " + " | ".join(vals) + " |")
  return "\n".join(lines)


def plot_turn_scaling(path: str, rows: Sequence[dict], title: str = "Accuracy vs test-time turn budget") -> None:
  """One panel per tier, one line per model; x = max turns (log2), y = accuracy with ±1 SE band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tiers = sorted({r["tier"] for r in rows}, key=["easy", "medium", "hard"].index
                 if all(r["tier"] in ("easy", "medium", "hard") for r in rows) else None)
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(tiers), figsize=(4.2 * len(tiers), 3.6), squeeze=False, sharey=True)
  for ax, tier in zip(axes[0], tiers):
    for i, model in enumerate(models):
      pts = sorted((r["max_turns"], r["accuracy"], r["accuracy_se"]) for r in rows
                   if r["tier"] == tier and r["model"] == model)
      if not pts:
        continue
      x, y, se = map(np.asarray, zip(*pts))
      c = _COLOURS[i % len(_COLOURS)]
      ax.plot(x, 100 * y, marker="o", color=c, label=model)
      ax.fill_between(x, 100 * (y - se), 100 * (y + se), color=c, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max turns at test time")
    ax.set_title(tier)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("accuracy (%)")
  axes[0][-1].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def render_trajectory(traj: Trajectory, *, thumb: int = 224, width: int = 1200) -> Image.Image:
  """A picture of one trajectory: the original with every crop's box drawn, the crops, the turns' text."""
  images = [im if isinstance(im, Image.Image) else Image.open(im).convert("RGB") for im in traj.images]
  # Where each image lies in the original, following the crop chain.
  regions = {0: (0.0, 0.0, 1.0, 1.0)}
  boxes = []
  for k, turn in enumerate(traj.turns):
    a = turn.action
    if isinstance(a, tools.ToolCall) and turn.observation_index is not None:
      px0, py0, px1, py1 = regions.get(a.source_index, (0.0, 0.0, 1.0, 1.0))
      x0, y0, x1, y1 = (min(max(c, 0.0), 1.0) for c in a.bbox)
      w, h = px1 - px0, py1 - py0
      regions[turn.observation_index] = (px0 + x0 * w, py0 + y0 * h, px0 + x1 * w, py0 + y1 * h)
      boxes.append((k, regions[turn.observation_index]))
  original = images[0].copy()
  draw = ImageDraw.Draw(original)
  ow, oh = original.size
  for k, (x0, y0, x1, y1) in boxes:
    c = _COLOURS[k % len(_COLOURS)]
    draw.rectangle((x0 * ow, y0 * oh, x1 * ow, y1 * oh), outline=c, width=max(2, ow // 300))
  scale = 2 * thumb / max(ow, oh)
  panels = [original.resize((max(1, int(ow * scale)), max(1, int(oh * scale))))]
  panels += [im.resize((thumb, max(1, int(thumb * im.size[1] / im.size[0])))) for im in images[1:]]
  lines = [f"Q: {traj.question}   gold: {traj.gold}   stop: {traj.stop_reason}"]
  for k, turn in enumerate(traj.turns):
    extra = f"  -> observation {turn.observation_index}" if turn.observation_index else (
        f"  -> ERROR {turn.error}" if turn.error else "")
    lines += textwrap.wrap(f"[{k}] {turn.text.strip()}{extra}", width=width // 7)
  text_h = 14 * len(lines) + 10
  canvas_w = max(width, panels[0].size[0] + thumb + 6)
  placements, x, y, row_h = [], 0, 0, 0  # panels left to right, wrapping to new rows
  for p in panels:
    if x and x + p.size[0] > canvas_w:
      x, y, row_h = 0, y + row_h + 6, 0
    placements.append((x, y))
    x += p.size[0] + 6
    row_h = max(row_h, p.size[1])
  y += row_h
  canvas = Image.new("RGB", (canvas_w, y + 6 + text_h), "white")
  for p, (px, py) in zip(panels, placements):
    canvas.paste(p, (px, py))
  draw = ImageDraw.Draw(canvas)
  for i, line in enumerate(lines):
    draw.text((6, y + 10 + 14 * i), line, fill="black")
  return canvas
