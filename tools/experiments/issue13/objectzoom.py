"""Where a run's object call lands: after the gold window, does its crop hold the whole shape, the digit's glyph?

  PYTHONPATH=. python tools/experiments/issue13/objectzoom.py RUN_DIR [STAGE=pretrain_object] [LEVEL=medium] [N=48]

Asks the run's decoder (the `object` phase's rows: `GroundingConfig.zoom=2`) for the shape's zoom after the gold
window on N held-out scenes, greedy, and prints how often its crop holds the whole shape and the target's glyph, its
side against the scripted crop's, and the probe's `object_hit` (`grounding_probe.score_zoom`).
"""

import numpy as np

from mini_o3_jax import run_config
from mini_o3_jax.agent import tools
from mini_o3_jax.data import coldstart, grounding, scene_levels
from mini_o3_jax.pipeline import grounding_probe
from run_model import cli_args, load_run

run, stage_name, level, n = cli_args("pretrain_object", "medium", 48)
config, tok, mcfg, model, step = load_run(run, stage_name, "pretrain/object")
stage = run_config.pretrain_stage(config, mcfg)
tcfg = run_config.task_config(config)
probe = grounding_probe.GroundingProbe(grounding_probe.ProbeConfig(levels=(), scenes=0, seq_len=256, num_patches=288),
                                       stage.questions, tcfg, tok, mcfg)
tasks = [scene_levels.make_scene(level, i, tcfg, scene_levels.HELDOUT_SPLIT) for i in range(n)]
rng = np.random.default_rng(1)
asked = [(t, p) for t in tasks if (p := probe._agent_prompt(t, "zoom", rng, 0)) is not None]
texts = probe._generate(model, [p for _, p in asked], 24)
shape_in, glyph_in, ratio, hit = [], [], [], []
for (task, _), text in zip(asked, texts):
  target = next(o for o in task.objects if o.is_target)
  gold = coldstart.reflex_search(task, target, stage.questions.decimals, via_object=True)
  hit.append(grounding_probe.score_zoom(text, task, stage.questions.decimals, 0, via_object=True)[0])
  action = tools.parse_action(tools.truncate_at_stop(text))
  if not (isinstance(action, tools.ToolCall) and action.source == "observation_1"):
    shape_in.append(False)
    glyph_in.append(False)
    continue
  region = coldstart.crop_region(action.bbox, gold.regions[0], gold.observations[0].size)
  shape_in.append(coldstart.contains(region, target.box))
  glyph_in.append(coldstart.contains(region, target.detail_box))
  ratio.append((region[2] - region[0]) / (gold.regions[1][2] - gold.regions[1][0]))
print(f"{run} {stage_name} step {step} {level}: {len(asked)} calls; the whole shape inside {100 * np.mean(shape_in):.0f} %, "
      f"the glyph inside {100 * np.mean(glyph_in):.0f} %, side / scripted median {np.median(ratio):.2f} "
      f"(10-90 %: {np.quantile(ratio, 0.1):.2f}-{np.quantile(ratio, 0.9):.2f}); object_hit {100 * np.mean(hit):.0f} %")
