"""How well does a run's tower fit its feature targets on each image of the agent's direct search?

  PYTHONPATH=. python tools/experiments/issue13/towerfit.py RUN_DIR [STAGE=pretrain_vision] [LEVEL=medium] [N=64]
      [PHASE=pretrain_vision/moved] [ZOOMS=1]

Builds N held-out zoom rows (the scene, the window the located shape's call returns, the legible zoom inside it:
`grounding.GroundingConfig(zoom=1)`; ZOOMS=2: the shape's own zoom between the window and the legible one), encodes them and prints, per image of the row, the feature-target loss
(`train.vision_targets`, position / object / colour terms only: the kind and digit terms exist on the scene and the
read crop alone) and the loss of the all-zero output (the scale: 1.0 means nothing fitted). The tower is trained on
scenes and read crops only; a window shows shapes twice as large, cut at its edges.
"""
import dataclasses

import numpy as np

from mini_o3_jax import run_config
from mini_o3_jax.data import grounding, scene_levels
from mini_o3_jax.pipeline import pretrain_stage
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import vision_targets
from run_model import cli_args, load_run

run, stage_name, level, n, phase, zooms = cli_args("pretrain_vision", "medium", 64, "pretrain_vision/moved", 1)
config, tok, mcfg, model, step = load_run(run, stage_name, phase)
stage = run_config.pretrain_vision_stage(config, mcfg)
every_image = dataclasses.replace(stage, shape_on_crops=True)  # the kind's term on every image's shapes
tcfg = run_config.task_config(config)
settings = image_lib.settings_for(mcfg)
rng = np.random.default_rng(0)
merge = mcfg.vision.merge_unit
fit = {}   # image index -> [sum of err, sum of |target|^2, tokens]
for i in range(n):
  task = scene_levels.make_scene(level, i, tcfg, scene_levels.HELDOUT_SPLIT)
  row = grounding.scene_example(task, tok, pretrain_stage.search_rows(zooms), tcfg, rng, image=settings)
  grids = np.asarray(row["image_grid_thw"]).reshape(-1, 3)
  if len(grids) < 2 + zooms:
    continue
  one = batch_lib.BatchConfig(batch_size=1, length_buckets=(512,), patch_buckets=(int(grids.prod(1).sum()),))
  batch = pretrain_stage.with_feature_targets(batch_lib.collate_sft([row], mcfg, one), [row], mcfg, every_image)
  emb = np.asarray(model.encode_images(batch.inputs.pixel_values, batch.inputs.vision))[0]
  tgt = np.asarray(vision_targets.feature_targets(batch.image_saliency, batch.image_colour, batch.image_cell,
                                                  emb.shape[-1], stage.targets, batch.image_shape,
                                                  batch.image_digit, batch.image_label, batch.image_centre))[0]
  starts = np.cumsum([0] + [int(g.prod()) // merge for g in grids])
  for j in range(len(grids)):
    sl = slice(starts[j], starts[j + 1])
    acc = fit.setdefault(j, [0.0, 0.0, 0])
    acc[0] += float(np.sum(np.square(emb[sl] - tgt[sl])))
    acc[1] += float(np.sum(np.square(tgt[sl])))
    acc[2] += starts[j + 1] - starts[j]
stream = grounding.SceneStream(stage.curriculum, pretrain_stage.tower_questions(stage), tcfg, tok, rows=16, seed=1,
                               split=scene_levels.HELDOUT_SPLIT, image=settings)
rows = stream.rows_for(0)
batch = pretrain_stage.with_feature_targets(batch_lib.collate_sft(rows, mcfg, stage.batch), rows, mcfg, stage)
emb = model.encode_images(batch.inputs.pixel_values, batch.inputs.vision)
tgt = vision_targets.feature_targets(batch.image_saliency, batch.image_colour, batch.image_cell, emb.shape[-1],
                                     stage.targets, batch.image_shape, batch.image_digit, batch.image_label,
                                     batch.image_centre)
print(f"{phase}'s own rows: loss {float(vision_targets.feature_target_loss(emb, tgt, batch.image_saliency >= 0)):.3f}")
names = {0: "scene", 1: "window", 2: "zoom"} if zooms == 1 else {0: "scene", 1: "window", 2: "object", 3: "zoom"}
for j, (err, norm, count) in sorted(fit.items()):
  print(f"{run} {stage_name} step {step} {level} {names.get(j, j)}: relative loss {err / norm:.3f} "
        f"({count} tokens)")
