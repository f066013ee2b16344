"""Can the demo's vision tower learn a shape's kind? The tower alone + a linear head, trained on cached scenes.

  PYTHONPATH=. python tools/experiments/issue13/kindtower.py [key=value ...]

Keys (defaults in KW): depth, width (tower hidden; intermediate 2x), heads, steps, lr, batch, scenes (cached
training scenes; held-out ones are separate), loss (ce: cross-entropy of a linear head on each token's kind;
fixedce: cross-entropy with the fixed unit directions as the classifier, times logit_scale; package: train.vision_targets' loss with the scales pos / obj / col / kind; mse: the tower's output regressed on a fixed unit direction per kind, read by a ridge probe as features.py does),
tokens (centre: the token holding each shape's centre; all: every token a shape covers most of), sincos (the
tower's fixed position code), view (view side; shapes scale with it), seed. Prints held-out accuracy on centre
tokens every `every` steps, next to always guessing the commonest kind. Scenes are drawn once (no data cost per
step), so it measures the architecture and the loss, not the data budget (held-out scenes are never trained on).
"""
import dataclasses, sys, time
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from configs import pretrain_tiny
from mini_o3_jax import run_config
from mini_o3_jax.data import grounding, scene_levels
from mini_o3_jax.model.vlm import VLM
from mini_o3_jax.pipeline import common
from mini_o3_jax.processing import chat, image as image_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import vision_targets as vt

KW = dict(depth=2, width=64, heads=4, steps=2000, lr=1e-3, batch=32, scenes=3000, loss="ce", tokens="centre",
          sincos=1.0, view=112, seed=0, every=500, levels="few,medium,hard", logit_scale=10.0, pos=0.5, obj=0.4, col=0.4, kind=0.8, kind_s=1)
for a in sys.argv[1:]:
  k, v = a.split("="); KW[k] = type(KW[k])(v)
print(KW, flush=True)
cfg = pretrain_tiny.get_config()
cfg.view_pixels = KW["view"] ** 2
cfg.model.update(vision_depth=KW["depth"], vision_hidden_size=KW["width"], vision_intermediate_size=2 * KW["width"],
                 vision_heads=KW["heads"], vision_position_sincos=KW["sincos"])
config, tok, mcfg, _ = common.setup(cfg, "/tmp/kt/work")
scale = KW["view"] / 112
tcfg = dataclasses.replace(run_config.task_config(config), object_view_px=(14 * scale, 18 * scale),
                           object_gap_view_px=2 * scale)
levels = KW["levels"].split(",")
palette = np.asarray([[v / 255.0 for v in rgb] for _, rgb in tcfg.palette])
TARGETS = vt.FeatureTargetConfig(num_colours=len(palette), num_shapes=len(tcfg.shapes), position_scale=KW["pos"],
                                 object_scale=KW["obj"], colour_scale=KW["col"], shape_scale=KW["kind"],
                                 shape_by_saliency=bool(KW["kind_s"]))


def scenes(n, split, offset):
  pv, kind, centre, sal, col = [], [], [], [], []
  for i in range(n):
    task = scene_levels.make_scene(levels[i % len(levels)], offset + i, tcfg, split)
    p, grid = image_lib.preprocess_image(grounding.synthetic.render_view(task.image, None, tcfg), tcfg.view_min_pixels,
                                         tcfg.view_max_pixels)
    gh, gw = int(grid[1]) // 2, int(grid[2]) // 2
    cover = image_lib.token_boxes(np.asarray([o.box for o in task.objects]), grid)
    kinds = np.asarray([tcfg.shapes.index(o.shape) for o in task.objects])
    c = np.zeros(gh * gw, bool)
    for o in task.objects:
      c[min(gh - 1, int(gh * (o.box[1] + o.box[3]) / 2)) * gw + min(gw - 1, int(gw * (o.box[0] + o.box[2]) / 2))] = True
    sa, co = image_lib.token_colours(p, np.stack([grid]), palette)
    sal.append(sa); col.append(co)
    pv.append(p.astype(np.float32)); kind.append(np.where(cover >= 0, kinds[np.maximum(cover, 0)], -1)); centre.append(c)
  return np.stack(pv), np.stack(kind), np.stack(centre), grid, np.stack(sal), np.stack(col)


t0 = time.time()
tr_pv, tr_kind, tr_centre, grid, tr_sal, tr_col = scenes(KW["scenes"], scene_levels.VISION_SPLIT, 0)
te_pv, te_kind, te_centre, _, _, _ = scenes(300, scene_levels.HELDOUT_SPLIT, 7000)
print("scenes %.0fs, grid %s" % (time.time() - t0, grid.tolist()), flush=True)
enc0 = chat.tokenize_conversation(tok, grounding.scene_messages([("locate", "x", "y", 0)]), [grid])
row = {"input_ids": enc0["input_ids"], "loss_mask": enc0["loss_mask"], "pixel_values": tr_pv[0],
       "image_grid_thw": np.stack([grid]).astype(np.int64)}
vision = batch_lib.collate_sft([row] * KW["batch"], mcfg, batch_lib.BatchConfig(batch_size=KW["batch"], pad_token_id=0),
                               seq_len=len(enc0["input_ids"]) + 8, num_patches=tr_pv.shape[1]).inputs.vision
model = VLM(mcfg, rngs=nnx.Rngs(KW["seed"]))
graphdef, params = nnx.split(model.visual)
K = len(tcfg.shapes); dim = mcfg.text.hidden_size
head = {"w": jnp.zeros((dim, K)), "b": jnp.zeros(K)}
dirs = jax.random.normal(jax.random.PRNGKey(5), (K, dim)); dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
opt = optax.adamw(optax.warmup_cosine_decay_schedule(0, KW["lr"], 50, KW["steps"], KW["lr"] * 0.05), weight_decay=0.01)
theta = {"tower": params, "head": head}
state = opt.init(theta)


def embed(tower, pv, vis):
  return jax.vmap(lambda p, v: nnx.merge(graphdef, tower)(p, v))(pv, vis)   # [b, tokens, dim]


def loss_fn(theta, pv, kind, mask, vis, sal, col, cells):
  emb = embed(theta["tower"], pv, vis)
  if KW["loss"] == "package":   # train.vision_targets' target (pos / obj / col / kind scales), the kind on `mask`
    t = vt.feature_targets(sal, col, cells, emb.shape[-1], TARGETS, jnp.where(mask > 0, kind, -1))
    return vt.feature_target_loss(emb, t, sal >= 0)
  if KW["loss"] == "ce":
    logits = emb @ theta["head"]["w"] + theta["head"]["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(kind, 0))
    return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1)
  if KW["loss"] == "fixedce":   # cross-entropy against the fixed kind directions as the classifier (no head)
    ce = optax.softmax_cross_entropy_with_integer_labels(KW["logit_scale"] * emb @ dirs.T, jnp.maximum(kind, 0))
    return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1)
  err = jnp.sum(jnp.square(emb - dirs[jnp.maximum(kind, 0)] * mask[..., None]), -1)
  return jnp.mean(err)


@jax.jit
def step(theta, state, pv, kind, mask, vis, sal, col, cells):
  l, g = jax.value_and_grad(loss_fn)(theta, pv, kind, mask, vis, sal, col, cells)
  u, state = opt.update(g, state, theta)
  return optax.apply_updates(theta, u), state, l


enc = jax.jit(lambda tower, pv, vis: embed(tower, pv, vis))


def held_out_acc(theta):
  vis = jax.tree.map(lambda x: x[:1].repeat(50, 0), vision)
  emb = np.concatenate([np.asarray(enc(theta["tower"], te_pv[i:i + 50], vis)) for i in range(0, 300, 50)])
  m = te_centre & (te_kind >= 0)
  half = (np.arange(300) < 150)[:, None]
  fit, held = m & half, m & ~half          # a ridge probe fit on half the held-out scenes, scored on the rest
  X = np.c_[emb[fit], np.ones(fit.sum())]
  W = np.linalg.solve(X.T @ X + 1e-1 * np.eye(X.shape[1]), X.T @ np.eye(K)[te_kind[fit]])
  probe = (np.argmax(np.c_[emb[held], np.ones(held.sum())] @ W, -1) == te_kind[held]).mean()
  headacc = (np.argmax(emb[m] @ np.asarray(theta["head"]["w"]) + np.asarray(theta["head"]["b"]), -1) == te_kind[m]).mean()
  return probe, headacc, np.bincount(te_kind[m], minlength=K).max() / m.sum()


rng = np.random.default_rng(KW["seed"])
cells = np.broadcast_to(image_lib.token_cells(np.stack([grid])), (KW["batch"],) + (tr_pv.shape[1] // 4, 2))
train_mask = tr_centre if KW["tokens"] == "centre" else np.ones_like(tr_centre)
t0 = time.time()
for it in range(1, KW["steps"] + 1):
  idx = rng.integers(0, len(tr_pv), KW["batch"])
  kind = tr_kind[idx]
  theta, state, l = step(theta, state, tr_pv[idx], kind, (train_mask[idx] & (kind >= 0)).astype(np.float32), vision,
                         tr_sal[idx], tr_col[idx], cells)
  if it % KW["every"] == 0:
    p, h, base = held_out_acc(theta)
    print("step %d loss %.3f | held-out centre tokens: ridge probe %.3f, head %.3f (commonest %.3f) | %.0fs" % (
        it, l, p, h, base, time.time() - t0), flush=True)
