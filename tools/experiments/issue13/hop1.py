"""Is the question's colour in the residual stream at the answer position? Linear probes per layer input."""
import json, sys
import numpy as np, jax, jax.numpy as jnp, ml_collections
from mini_o3_jax.pipeline import common
from mini_o3_jax.data import grounding, scene_levels, synthetic
from mini_o3_jax import run_config
from mini_o3_jax.train import checkpoint as ckpt_lib, batch as batch_lib
from mini_o3_jax.model import attention as attn_lib, layers, rope
workdir = sys.argv[1]
cfg = ml_collections.ConfigDict(json.load(open(f"{workdir}/config.json")))
config, tok, mcfg, mesh = common.setup(cfg, workdir)
model, step = ckpt_lib.restore_model(f"{workdir}/ckpt/pretrain", mcfg)
tcfg = run_config.task_config(config)
gcfg = grounding.GroundingConfig(locate=1, name=0, read=0)
rng = np.random.default_rng(0)
rows, colours = [], []
for i in range(384):
  t = scene_levels.make_scene("few", 5000 + i, tcfg, scene_levels.HELDOUT_SPLIT)
  ex = grounding.scene_example(t, tok, gcfg, tcfg, rng)
  rows.append(ex); colours.append(next(o.colour for o in t.objects if o.is_target))
palette = [n for n, _ in synthetic.DEFAULT_PALETTE]
y = np.array([palette.index(c) for c in colours])
bcfg = batch_lib.BatchConfig(batch_size=64, pad_token_id=mcfg.text.pad_token_id)
zero_dot = {i for i in range(len(tok)) if tok.decode([i]).endswith("0.")}
feats = []
for s in range(0, len(rows), 64):
  chunk = rows[s:s+64]
  b = batch_lib.collate_sft(chunk, mcfg, bcfg, seq_len=128, num_patches=64)
  inp = b.inputs
  emb = model.encode_images(inp.pixel_values, inp.vision)
  x = model.embed(inp.input_ids, emb)
  tm = model.model
  cos, sin = rope.text_cos_sin(tm.cfg, inp.positions)
  seg = attn_lib.text_segments(inp.attention_mask.astype(bool), x.shape[:2])
  def body(layer, h, _):
    return layer(h, cos, sin, seg), h
  h, hs = layers.scan_layers(tm.layers, body, x, None)     # hs [L, b, t, d]: each layer's input
  hs = np.concatenate([np.asarray(hs), np.asarray(h)[None]], 0)
  ids = np.asarray(inp.input_ids)
  for r in range(len(chunk)):
    pos = [t for t in range(ids.shape[1]) if ids[r, t] in zero_dot][0]   # the '0.' before the x0 tenth digit
    feats.append(hs[:, r, pos])
F = np.stack(feats, 1)  # [L+1, n, d]
n = F.shape[1]; tr = np.arange(n) < n * 2 // 3
for l in range(F.shape[0]):
  X = F[l]; X = (X - X[tr].mean(0)) / (X[tr].std(0) + 1e-6)
  Y = np.eye(8)[y]
  W = np.linalg.solve(X[tr].T @ X[tr] + 10 * np.eye(X.shape[1]), X[tr].T @ Y[tr])
  acc = (np.argmax(X[~tr] @ W, 1) == y[~tr]).mean()
  print(f"step {step}: input of layer {l}" if l < F.shape[0] - 1 else f"step {step}: final", f"colour probe {100*acc:.0f}% (chance {100*np.bincount(y).max()/n:.0f}%)")
print("norms per layer input:", [round(float(np.linalg.norm(F[l], axis=-1).mean()), 2) for l in range(F.shape[0])])
for l in range(F.shape[0]):
  X = F[l]
  for lam in (1e-3, 1e-1):
    Xc = X - X[tr].mean(0)
    W = np.linalg.solve(Xc[tr].T @ Xc[tr] + lam * np.eye(X.shape[1]), Xc[tr].T @ np.eye(8)[y][tr])
    print(l, lam, f"{100*(np.argmax(Xc[~tr] @ W, 1) == y[~tr]).mean():.0f}%", end="; ")
  print()
