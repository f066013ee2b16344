"""Where the agent's direct searches fail, call by call, from an evaluation's trajectories.

  PYTHONPATH=. python tools/experiments/issue13/chain.py EVAL_JSONL [LABEL_SHADE=0.0] [SEED=0]

Rebuilds each test task from its id (the demo's world at that shade and seed), follows every crop call back to the
region of the original image it shows (boxes are relative to the call's source image) and prints, per call, how often
the region holds the target's whole shape and its glyph, each conditioned on the searches that got that far with the
glyph in view, then how often the answer is right after a last crop that holds the glyph.
"""

import json

import numpy as np

from configs import demo
from mini_o3_jax import run_config
from mini_o3_jax.data import synthetic
from run_model import cli_args

path, shade, seed = cli_args(0.0, 0)
config = demo.get_config()
config.label_shade, config.seed = shade, seed
tcfg = run_config.task_config(config)


def inside(inner, outer, tol=1e-9):
  return (inner[0] >= outer[0] - tol and inner[1] >= outer[1] - tol and inner[2] <= outer[2] + tol
          and inner[3] <= outer[3] + tol)


def compose(parent, box):
  """The region of the original image (relative) that `box` (relative to `parent`'s view) shows."""
  w, h = parent[2] - parent[0], parent[3] - parent[1]
  b = np.clip(box, 0.0, 1.0)
  return (parent[0] + b[0] * w, parent[1] + b[1] * h, parent[0] + b[2] * w, parent[1] + b[3] * h)


calls = {}  # call k -> [(holds shape, holds glyph, glyph in view before)]
answered = []
for line in open(path):
  row = json.loads(line)
  tier, split, index = synthetic.parse_task_id(row["id"])
  task = synthetic.make_task(tier, index, tcfg, split)
  target = next(o for o in task.objects if o.is_target)
  regions = [(0.0, 0.0, 1.0, 1.0)]
  glyph_seen = True
  for k, turn in enumerate(row["turns"]):
    action = turn["action"] or {}
    if action.get("type") != "tool_call" or turn.get("error"):
      break
    source = 0 if action["source"] == "original_image" else int(action["source"].split("_")[1])
    region = compose(regions[source], action["bbox_2d"])
    regions.append(region)
    calls.setdefault(k, []).append((inside(target.box, region), inside(target.detail_box, region), glyph_seen))
    glyph_seen = inside(target.detail_box, region)
  if row["final_answer"] is not None:
    answered.append((glyph_seen and len(regions) > 1, row["final_answer"] == row["gold"]))
print(path)
for k, rows in sorted(calls.items()):
  r = np.asarray(rows, bool)
  given = r[r[:, 2]]
  print(f"call {k + 1}: {len(r)} made; holds the shape {100 * r[:, 0].mean():.0f} %, the glyph {100 * r[:, 1].mean():.0f} %;"
        f" after a view holding the glyph ({len(given)}): shape {100 * given[:, 0].mean():.0f} %, glyph "
        f"{100 * given[:, 1].mean():.0f} %")
a = np.asarray(answered, bool)
print(f"answers: {len(a)}, right {100 * a[:, 1].mean():.1f} %; after a last crop holding the glyph ({a[:, 0].sum()}): right "
      f"{100 * a[a[:, 0], 1].mean():.0f} %; otherwise right {100 * a[~a[:, 0], 1].mean():.0f} %")
