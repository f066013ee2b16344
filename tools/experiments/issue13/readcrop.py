"""Greedy read of an exported base on the read crop as the agent's tool takes it (session 18).

  PYTHONPATH=. python tools/experiments/issue13/readcrop.py BASE_DIR LEVEL N

exact: the generator's legible crop (the digit at its centre); up: the agent's zoom inside its window
(`coldstart.reflex_search`, the box's side rounded up); down: the same box, its side rounded down.
"""
import dataclasses, json, math, sys
import numpy as np
from configs import pretrain_tiny
from mini_o3_jax import run_config
from mini_o3_jax.agent import tools
from mini_o3_jax.data import coldstart, grounding, synthetic
from mini_o3_jax.model import hf
from mini_o3_jax.pipeline import common, grounding_probe
from mini_o3_jax.processing import tokenizer as tok_lib
BASE = sys.argv[1]; LEVEL = sys.argv[2]; N = int(sys.argv[3])
check = json.load(open(f"{BASE}/skills_check.json"))
cfg = common.resolve(pretrain_tiny.get_config())
model, mcfg = hf.load_pretrained(BASE)
tok = tok_lib.load_tokenizer(BASE)
q = dict(check["questions"]); q["zoom"] = 0
p = grounding_probe.GroundingProbe(grounding_probe.ProbeConfig(levels=(LEVEL,), scenes=N, seq_len=256, num_patches=256),
    grounding.GroundingConfig(**q), run_config.task_config(cfg), tok, mcfg, seed=0)
tc = p.task_config
def with_crop(t, how):
  objs = list(t.objects); i = next(k for k, o in enumerate(objs) if o.is_target); o = objs[i]
  if how != "exact":
    s = coldstart.reflex_search(t, o, 2)
    if s is None: return None
    region = s.regions[1]
    if how == "down":
      window = s.regions[0]; W = s.observations[0].size
      rel = coldstart.relative_to(o.zoom_path[-1], window)
      side = [math.floor((rel[2] - rel[0]) * 100) / 100, math.floor((rel[3] - rel[1]) * 100) / 100]
      c = [(rel[0] + rel[2]) / 2, (rel[1] + rel[3]) / 2]
      box = tuple(round(v, 2) for v in (c[0] - side[0] / 2, c[1] - side[1] / 2, c[0] + side[0] / 2, c[1] + side[1] / 2))
      region = coldstart.crop_region(box, window, W)
    objs[i] = dataclasses.replace(o, zoom_path=o.zoom_path[:-1] + (region,))
  return dataclasses.replace(t, objects=tuple(objs))
for how in ("exact", "up", "down"):
  tasks = [x for x in (with_crop(t, how) for t in p.tasks[LEVEL]) if x is not None]
  rng = np.random.default_rng(0)
  prompts = [p._agent_prompt(t, "read", rng) for t in tasks]
  texts = p._generate(model, prompts, 8)
  ok = [tools.parse_action(tools.truncate_at_stop(x)) == tools.FinalAnswer(t.answer) for t, x in zip(tasks, texts)]
  sizes = [synthetic.pixel_box(next(o for o in t.objects if o.is_target).zoom_path[-1], t.image.size) for t in tasks]
  px = np.mean([b[2] - b[0] for b in sizes])
  print(f"{LEVEL} {how}: read {np.mean(ok):.2f} n={len(ok)} crop side {px:.1f} px", flush=True)
