"""Does a run's tower hold the digit of a read crop? Ridge probe on the token holding the glyph's centre.

  PYTHONPATH=. [POOLED=1] python tools/experiments/issue13/digits.py RUN_DIR [STAGE=pretrain_vision] [LEVEL=medium]
      [N=300] [JITTER=0]

Encodes N held-out scenes' target crops (the read question's view; with JITTER moved as the agent's crops are,
`grounding.read_crop`), takes the merged token holding the digit's centre (POOLED=1: and the crop's mean token),
fits a ridge classifier on half and scores the other half (chance ~10 %).
"""
import os

import numpy as np

from mini_o3_jax import run_config
from mini_o3_jax.data import grounding, scene_levels, synthetic
from mini_o3_jax.model.vision import VisionInputs
from mini_o3_jax.processing import image as image_lib
from run_model import cli_args, load_run, ridge, with_bias

run, stage, level, n, jitter = cli_args("pretrain_vision", "medium", 300, 0.0)
pooled = os.environ.get("POOLED") == "1"
config, tok, mcfg, model, step = load_run(run, stage)
tcfg = run_config.task_config(config)
settings = image_lib.settings_for(mcfg)
feats, digits = [], []
for i in range(n):
  task = scene_levels.make_scene(level, i, tcfg, scene_levels.HELDOUT_SPLIT)
  obj = next(o for o in task.objects if o.is_target)
  questions = [("read", "", "", task.objects.index(obj))]
  view = synthetic.render_view(task.image, grounding.read_crop(task, task.objects.index(obj), jitter), tcfg)
  pv, grid = image_lib.preprocess_image(view, tcfg.view_min_pixels, tcfg.view_max_pixels, **settings)
  glyph = grounding.read_glyphs(task, questions, tcfg, grounding.GroundingConfig(read_jitter=jitter))
  token = int(np.flatnonzero(image_lib.token_centres(glyph, grid, mcfg.vision.spatial_merge_size) >= 0)[0])
  emb = np.asarray(model.encode_images(pv, VisionInputs.build(np.asarray([grid]), mcfg.vision)))
  e = emb[0] if emb.ndim == 3 else emb
  feats.append(np.concatenate([e[token], e.mean(0)]) if pooled else e[token])
  digits.append(int(obj.digit))
x, y = np.asarray(feats), np.asarray(digits)
h = n // 2
w = ridge(x[:h], np.eye(10)[y[:h]])
acc = float(np.mean(np.argmax(with_bias(x[h:]) @ w, 1) == y[h:]))
print(f"{run} {stage} step {step} jitter {jitter} pooled {pooled}: digit on the glyph token, held-out {level} crops: "
      f"{100 * acc:.0f} % (commonest {100 * np.bincount(y[h:]).max() / (n - h):.0f} %), token norm {np.linalg.norm(x, axis=1).mean():.2f}")
