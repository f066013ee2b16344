"""Per layer and head: attention mass from the x0-tenth query position on the target's image tokens vs on
other shapes' tokens, on held-out few rows (target tokens: the named colour, chroma > 0.08, as in training)."""
import json, sys, os
os.environ.setdefault("EX_ATTNSUP", "1")
sys.argv_saved = list(sys.argv)
import numpy as np, jax, jax.numpy as jnp, ml_collections
sys.path.insert(0, "tools/experiments/issue13")
import drive
from mini_o3_jax.pipeline import common
from mini_o3_jax.data import grounding, scene_levels
from mini_o3_jax import run_config
from mini_o3_jax.train import checkpoint as ckpt_lib, batch as batch_lib
workdir = sys.argv_saved[1]; level = sys.argv_saved[2] if len(sys.argv_saved) > 2 else "few"
cfg = ml_collections.ConfigDict(json.load(open(f"{workdir}/config.json")))
config, tok, mcfg, mesh = common.setup(cfg, workdir)
vocab = [tok.decode([i]) for i in range(len(tok))]
colours = [tok.encode(" " + n, add_special_tokens=False)[0] for n, _ in drive.synthetic.DEFAULT_PALETTE]
drive._where_ids = {"prefix": [i for i, p in enumerate(vocab) if p.endswith("0.") or p.endswith("1.")],
                    "digits": [i for i, p in enumerate(vocab) if p.isdigit() and len(p) == 1], "colours": colours}
model, step = ckpt_lib.restore_model(f"{workdir}/ckpt/pretrain", mcfg)
tcfg = run_config.task_config(config)
gcfg = grounding.GroundingConfig(locate=1, name=0, read=0)
rng = np.random.default_rng(0)
rows = [grounding.scene_example(scene_levels.make_scene(level, 7000 + i, tcfg, scene_levels.HELDOUT_SPLIT), tok, gcfg, tcfg, rng)
        for i in range(128)]
bcfg = batch_lib.BatchConfig(batch_size=64, pad_token_id=mcfg.text.pad_token_id)
L, H = mcfg.text.num_hidden_layers, mcfg.text.num_attention_heads
tgt_mass = np.zeros((L, H)); shape_mass = np.zeros((L, H)); n = 0
for s in range(0, len(rows), 64):
  b = batch_lib.collate_sft(rows[s:s+64], mcfg, bcfg, seq_len=128, num_patches=64)
  inp = b.inputs
  x = model.embed(inp.input_ids, model.encode_images(inp.pixel_values, inp.vision))
  _, probs = drive.forward_with_attention(model, x, inp.positions, inp.attention_mask, tuple(range(L)), H)
  probs = np.asarray(probs).reshape(len(rows[s:s+64]), L, H, 128, 128)
  img_pos, target, valid = drive.target_token_mask(inp, mcfg.image_token_id, 16)
  shapes = np.asarray(drive.chroma_tokens(inp.pixel_values)) > 0.08
  img_pos, target, valid = map(np.asarray, (img_pos, target, valid))
  ids = np.asarray(inp.input_ids)
  for r in range(ids.shape[0]):
    if not valid[r]: continue
    q = [t for t in range(127) if ids[r, t] in drive._where_ids["prefix"] and ids[r, t + 1] in drive._where_ids["digits"]][0]
    p = probs[r, :, :, q][:, :, img_pos[r]]       # [L, H, 16]
    tgt_mass += p[..., target[r]].sum(-1); shape_mass += p[..., shapes[r] & ~target[r]].sum(-1); n += 1
np.set_printoptions(precision=2, suppress=True)
print(f"step {step}, {n} {level} rows; attention mass of the x0-tenth query on the TARGET's tokens [layer, head]:\n{tgt_mass / n}")
print(f"... on OTHER shapes' tokens:\n{shape_mass / n}")
