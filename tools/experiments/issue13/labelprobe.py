"""Does a run's tower show where the label is in the window the located shape's call returns?

  PYTHONPATH=. python tools/experiments/issue13/labelprobe.py RUN_DIR [STAGE=pretrain_vision] [LEVEL=medium] [N=200]

The agent's second crop is the window's 3 x 3 cell holding the digit (`coldstart.reflex_search`), and the digit's
label is a few view pixels in the window. Encodes N held-out search rows' windows, fits a ridge score per token on
half of them (1 on the token holding the glyph's centre) and reports on the other half how often the best-scoring
token is that token, beside the token holding the named shape's centre (what a tower that sees only the shape
offers) and chance (1 / tokens).
"""
import json
import os
import sys

import numpy as np
from flax import nnx

from configs import pretrain_tiny
from mini_o3_jax import run_config
from mini_o3_jax.data import coldstart, grounding
from mini_o3_jax.pipeline import common, pretrain_stage
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import state as state_lib

run = sys.argv[1]
stage_name = sys.argv[2] if len(sys.argv) > 2 else "pretrain_vision"
level = sys.argv[3] if len(sys.argv) > 3 else "medium"
n = int(sys.argv[4]) if len(sys.argv) > 4 else 200
config = pretrain_tiny.get_config()
recorded = json.load(open(os.path.join(run, "config.json")))
config.model.update({k: v for k, v in recorded["model"].items() if k in config.model})
config = common.resolve(config)
tok = common.build_tokenizer(config, run)
mcfg = run_config.model_config(config, tok)
params, step = ckpt_lib.restore_params(os.path.join(run, "ckpt", stage_name), mcfg)
graphdef, _ = state_lib.abstract_model(mcfg)
model = nnx.merge(graphdef, params)
tcfg = run_config.task_config(config)
settings = image_lib.settings_for(mcfg)
merge = mcfg.vision.spatial_merge_size
feats, label_token, shape_token = [], [], []
for i in range(n):
  task = grounding.make_scene(level, i, tcfg, grounding.HELDOUT_SPLIT)
  row = grounding.scene_example(task, tok, pretrain_stage.SEARCH_ROWS, tcfg, np.random.default_rng(i), image=settings)
  grids = np.asarray(row["image_grid_thw"]).reshape(-1, 3)
  if len(grids) < 3:
    continue
  (obj,) = {j for _, _, _, j in grounding.scene_questions(task, pretrain_stage.SEARCH_ROWS, np.random.default_rng(i))}
  one = batch_lib.BatchConfig(batch_size=1, length_buckets=(512,), patch_buckets=(int(grids.prod(1).sum()),))
  batch = batch_lib.collate_sft([row], mcfg, one)
  emb = np.asarray(model.encode_images(batch.inputs.pixel_values, batch.inputs.vision))[0]
  starts = np.cumsum([0] + [int(g.prod()) // mcfg.vision.merge_unit for g in grids])
  window = emb[starts[1]:starts[2]]
  region = row["crop_regions"][0]
  scale = np.asarray([region[2] - region[0], region[3] - region[1]] * 2)
  origin = np.asarray([region[0], region[1]] * 2)
  target = task.objects[obj]
  glyph = (np.asarray(target.detail_box) - origin) / scale
  shape = (np.asarray(target.box) - origin) / scale
  label_token.append(int(image_lib.token_centres(glyph[None], grids[1], merge).argmax()))
  shape_token.append(int(image_lib.token_centres(shape[None], grids[1], merge).argmax()))
  feats.append(window)
h = len(feats) // 2
x = np.concatenate(feats[:h])
y = np.concatenate([np.arange(len(f)) == t for f, t in zip(feats[:h], label_token[:h])]).astype(np.float64)
xa = np.concatenate([x, np.ones((len(x), 1))], 1)
w = np.linalg.solve(xa.T @ xa + 1e-2 * np.eye(xa.shape[1]), xa.T @ y)
hits = [int(np.argmax(np.concatenate([f, np.ones((len(f), 1))], 1) @ w) == t)
        for f, t in zip(feats[h:], label_token[h:])]
same = [int(s == t) for s, t in zip(shape_token[h:], label_token[h:])]
print(f"{run} {stage_name} step {step} {level}: label token found {100 * np.mean(hits):.0f} %, the shape's centre "
      f"token is the label's {100 * np.mean(same):.0f} %, chance {100 / np.mean([len(f) for f in feats]):.0f} % "
      f"({len(feats) - h} held-out windows)")
