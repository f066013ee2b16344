"""Reports a person reads: metrics.json, a markdown table, the turn-scaling plot, trajectory viewers."""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


def _crop_regions(traj: Trajectory) -> list[tuple[int, int, str, tuple[float, float, float, float]]]:
  """(turn, observation index, source name, region in the original's relative coordinates) per crop,
  following the chain of crops of crops."""
  regions = {0: (0.0, 0.0, 1.0, 1.0)}
  out = []
  for k, turn in enumerate(traj.turns):
    a = turn.action
    if isinstance(a, tools.ToolCall) and turn.observation_index is not None:
      px0, py0, px1, py1 = regions.get(a.source_index, (0.0, 0.0, 1.0, 1.0))
      x0, y0, x1, y1 = (min(max(c, 0.0), 1.0) for c in a.bbox)
      w, h = px1 - px0, py1 - py0
      regions[turn.observation_index] = (px0 + x0 * w, py0 + y0 * h, px0 + x1 * w, py0 + y1 * h)
      out.append((k, turn.observation_index, tools.canonical_source(a.source_index),
                  regions[turn.observation_index]))
  return out


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
  """`text` wrapped to lines at most `width` pixels wide in `font`."""
  lines = []
  for paragraph in text.split("\n"):
    line = ""
    for word in paragraph.split(" "):
      trial = f"{line} {word}" if line else word
      if line and draw.textlength(trial, font=font) > width:
        lines.append(line)
        line = word
      else:
        line = trial
    lines.append(line)
  return lines


def _badge(draw: ImageDraw.ImageDraw, x: int, y: int, size: int, correct: bool) -> None:
  """A green disc with a tick, or a red one with a cross (drawn, so no font needs the glyphs)."""
  draw.ellipse((x, y, x + size, y + size), fill="#2ca02c" if correct else "#d62728")
  w = max(2, size // 8)
  if correct:
    draw.line([(x + size * 0.25, y + size * 0.52), (x + size * 0.43, y + size * 0.7),
               (x + size * 0.76, y + size * 0.32)], fill="white", width=w)
  else:
    for (a, b) in (((0.3, 0.3), (0.7, 0.7)), ((0.7, 0.3), (0.3, 0.7))):
      draw.line([(x + size * a[0], y + size * a[1]), (x + size * b[0], y + size * b[1])], fill="white", width=w)


def render_trajectory(traj: Trajectory, *, target_box: Sequence[float] | None = None, correct: bool | None = None,
                      thumb: int = 224, font_size: int = 15) -> Image.Image:
  """A picture of one trajectory a person can read.

  Left: the original with each crop's region drawn in its colour (and the target, when `target_box`
  (relative coordinates) is given, as a dashed white box). Right: the crops, each framed in the colour
  of its region and labelled with its turn, the image it was cut from and its box. Above: the question,
  the gold and final answers, the stop reason and, with `correct`, a tick or cross badge. Below: every
  turn's text, the turn numbers keyed to the colours.
  """
  font = ImageFont.load_default(size=font_size)
  small = ImageFont.load_default(size=max(10, font_size - 3))
  line_h = font_size + 5
  images = [im if isinstance(im, Image.Image) else Image.open(im).convert("RGB") for im in traj.images]
  crops = _crop_regions(traj)
  colour = {k: _COLOURS[n % len(_COLOURS)] for n, (k, _, _, _) in enumerate(crops)}

  original = images[0].convert("RGB")
  ow, oh = original.size
  scale = 2 * thumb / max(ow, oh)
  left = original.resize((max(1, round(ow * scale)), max(1, round(oh * scale))))
  lw, lh = left.size
  draw = ImageDraw.Draw(left)
  for k, _, _, (x0, y0, x1, y1) in crops:
    draw.rectangle((x0 * lw, y0 * lh, x1 * lw, y1 * lh), outline=colour[k], width=3)
  if target_box is not None:
    x0, y0, x1, y1 = (target_box[0] * lw, target_box[1] * lh, target_box[2] * lw, target_box[3] * lh)
    for t in np.arange(0.0, 1.0, 0.1):  # dashed: every other tenth of each side
      for (ax, ay, bx, by) in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)):
        draw.line([(ax + (bx - ax) * t, ay + (by - ay) * t), (ax + (bx - ax) * (t + 0.05), ay + (by - ay) * (t + 0.05))],
                  fill="white", width=2)

  # The crops in a grid of one or two rows as tall as the original, so no side is left half blank.
  label_h = 2 * (font_size + 2)
  rows = 2 if len(crops) > 1 else 1
  cell_h = lh // rows
  side = cell_h - label_h - 10
  cols = max(1, -(-len(crops) // rows))
  grid_w = cols * (side + 10) if crops else 0
  header = [f"Q: {traj.question}", f"gold: {traj.gold}   answer: {traj.final_answer}   stop: {traj.stop_reason}"]
  canvas_w = max(lw + 12 + grid_w, 900)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  body = []
  for k, turn in enumerate(traj.turns):
    extra = (f"  -> observation {turn.observation_index}" if turn.observation_index is not None
             else f"  -> ERROR {turn.error}" if turn.error else "")
    body.append((k, _wrap(probe, f"[{k}] {turn.text.strip()}{extra}", font, canvas_w - 20)))
  header_h = line_h * len(header) + 10
  top_h = lh
  body_h = line_h * sum(len(lines) for _, lines in body) + 10
  canvas = Image.new("RGB", (canvas_w, header_h + top_h + body_h + 10), "white")
  draw = ImageDraw.Draw(canvas)
  badge = 2 * line_h - 4
  text_x = 8 + (badge + 8 if correct is not None else 0)
  if correct is not None:
    _badge(draw, 8, 4, badge, correct)
  for i, line in enumerate(header):
    draw.text((text_x, 4 + line_h * i), line, fill="black", font=font)
  canvas.paste(left, (0, header_h))
  for n, (k, obs, source, _) in enumerate(crops):
    x = lw + 12 + (n % cols) * (side + 10)
    y = header_h + (n // cols) * cell_h
    im = images[obs].convert("RGB") if obs < len(images) else Image.new("RGB", (side, side), "lightgrey")
    fit = side / max(im.size)  # small crops are enlarged: each fills its cell
    im = im.resize((max(1, round(im.size[0] * fit)), max(1, round(im.size[1] * fit))))
    box = ", ".join(f"{c:.2f}" for c in traj.turns[k].action.bbox)
    draw.text((x, y), f"turn {k}, from {source}", fill=colour[k], font=small)
    draw.text((x, y + font_size + 2), f"[{box}]", fill=colour[k], font=small)
    canvas.paste(im, (x, y + label_h))
    draw.rectangle((x - 2, y + label_h - 2, x + im.size[0] + 1, y + label_h + im.size[1] + 1), outline=colour[k],
                   width=3)
  y = header_h + top_h + 8
  for k, lines in body:
    for line in lines:
      draw.text((8, y), line, fill=colour.get(k, "black"), font=font)
      y += line_h
  return canvas
