"""Does a run's tower show where the label is in the agent's window, or in the object's zoom?

  PYTHONPATH=. python tools/experiments/issue13/labelprobe.py RUN_DIR [STAGE=pretrain_vision] [LEVEL=medium] [N=200]
      [VIEW=window]

VIEW=window: the window the located shape's call returns (`coldstart.reflex_search`), where the base's second call
asks for the legible zoom; VIEW=object: the generator's zoom before the legible one (the object's); VIEW=search_object:
the shape's own zoom inside the window (`reflex_search(via_object=True)`, session 20), where the third call asks for
the legible zoom. Encodes N
held-out targets' views, fits a ridge score per token on half of them (1 on the token holding the glyph's centre)
and reports on the other half how often the best-scoring token is that token, beside the token holding the named
shape's centre (what a tower that sees only the shape offers), chance (1 / tokens) and the glyph's height in view
pixels (legible: 14). Then `placed`: a second ridge fit reads the glyph centre's offset inside its token from that
token's features, and a legible crop centred on the best-scoring token plus that offset holds the glyph (its side:
the generator's legible crop's), beside one centred on the named shape's centre.
"""

import numpy as np

from mini_o3_jax import run_config
from mini_o3_jax.data import coldstart, grounding, scene_levels, synthetic
from mini_o3_jax.model.vision import VisionInputs
from mini_o3_jax.processing import image as image_lib
from run_model import cli_args, load_run, ridge, with_bias

run, stage_name, level, n, view_kind = cli_args("pretrain_vision", "medium", 200, "window")
config, tok, mcfg, model, step = load_run(run, stage_name)
tcfg = run_config.task_config(config)
settings = image_lib.settings_for(mcfg)
merge = mcfg.vision.spatial_merge_size
feats, label_token, shape_token, glyph_px, centre, shape_centre, slack = [], [], [], [], [], [], []
for i in range(n):
  task = scene_levels.make_scene(level, i, tcfg, scene_levels.HELDOUT_SPLIT)
  target = next(o for o in task.objects if o.is_target)
  if view_kind in ("window", "search_object"):
    search = coldstart.reflex_search(task, target, 2, via_object=view_kind == "search_object")
    region = None if search is None else search.regions[-2]
  else:
    region = target.zoom_path[-2] if len(target.zoom_path) >= 2 else None
  if region is None:
    continue
  pv, grid = image_lib.preprocess_image(synthetic.render_view(task.image, region, tcfg), tcfg.view_min_pixels,
                                        tcfg.view_max_pixels, **settings)
  emb = np.asarray(model.encode_images(pv, VisionInputs.build(np.asarray([grid]), mcfg.vision)))
  w, h = task.image.size
  x0, y0, x1, y1 = np.divide(synthetic.pixel_box(region, (w, h)), (w, h, w, h))
  to_view = lambda b: (np.asarray(b) - [x0, y0, x0, y0]) / [x1 - x0, y1 - y0, x1 - x0, y1 - y0]
  label_token.append(int(image_lib.token_centres(to_view(target.detail_box)[None], grid, merge).argmax()))
  shape_token.append(int(image_lib.token_centres(to_view(target.box)[None], grid, merge).argmax()))
  gy0, gy1 = synthetic.project_box(target.detail_box, region, task.image.size, tcfg)[1::2]
  glyph_px.append(gy1 - gy0)
  tw, th = grid[2] // merge, grid[1] // merge
  g, b = to_view(target.detail_box), to_view(target.box)
  centre.append(((g[0] + g[2]) / 2 * tw, (g[1] + g[3]) / 2 * th))  # in tokens
  shape_centre.append(((b[0] + b[2]) / 2 * tw, (b[1] + b[3]) / 2 * th))
  legible = target.zoom_path[-1]
  slack.append(((legible[2] - legible[0] - (g[2] - g[0]) * (x1 - x0)) / 2 / (x1 - x0) * tw,
                (legible[3] - legible[1] - (g[3] - g[1]) * (y1 - y0)) / 2 / (y1 - y0) * th))
  feats.append(emb[0] if emb.ndim == 3 else emb)
h = len(feats) // 2
y = np.concatenate([np.arange(len(f)) == t for f, t in zip(feats[:h], label_token[:h])]).astype(np.float64)
w = ridge(np.concatenate(feats[:h]), y)
hits = [int(np.argmax(with_bias(f) @ w) == t) for f, t in zip(feats[h:], label_token[h:])]
same = [int(s == t) for s, t in zip(shape_token[h:], label_token[h:])]
tokens_w = [int(round(np.sqrt(len(f)))) for f in feats]
offset = np.asarray([(cx - int(cx) - 0.5, cy - int(cy) - 0.5) for cx, cy in centre])
w_off = ridge(np.stack([f[t] for f, t in zip(feats[:h], label_token[:h])]), offset[:h])
placed, from_shape = [], []
for k in range(h, len(feats)):
  best = int(np.argmax(with_bias(feats[k]) @ w))
  row, col = divmod(best, tokens_w[k])
  dx, dy = (with_bias(feats[k][best][None]) @ w_off)[0]
  px, py = col + 0.5 + dx, row + 0.5 + dy
  placed.append(abs(px - centre[k][0]) <= slack[k][0] and abs(py - centre[k][1]) <= slack[k][1])
  from_shape.append(abs(shape_centre[k][0] - centre[k][0]) <= slack[k][0] and
                    abs(shape_centre[k][1] - centre[k][1]) <= slack[k][1])
print(f"{run} {stage_name} step {step} {level} {view_kind}: label token found {100 * np.mean(hits):.0f} %, the "
      f"shape's centre token is the label's {100 * np.mean(same):.0f} %, chance "
      f"{100 / np.mean([len(f) for f in feats]):.0f} % ({len(feats) - h} held-out views; glyph "
      f"{np.median(glyph_px):.1f} view px tall); placed {100 * np.mean(placed):.0f} %, centred on the shape "
      f"{100 * np.mean(from_shape):.0f} %")
