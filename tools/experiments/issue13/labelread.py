"""The tower's own read-out of its small-label and shape-centre terms on held-out rows of the search through the shape.

  PYTHONPATH=. python tools/experiments/issue13/labelread.py RUN_DIR [STAGE=pretrain_vision_search_object] [LEVEL=medium]
      [N=40]

Encodes N held-out rows (scene, window, the shape's own zoom, legible zoom: `pretrain_stage.search_rows(2)`) and, per
window and object view, reports how often the token with the largest projection on the label direction holds a label's
centre (`pretrain_vision.targets.label_scale`), the error of the offset the tower writes there against the glyph's
(in tokens; a uniform guess: 0.25), the projections on label tokens and on the others (1.0 = the target's), and the
error of the shape-centre offsets (`centre_scale`). The directions and scales are the `search_object` phase's.
"""

import numpy as np

from mini_o3_jax import run_config
from mini_o3_jax.data import grounding, scene_levels
from mini_o3_jax.pipeline import pretrain_stage
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import vision_targets as vt
from run_model import cli_args, load_run

run, stage_name, level, n = cli_args("pretrain_vision_search_object", "medium", 40)
config, tok, mcfg, model, step = load_run(run, stage_name, "pretrain_vision/search_object")
stage = run_config.pretrain_vision_stage(config, mcfg)
targets = stage.targets
tcfg = run_config.task_config(config)
settings = image_lib.settings_for(mcfg)
rng = np.random.default_rng(0)
found, offset_err, projections, centre_err = {1: [], 2: []}, {1: [], 2: []}, {1: ([], []), 2: ([], [])}, []
for i in range(n):
  task = scene_levels.make_scene(level, i, tcfg, scene_levels.HELDOUT_SPLIT)
  row = grounding.scene_example(task, tok, pretrain_stage.search_rows(2), tcfg, rng, image=settings)
  grids = np.asarray(row["image_grid_thw"]).reshape(-1, 3)
  if len(grids) < 4:
    continue
  one = batch_lib.BatchConfig(batch_size=1, length_buckets=(512,), patch_buckets=(int(grids.prod(1).sum()),))
  batch = pretrain_stage.with_feature_targets(batch_lib.collate_sft([row], mcfg, one), [row], mcfg, stage)
  emb = np.asarray(model.encode_images(batch.inputs.pixel_values, batch.inputs.vision))[0]   # [tokens, dim]
  label_dirs = np.asarray(vt.unit_directions(3, emb.shape[-1], targets.label_seed))
  centre_dirs = np.asarray(vt.unit_directions(3, emb.shape[-1], targets.centre_seed))
  starts = np.cumsum([0] + [int(g.prod()) // mcfg.vision.merge_unit for g in grids])
  for j in (1, 2):  # the window, the object's view
    sl = slice(starts[j], starts[j + 1])
    e, label, centre = emb[sl], batch.image_label[0][sl], batch.image_centre[0][sl]
    here = label[:, 0] > 0
    if here.any():
      proj = e @ label_dirs[0] / targets.label_scale
      found[j].append(bool(here[int(np.argmax(proj))]))
      projections[j][0].extend(proj[here])
      projections[j][1].extend(proj[~here])
      for t in np.flatnonzero(here):
        written = e[t] @ label_dirs[1:].T / targets.label_scale / 2
        offset_err[j].extend(np.abs(written - label[t, 1:]))
    for t in np.flatnonzero(centre[:, 0] > 0):
      written = e[t] @ centre_dirs[1:].T / targets.centre_scale / 2
      centre_err.extend(np.abs(written - centre[t, 1:]))
for j, name in ((1, "window"), (2, "object")):
  on, off = projections[j]
  print(f"{run} step {step} {level} {name}: the best label-direction token holds a label {100 * np.mean(found[j]):.0f} % "
        f"({len(found[j])} views); offset error median {np.median(offset_err[j]):.2f} token; projection on label tokens "
        f"median {np.median(on):.2f}, on the others 99th percentile {np.percentile(off, 99):.2f}")
print(f"shape-centre offset error median {np.median(centre_err):.2f} token ({len(centre_err) // 2} centres on crops)")
