"""Binding on the cell token (runs trained with EX_CELLFIRST): for 48 held-out scenes of a level, ask for every
uniquely named shape in turn and read the teacher-forced argmax of the first answer token (the 3 x 3 cell, 1-9).

  EX_CELLFIRST=1 PYTHONPATH=. python tools/experiments/issue13/cellbind.py RUNS/NAME [level]

Prints the share of questions whose predicted cell is the named shape's, the share whose predicted cell holds some
shape of the scene (a policy that finds shapes and ignores the name scores about that share / shapes per scene),
the share of scenes where every question gets the same cell, and what the misses that land on a shape land on
(a shape of the named one's colour, of its kind, or neither).
"""
import json, sys, collections
sys.path.insert(0, "tools/experiments/issue13")
argv = list(sys.argv); sys.argv = sys.argv[:1]
import drive  # noqa: registers the EX_ switches (EX_CELLFIRST must be set)
import numpy as np, ml_collections
from mini_o3_jax.pipeline import common
from mini_o3_jax.data import grounding, scene_levels
from mini_o3_jax.processing import chat, image as image_lib
from mini_o3_jax import run_config
from mini_o3_jax.train import checkpoint as ckpt_lib, batch as batch_lib
workdir = argv[1]; level = argv[2] if len(argv) > 2 else "few"
cfg = ml_collections.ConfigDict(json.load(open(f"{workdir}/config.json")))
config, tok, mcfg, mesh = common.setup(cfg, workdir)
model, step = ckpt_lib.restore_model(f"{workdir}/ckpt/pretrain", mcfg)
tcfg = run_config.task_config(config)
digit_ids = [tok.encode(str(d), add_special_tokens=False)[0] for d in range(1, 10)]
rows, meta = [], []
for si in range(48):
  task = scene_levels.make_scene(level, 7000 + si, tcfg, scene_levels.HELDOUT_SPLIT)
  names = [grounding.object_name(o) for o in task.objects]
  cells = [int(grounding.locate_answer(o.box, 2).split()[0]) for o in task.objects]
  pv, grid = image_lib.preprocess_image(grounding.synthetic.render_view(task.image, None, tcfg), tcfg.view_min_pixels,
                                        tcfg.view_max_pixels, **image_lib.settings_for(mcfg))
  for oi, o in enumerate(task.objects):
    if names.count(names[oi]) != 1:
      continue
    q = [("locate", grounding.locate_question(names[oi]), grounding.locate_answer(o.box, 2), oi)]
    enc = chat.tokenize_conversation(tok, grounding.scene_messages(q), [grid])
    rows.append({"input_ids": enc["input_ids"], "loss_mask": enc["loss_mask"], "pixel_values": pv.astype(np.float32),
                 "image_grid_thw": np.stack([grid]).astype(np.int64)})
    meta.append((si, cells[oi], set(cells),
                 {cells[j] for j, other in enumerate(task.objects) if j != oi and other.colour == o.colour},
                 {cells[j] for j, other in enumerate(task.objects) if j != oi and other.shape == o.shape}))
bcfg = batch_lib.BatchConfig(batch_size=64, pad_token_id=mcfg.text.pad_token_id)
pred = []
for s in range(0, len(rows), 64):
  chunk = rows[s:s + 64]
  b = batch_lib.collate_sft(chunk + [chunk[-1]] * (64 - len(chunk)), mcfg, bcfg, seq_len=128, num_patches=64)
  inp = b.inputs
  x = model.embed(inp.input_ids, model.encode_images(inp.pixel_values, inp.vision))
  h, _ = drive.forward_with_attention(model, x, inp.positions, inp.attention_mask, (0,), 1)
  logits = np.asarray(model.logits(h))
  for r, row in enumerate(chunk):
    p = int(np.flatnonzero(row["loss_mask"])[0])            # the cell token; the logits one before predict it
    pred.append(1 + int(np.argmax(logits[r, p - 1, digit_ids])))
named = [pc == c for pc, (_, c, *_) in zip(pred, meta)]
any_shape = [pc in cs for pc, (_, _, cs, *_) in zip(pred, meta)]
# the misses that land on a shape: on one of the named shape's colour (a look-alike by colour), of its kind, or other
misses = [(pc in col, pc in kind) for pc, (_, c, cs, col, kind) in zip(pred, meta) if pc != c and pc in cs]
by_scene = collections.defaultdict(list)
for pc, (si, *_) in zip(pred, meta):
  by_scene[si].append(pc)
same = [len(set(v)) == 1 for v in by_scene.values() if len(v) > 1]
n_cells = np.mean([len(cs) for _, _, cs, *_ in meta])
print(f"step {step}, {level}: questions {len(named)}, cell of the named shape {100*np.mean(named):.0f}%, a cell holding "
      f"some shape {100*np.mean(any_shape):.0f}% (distinct shape cells per scene {n_cells:.1f}), scenes whose every question "
      f"gets one cell {100*np.mean(same):.0f}%")
if misses:
  print(f"misses on a shape's cell: {len(misses)}; on a same-colour shape {100*np.mean([a for a, _ in misses]):.0f}%, "
        f"on a same-kind shape {100*np.mean([b for _, b in misses]):.0f}%, on neither "
        f"{100*np.mean([not (a or b) for a, b in misses]):.0f}%")
