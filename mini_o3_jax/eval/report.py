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
  """One line per (model, tier), one column per turn budget: accuracy and its 95% Wilson interval."""
  budgets = sorted({r["max_turns"] for r in rows})
  cells = collections.defaultdict(dict)
  for r in rows:
    cells[(r["model"], r["tier"])][r["max_turns"]] = r
  lines = ["| model | tier | n | " + " | ".join(f"{b} turns" for b in budgets) + " |",
           "|---|---|---|" + "---|" * len(budgets)]
  for (model, tier), by_budget in cells.items():
    n = next(iter(by_budget.values()))["n"]
    vals = [_accuracy_cell(by_budget[b]) if b in by_budget else "" for b in budgets]
    lines.append(f"| {model} | {tier} | {n} | " + " | ".join(vals) + " |")
  return "\n".join(lines)


def _accuracy_cell(row: dict) -> str:
  return f"{100 * row['accuracy']:.1f} [{100 * row['accuracy_low']:.0f}, {100 * row['accuracy_high']:.0f}]"


# How each model is drawn: masked and unmasked RL share a colour (solid vs dashed) so they read as a pair.
_STYLES = {"sft": dict(color="#1f77b4", linestyle="-", marker="s"),
           "rl": dict(color="#d62728", linestyle="-", marker="o"),
           "rl_no_overturn_mask": dict(color="#d62728", linestyle="--", marker="o", markerfacecolor="white"),
           "no_tools": dict(color="#555555", linestyle=":", marker=None)}


def plot_turn_scaling(path: str, rows: Sequence[dict], *, train_turn_limit: int | None = None,
                      title: str = "Accuracy vs test-time turn budget") -> list[str]:
  """The paper's turn-scaling figure: one panel per tier, accuracy against the test-time turn budget.

  Bands are 95% Wilson intervals; a model evaluated at a single budget (no_tools) is a horizontal
  baseline; a vertical line marks the turn limit used in training. Writes `path` (PNG) and the same
  figure as PDF beside it; returns both paths.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  tiers = sorted({r["tier"] for r in rows}, key=["easy", "medium", "hard"].index
                 if all(r["tier"] in ("easy", "medium", "hard") for r in rows) else None)
  models = list(dict.fromkeys(r["model"] for r in rows))
  budgets = sorted({r["max_turns"] for r in rows if r["model"] != "no_tools"}) or [1]
  fig, axes = plt.subplots(1, len(tiers), figsize=(4.4 * len(tiers), 3.9), squeeze=False, sharey=True)
  for ax, tier in zip(axes[0], tiers):
    for i, model in enumerate(models):
      pts = sorted((r["max_turns"], r["accuracy"], r["accuracy_low"], r["accuracy_high"], r["n"]) for r in rows
                   if r["tier"] == tier and r["model"] == model)
      if not pts:
        continue
      x, y, low, high, n = map(np.asarray, zip(*pts))
      style = _STYLES.get(model, dict(color=_COLOURS[i % len(_COLOURS)], linestyle="-", marker="^"))
      label = f"{model} (n={int(n[0])})"
      if len(x) == 1 and len(budgets) > 1:  # one budget only: a baseline across the axis
        ax.axhline(100 * y[0], color=style["color"], linestyle="--", linewidth=1.2, label=label)
        ax.axhspan(100 * low[0], 100 * high[0], color=style["color"], alpha=0.08)
        continue
      ax.plot(x, 100 * y, label=label, **style)
      ax.fill_between(x, 100 * low, 100 * high, color=style["color"], alpha=0.12)
    if train_turn_limit:
      ax.axvline(train_turn_limit, color="black", linewidth=0.8, alpha=0.6)
      ax.annotate(f"training limit ({train_turn_limit})", (train_turn_limit, 0.98), xycoords=("data", "axes fraction"),
                  rotation=90, va="top", ha="right", fontsize=7, alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(ticker.FixedLocator(budgets))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([str(b) for b in budgets]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlim(budgets[0] / 1.25, budgets[-1] * 1.25)
    ax.set_xlabel("max turns at test time")
    ax.set_title(tier)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("accuracy (%)")
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.suptitle(f"{title}  (shaded: 95% Wilson interval)", fontsize=10)
  fig.tight_layout()
  pdf = os.path.splitext(path)[0] + ".pdf"
  fig.savefig(path, dpi=150)
  fig.savefig(pdf)
  plt.close(fig)
  return [path, pdf]


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
