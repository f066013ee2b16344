"""Does a pretrained grounding model use the question? For 48 held-out scenes of a level, ask (greedy) for
every shape whose name is unique in turn, and record which shape each box lands on.

  PYTHONPATH=. python tools/experiments/issue13/bind.py RUNS/NAME [level]     # needs RUNS/NAME/ckpt/pretrain

Prints the share of questions answered on the named shape, the share of scenes where every question lands on
one and the same shape (a policy that ignores the question: 100 %), and distinct picks per question.
"""
import json, os, sys, collections
import numpy as np
import ml_collections
from mini_o3_jax.pipeline import common, grounding_probe
from mini_o3_jax.data import grounding, scene_levels
from mini_o3_jax.eval import diagnostics
from mini_o3_jax.agent import tools
from mini_o3_jax import run_config
from mini_o3_jax.train import checkpoint as ckpt_lib
workdir = sys.argv[1]; level = sys.argv[2] if len(sys.argv) > 2 else "few"
cfg = ml_collections.ConfigDict(json.load(open(f"{workdir}/config.json")))
config, tok, mcfg, mesh = common.setup(cfg, workdir)
model, step = ckpt_lib.restore_model(f"{workdir}/ckpt/pretrain", mcfg)
tcfg = run_config.task_config(config)
stage = run_config.pretrain_stage(config, mcfg)
probe = grounding_probe.GroundingProbe(grounding_probe.ProbeConfig(levels=(level,), scenes=2), stage.questions, tcfg, tok, mcfg)
tasks = [scene_levels.make_scene(level, i, tcfg, scene_levels.HELDOUT_SPLIT) for i in range(48)]
prompts, meta = [], []
for si, t in enumerate(tasks):
  names = [grounding.object_name(o) for o in t.objects]
  view = grounding.synthetic.render_view(t.image, None, tcfg)
  for oi, o in enumerate(t.objects):
    if names.count(names[oi]) == 1:
      prompts.append(probe._prompt([view], grounding.locate_question(names[oi]))); meta.append((si, oi))
texts = probe._generate(model, prompts, int(os.environ.get("BIND_TOKENS", 20)))
hit = []; picks = collections.defaultdict(list)
for (si, oi), text in zip(meta, texts):
  a = tools.parse_action(tools.truncate_at_stop(text)); box = a.bbox if isinstance(a, tools.ToolCall) else None
  on = [j for j, o in enumerate(tasks[si].objects) if box is not None and diagnostics.centre_in(o.box, box)]
  hit.append(oi in on); picks[si].append(on[0] if on else -1)
distinct = [len(set(p)) / len(p) for p in picks.values() if len(p) > 1]
same = [len(set(p)) == 1 for p in picks.values() if len(p) > 1]
print(f"step {step}: questions {len(hit)}, on named {100*np.mean(hit):.0f}%, scenes whose every question lands on one shape "
      f"{100*np.mean(same):.0f}%, distinct picks per question {np.mean(distinct):.2f}")
