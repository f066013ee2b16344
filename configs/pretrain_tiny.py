"""The tiny base the demo starts from: the demo's Qwen2.5-VL taught to ground and read first.

  python -m mini_o3_jax.main --config configs/pretrain_tiny.py --workdir DIR

Fresh synthetic scenes every step (never repeated), each followed by questions about its objects:
where is the <colour shape> (a `<grounding>` box), what is at a box, what digit a legible crop shows
(`data/grounding.py`); a curriculum from one shape on a canvas to the demo's hard tier. The held-out
probe (`pipeline/grounding_probe.py`) logs the skills; `export` writes the base as an HF directory.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  c.stages = ("pretrain", "export_base")
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=3000, batch_size=16, lr=2e-3, warmup_steps=50, end_lr_ratio=0.05, weight_decay=0.01,
      # "first step:level=weight,...; ..."; levels in data/grounding.py: single, few, easy, medium, hard.
      curriculum="0:single=0.5,few=0.5; 300:few=0.2,easy=0.4,medium=0.4; 1000:easy=0.3,medium=0.4,hard=0.3",
      questions=dict(locate=6, name=2, read=1, decimals=2, question_first=False),
      length_buckets=(256, 384, 512), patch_buckets=(128,),
      eval_every=250, greedy_every_eval=False, probe_levels=("easy", "medium", "hard"), probe_scenes=48,
      checkpoint_every=250, log_every=25,
      # Experimental (issue 13): train the text side on the random vision tower's features, which
      # keep position; trained end to end they collapse to one shared direction (docs/miniature.md).
      freeze_vision=False,
      # Experimental (issue 13), training-only: weight of the objectness auxiliary loss (train/sft.py;
      # 10 made single shapes ground in half the steps, docs/miniature.md H7S); 0 = off. Its target is
      # each image token's colourfulness relative to the image's most colourful token, to this power,
      # times objectness_scale (the target cosine with the fixed direction of the most colourful token).
      objectness_weight=0.0, objectness_power=4.0, objectness_scale=0.5))
  c.base_export = ml_collections.ConfigDict(dict(out=""))  # "" = WORKDIR/base
  return c
