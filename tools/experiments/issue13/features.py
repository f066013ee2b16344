"""What the image tokens hold (runs of drive.py; set the run's EX_ switches, e.g. EX_ORACLE / EX_GATE): for 24
held-out few scenes, the shape tokens' (saliency > 0.5) norm against the canvas tokens', their cosine with their own
palette colour's direction (the one EX_COLAUX and EX_ORACLE_COL use) against the best other, a least-squares colour
probe, and the cosine between shape tokens of one colour and of different colours (does the colour dominate?).

  EX_...=... PYTHONPATH=. python tools/experiments/issue13/features.py RUNS/NAME [level]

FEAT_N scenes (default 24: the session-11 numbers; the cell / kind probes overfit with so few tokens, use >= 200)
and FEAT_RIDGE (the probes' ridge, default 1e-3) refine the probes.
FEAT_STAGE names the checkpoint (default pretrain; pretrain_vision for a tower-only run).
"""
import os
import sys, json
sys.path.insert(0, "tools/experiments/issue13")
argv=list(sys.argv); sys.argv=sys.argv[:1]
import drive
import numpy as np, jax, jax.numpy as jnp, ml_collections
from mini_o3_jax.pipeline import common
from mini_o3_jax.data import grounding, scene_levels
from mini_o3_jax.processing import chat, image as image_lib
from mini_o3_jax import run_config
from mini_o3_jax.train import checkpoint as ckpt_lib, batch as batch_lib
w=argv[1]
cfg = ml_collections.ConfigDict(json.load(open(f"{w}/config.json")))
config, tok, mcfg, mesh = common.setup(cfg, w)
drive.PIX_MEAN, drive.PIX_STD = image_lib.normalization(mcfg.model_type)  # the run's family
model, step = ckpt_lib.restore_model(f"{w}/ckpt/" + os.environ.get("FEAT_STAGE", "pretrain"), mcfg)
tcfg = run_config.task_config(config)
rows=[]; kinds=[]; centres=[]
LEVEL = argv[2] if len(argv) > 2 else "few"
N = int(os.environ.get("FEAT_N", 24)); RIDGE = float(os.environ.get("FEAT_RIDGE", 1e-3))
for si in range(N):
  task = scene_levels.make_scene(LEVEL, 7000 + si, tcfg, scene_levels.HELDOUT_SPLIT)
  pv, grid = image_lib.preprocess_image(grounding.synthetic.render_view(task.image, None, tcfg), tcfg.view_min_pixels,
                                        tcfg.view_max_pixels, **image_lib.settings_for(mcfg))
  q = [("locate", "x", "y", 0)]
  enc = chat.tokenize_conversation(tok, grounding.scene_messages(q), [grid])
  rows.append({"input_ids": enc["input_ids"], "loss_mask": enc["loss_mask"], "pixel_values": pv.astype(np.float32), "image_grid_thw": np.stack([grid]).astype(np.int64)})
  cover = image_lib.token_boxes(np.asarray([o.box for o in task.objects]), grid)
  kinds.append(np.where(cover >= 0, np.asarray([tcfg.shapes.index(o.shape) for o in task.objects])[cover], -1))
  tg = (int(grid[1]) // 2, int(grid[2]) // 2)   # the merged token holding each shape's centre
  centre = np.zeros(tg[0] * tg[1], bool)
  for o in task.objects:
    centre[min(tg[0] - 1, int(tg[0] * (o.box[1] + o.box[3]) / 2)) * tg[1] + min(tg[1] - 1, int(tg[1] * (o.box[0] + o.box[2]) / 2))] = True
  centres.append(centre)
bc = batch_lib.BatchConfig(batch_size=len(rows), pad_token_id=mcfg.text.pad_token_id)
gh, gw = int(grid[1]) // 2, int(grid[2]) // 2   # merged tokens per column / row
b = batch_lib.collate_sft(rows, mcfg, bc, seq_len=80 + gh * gw, num_patches=int(np.prod(grid)))
emb = np.asarray(model.encode_images(b.inputs.pixel_values, b.inputs.vision))   # [b, t, d]
pvb = jnp.asarray(b.inputs.pixel_values)
s = np.asarray(drive.chroma_saliency(pvb)); oh = np.asarray(drive.colour_onehot(pvb))
d = emb.shape[-1]
v = np.array(jax.random.normal(jax.random.PRNGKey(11), (drive.PALETTE.shape[0], d))); v = v / np.linalg.norm(v, axis=-1, keepdims=True)
n = np.linalg.norm(emb, axis=-1)
cos = np.einsum("btd,kd->btk", emb, v) / (n[..., None] + 1e-9)
shape = s > 0.5; canvas = s < 0.05
print("step", step, "token norm shape %.3f canvas %.3f" % (n[shape].mean(), n[canvas].mean()))
print("cos own colour (shape tokens) %.3f, max other %.3f; colour argmax acc %.3f" % (
  (cos*oh).sum(-1)[shape].mean(), np.where(oh>0, -9, cos).max(-1)[shape].mean(), (cos.argmax(-1)==oh.argmax(-1))[shape].mean()))
# linear colour probe via least squares on shape tokens (does the token hold colour linearly, anywhere?)
X = emb[shape]; Y = oh[shape]
W = np.linalg.lstsq(np.c_[X, np.ones(len(X))], Y, rcond=None)[0]
print("lstsq colour probe acc (train) %.3f on %d tokens" % (((np.c_[X, np.ones(len(X))]@W).argmax(-1)==Y.argmax(-1)).mean(), len(X)))
# position: does the token's cell dominate? cosine between two shape tokens of different colour at near cells vs same colour
u = emb / (n[..., None]+1e-9)
sim = np.einsum("btd,bsd->bts", u, u)
same_col = np.einsum("btk,bsk->bts", oh, oh) > 0
m = shape[:, :, None] & shape[:, None, :] & ~np.eye(emb.shape[1], dtype=bool)[None]
print("cos between shape tokens: same colour %.3f, different colour %.3f" % (sim[m & same_col].mean(), sim[m & ~same_col].mean()))
# position: a ridge probe from shape tokens to their merged-token (row, column), fit on half the scenes
# and scored on the other half (rounded to the nearest cell): does the token carry where it is?
cells = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"), -1).reshape(-1, 2)[:emb.shape[1]]
rc = np.broadcast_to(cells[None], emb.shape[:2] + (2,))
half = np.arange(emb.shape[0]) < emb.shape[0] // 2
fit, held = shape & half[:, None], shape & ~half[:, None]
Xf = np.c_[emb[fit], np.ones(fit.sum())]
Wp = np.linalg.solve(Xf.T @ Xf + RIDGE * np.eye(Xf.shape[1]), Xf.T @ rc[fit].astype(np.float64))   # ridge: few tokens
pred = np.rint(np.c_[emb[held], np.ones(held.sum())] @ Wp)
print("position probe (held-out shape tokens): cell exact %.3f on %d tokens" % (np.all(pred == rc[held], -1).mean(), held.sum()))
# kind: a ridge probe from shape tokens to the kind of the shape that covers most of them (fit / scored as the cell's)
kind = np.stack(kinds)[:, :emb.shape[1]]
K = len(tcfg.shapes)
fitk, heldk = fit & (kind >= 0), held & (kind >= 0)
Xk = np.c_[emb[fitk], np.ones(fitk.sum())]
Wk = np.linalg.solve(Xk.T @ Xk + RIDGE * np.eye(Xk.shape[1]), Xk.T @ np.eye(K)[kind[fitk]])
acc = (np.argmax(np.c_[emb[heldk], np.ones(heldk.sum())] @ Wk, -1) == kind[heldk]).mean()
print("kind probe (held-out shape tokens): %.3f on %d tokens (the commonest kind: %.3f)" % (
    acc, heldk.sum(), np.bincount(kind[heldk], minlength=K).max() / max(heldk.sum(), 1)))
# kind on the tokens holding a shape's centre only (a shape of 14-18 view px straddles up to 4 merged tokens; the
# others hold fragments)
cen = np.stack(centres)[:, :emb.shape[1]]
fitc, heldc = half[:, None] & cen & (kind >= 0), ~half[:, None] & cen & (kind >= 0)
Xc = np.c_[emb[fitc], np.ones(fitc.sum())]
Wc = np.linalg.solve(Xc.T @ Xc + RIDGE * np.eye(Xc.shape[1]), Xc.T @ np.eye(K)[kind[fitc]])
accc = (np.argmax(np.c_[emb[heldc], np.ones(heldc.sum())] @ Wc, -1) == kind[heldc]).mean()
print("kind probe, centre tokens: %.3f on %d tokens (the commonest kind: %.3f)" % (
    accc, heldc.sum(), np.bincount(kind[heldc], minlength=K).max() / max(heldc.sum(), 1)))
