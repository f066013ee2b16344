"""Does the decoder know where the label is when it writes the label's call? A ridge read-out of its last hidden state.

  PYTHONPATH=. python tools/experiments/issue13/labelquery.py RUN_DIR [STAGE=pretrain_object] [LEVEL=medium] [N=300]
      [CALL=1]

CALL=1: the label's call (made on the shape's own view, aimed at the glyph); CALL=0: the shape's call (made on the
window, aimed at the whole shape): the same read-outs with that call's view, aim and scripted side.

Builds N held-out rows of the `object` phase (the search through the shape, teacher-forced), takes the decoder's final
hidden state where it writes the label's call's (CALL=1) first coordinate (the position of its first "0." token, which predicts
the x0 digit), and fits a ridge read-out of the glyph's centre in the object's view (relative) on two thirds of the
rows. On the other third it reports how often a crop of the scripted legible size centred there holds the glyph,
beside the decoder's own teacher-forced box's centre as it writes it and a blind crop at the view's centre: if the
hidden state holds the place and the written box does not use it, the digits are the wall; if the hidden state does
not hold it, reading the tower's mark is.
"""

import numpy as np

from mini_o3_jax import run_config
from mini_o3_jax.agent import tools
from mini_o3_jax.data import coldstart, grounding, scene_levels
from mini_o3_jax.pipeline import grounding_probe
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.train import batch as batch_lib
from run_model import cli_args, load_run, ridge, with_bias

run, stage_name, level, n, call = cli_args("pretrain_object", "medium", 300, 1)
config, tok, mcfg, model, step = load_run(run, stage_name, "pretrain/object")
stage = run_config.pretrain_stage(config, mcfg)
tcfg = run_config.task_config(config)
settings = image_lib.settings_for(mcfg)
zero_dot = {i for i in range(len(tok)) if tok.decode([i]).endswith("0.")}
rows, centres, sides, glyph_boxes = [], [], [], []
for i in range(n):
  task = scene_levels.make_scene(level, i, tcfg, scene_levels.HELDOUT_SPLIT)
  # the row asks about the shape its (seeded) questions locate first: drawn again with the same seed
  row = grounding.scene_example(task, tok, stage.questions, tcfg, np.random.default_rng(i), image=settings)
  questions = grounding.scene_questions(task, stage.questions, np.random.default_rng(i))
  target = task.objects[questions[0][3]] if questions else None
  search = coldstart.reflex_search(task, target, 2, via_object=True) if target is not None else None
  zoom = np.flatnonzero(row["kinds"] == grounding.KINDS.index("zoom"))
  if search is None or len(zoom) == 0:
    continue
  view = search.regions[call]  # the image the call is made on
  to_view = lambda b: ((b[0] - view[0]) / (view[2] - view[0]), (b[1] - view[1]) / (view[3] - view[1]),
                       (b[2] - view[0]) / (view[2] - view[0]), (b[3] - view[1]) / (view[3] - view[1]))
  g = to_view(target.detail_box if call == 1 else target.box)
  legible = tools.parse_action(search.calls[call + 1]).bbox
  rows.append(row)
  centres.append(((g[0] + g[2]) / 2, (g[1] + g[3]) / 2))
  sides.append((legible[2] - legible[0], legible[3] - legible[1]))
  glyph_boxes.append(g)
bcfg = batch_lib.BatchConfig(batch_size=16, pad_token_id=mcfg.text.pad_token_id)
feats, written = [], []
for s in range(0, len(rows), 16):
  chunk = rows[s:s + 16]
  batch = batch_lib.collate_sft(chunk, mcfg, bcfg, seq_len=max(stage.batch.length_buckets),
                                num_patches=max(stage.batch.patch_buckets))
  hidden = np.asarray(model.hidden_states(batch.inputs))
  logits = np.asarray(model.logits(model.hidden_states(batch.inputs)))
  ids = np.asarray(batch.inputs.input_ids)
  for r, row in enumerate(chunk):
    zoom = np.flatnonzero(row["kinds"] == grounding.KINDS.index("zoom"))
    starts = zoom[np.diff(np.concatenate([[-2], zoom])) > 1]
    span = [t for t in zoom if t >= starts[call] and (call + 1 == len(starts) or t < starts[call + 1])]
    pos = next(t for t in span[1:] if ids[r, t] in zero_dot)
    feats.append(hidden[r, pos])
    # the box as the decoder writes it, teacher-forced token by token
    text = tok.decode([int(ids[r, span[0]])] + [int(np.argmax(logits[r, t - 1])) for t in span[1:]])
    action = tools.parse_action(tools.truncate_at_stop(text))
    written.append(((action.bbox[0] + action.bbox[2]) / 2, (action.bbox[1] + action.bbox[3]) / 2)
                   if isinstance(action, tools.ToolCall) else (0.5, 0.5))
X, y = np.stack(feats), np.asarray(centres)
X = (X - X.mean(0)) / (X.std(0) + 1e-6)
k = len(X) * 2 // 3
w = ridge(X[:k], y[:k], lam=10.0)
pred = with_bias(X[k:]) @ w


def holds(c, side, g):
  return (c[0] - side[0] / 2 <= g[0] and g[2] <= c[0] + side[0] / 2 and c[1] - side[1] / 2 <= g[1]
          and g[3] <= c[1] + side[1] / 2)


test = range(k, len(X))
read_out = np.mean([holds(pred[j - k], sides[j], glyph_boxes[j]) for j in test])
own = np.mean([holds(written[j], sides[j], glyph_boxes[j]) for j in test])
blind = np.mean([holds((0.5, 0.5), sides[j], glyph_boxes[j]) for j in test])
err = lambda p: np.median(np.abs(np.asarray(p) - y[k:]).max(1))
print(f"{run} {stage_name} step {step} {level}: {len(test)} held-out rows; a legible crop centred on the read-out of "
      f"the hidden state holds its aim {100 * read_out:.0f} % (centre error {err(pred):.3f} of the view), on the "
      f"decoder's own teacher-forced box {100 * own:.0f} % ({err(written[k:]):.3f}), blind at the view's centre "
      f"{100 * blind:.0f} % ({err(np.full_like(pred, 0.5)):.3f})")

# The same call written greedily (the probe's prompt: the target's search, gold calls before it) on the test rows' scenes
probe = grounding_probe.GroundingProbe(grounding_probe.ProbeConfig(levels=(), scenes=0, seq_len=256, num_patches=288),
                                       stage.questions, tcfg, tok, mcfg)
tasks = [scene_levels.make_scene(level, i, tcfg, scene_levels.HELDOUT_SPLIT) for i in range(n)][-(len(X) - k):]
asked = [(t, p) for t in tasks if (p := probe._agent_prompt(t, "zoom", np.random.default_rng(1), call)) is not None]
texts = probe._generate(model, [p for _, p in asked], 28)
inside, hit, side = [], [], []
for (task, _), text in zip(asked, texts):
  target = next(o for o in task.objects if o.is_target)
  gold = coldstart.reflex_search(task, target, 2, via_object=True)
  hit.append(grounding_probe.score_zoom(text, task, 2, call, via_object=True)[0])
  action = tools.parse_action(tools.truncate_at_stop(text))
  if not (isinstance(action, tools.ToolCall) and action.source == f"observation_{call + 1}"):
    inside.append(False)
    continue
  region = coldstart.crop_region(action.bbox, gold.regions[call], gold.observations[call].size)
  inside.append(coldstart.contains(region, target.detail_box if call == 1 else target.box))
  side.append((region[2] - region[0]) / (gold.regions[call + 1][2] - gold.regions[call + 1][0]))
print(f"greedy, the target's search after the gold calls ({len(asked)}): the crop holds its aim {100 * np.mean(inside):.0f} %, "
      f"zoom_hit {100 * np.mean(hit):.0f} %, side / scripted median {np.median(side):.2f}")
