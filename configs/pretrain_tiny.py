"""The tiny base the demo starts from: a demo-sized Qwen3-VL taught to ground first.

  python -m mini_o3_jax.main --config configs/pretrain_tiny.py --workdir DIR

Fresh synthetic scenes every step (never repeated). `pretrain_vision` trains the tower alone to emit, per
image token, its position and its colour where a shape is and nothing on the canvas (`train/
vision_targets.py`); `pretrain` then trains the decoder on the frozen tower with questions about the
scene's objects (`data/grounding.py`): where is the <colour shape> (its 3 x 3 cell, then a `<grounding>`
box). Named phases (`pipeline/phases.py`) run those stages again with other settings: the shape's kind
and a legible crop's digit added to the tower, the decoder on scenes that need the kind, the first crop as
a window and reading. `tools/pretrain_base.sh WORKDIR` runs the same recipe on two cores. The held-out probe
(`pipeline/grounding_probe.py`) logs the skills; `export_base` writes the base as an HF Qwen3-VL directory
(WORKDIR/base). docs/miniature.md (sessions 11-15) measures each rung.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  # The measured order of rungs (docs/miniature.md, sessions 11-15): the tower alone on feature targets
  # without the shape's kind; the decoder bound to it (the named shape's cell) on the frozen tower; the kind
  # added to that tower ("kind", the decoder untouched); the digit of a legible crop added too ("digits");
  # the bound decoder on the kind tower, on scenes where only the kind tells shapes apart ("same_colour");
  # the first crop as the cell's half-size window, and reading, on the digits tower ("window"); the export.
  # Session 18's phases, measured and not yet in the recipe (docs/miniature.md): "moved" (the tower reads the
  # digit wherever the agent's crops put it) and "zoom" (the legible zoom inside the window's observation, then
  # its digit: the whole direct search).
  # A tower phase trains the tower alone, so "kind" and "digits" can run beside the decoder's phases (the
  # decoder's phases take the tower with `vision_from`): tools/pretrain_base.sh runs the recipe on two cores,
  # listed here in an order one process can run.
  c.stages = ("pretrain_vision", "pretrain", "pretrain_vision/kind", "pretrain_vision/digits",
              "pretrain/same_colour", "pretrain/window", "export_base")
  # The tower needs absolute position to emit a position only where a shape is (session 11): Qwen3-VL's
  # learned table, started as a sin-cos code of the patch grid (pretrain_vision.position_table_sincos).
  # With family="qwen2_5_vl" set vision_position_sincos=1 instead (a fixed code with no Qwen2.5-VL
  # equivalent: such a base cannot be exported) and position_table_sincos=0.
  c.model.family = "qwen3_vl"
  # A 64-wide, 2-layer tower cannot hold the kind beside position, object and colour; 128 x 4 can (session 12).
  c.model.vision_depth, c.model.vision_hidden_size, c.model.vision_intermediate_size = 4, 128, 256
  c.pretrain_vision = ml_collections.ConfigDict(dict(
      steps=2000, batch_size=32, lr=1e-3, warmup_steps=50, end_lr_ratio=0.05, weight_decay=0.01,
      curriculum="0:few=0.3,easy=0.3,medium=0.2,hard=0.2", length_buckets=(96,), patch_buckets=(64,),
      checkpoint_every=250, log_every=25,
      # With model.family="qwen3_vl": its learned position table starts as the sin-cos code times this
      # (0 = random), the absolute position vision_position_sincos gives the Qwen2.5-VL tower, exportable.
      position_table_sincos=1.0,
      from_stage="",  # a run name: start from its checkpoint (the "kind" phase re-tunes a bound model's tower)
      # A read question's crop strays from the generator's legible crop by up to this fraction of its side, the
      # digit anywhere inside (grounding.GroundingConfig.read_jitter).
      read_jitter=0.0,
      # 1 or 2: a row is the base's direct search (the scene, the located shape's window, with 2 the shape's own zoom
      # inside it, the legible zoom inside the last): the tower trains on the agent's own observations
      # (run_config.PretrainVisionStage); 0: a scene and a read crop.
      search_rows=0,
      # train/vision_targets.py: each token's target is s * (position_scale * its cell's code + object_scale *
      # a shared object direction + colour_scale * its colour's direction) + shape_scale * its shape kind's
      # direction, s its saliency within its colour (0 at or below chroma_floor: the canvas), to saliency_power;
      # the kind's term on the tokens shape_tokens names ("cover": all a shape's box covers most of; "centre"),
      # times s too when shape_by_saliency is on. The kind waits for its phase: a tower that holds it from the
      # start keeps the decoder from binding (session 12, V0 / V2).
      # digit_scale: a read question's crop comes with each scene, and the token holding its digit's centre
      # gets digit_scale * that digit's direction (the decoder's read skill needs the digit in the features);
      # label_scale: a label too small to read, in a crop that is not read (a window, an object's zoom), gets
      # label_scale * (its direction + where in its token it lies): the next zoom's place (session 20); centre_scale:
      # the same on the token holding each shape's centre (a crop around the shape needs its place finer than a token).
      targets=dict(position_scale=0.5, object_scale=0.4, colour_scale=0.4, shape_scale=0.0, chroma_floor=0.08,
                   saliency_power=4.0, shape_tokens="centre", shape_by_saliency=False, digit_scale=0.0,
                   digit_tokens="centre", shape_on_crops=False, label_scale=0.0, centre_scale=0.0)))
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, lr=1e-3, warmup_steps=50, end_lr_ratio=0.05, weight_decay=0.01,
      # "first step:level=weight,...; ..."; levels in data/grounding.py: single, few, easy, medium, hard, same_colour.
      curriculum="0:single=0.3,few=0.7;500:single=0.1,few=0.4,easy=0.3,medium=0.2",
      # One locate question a row about a random uniquely named shape, answered by its 3 x 3 cell first;
      # in the first cell_only_steps only the cell is in the loss (the binding phase), the whole answer after;
      # cell_window: the box is the cell's half-size window (a coarse first crop), not the shape's own;
      # answer_form="agent": the answers are the agent's own turns (data/grounding.py), "short" the cell and call;
      # zoom=1 (with prompt_form="agent"): the legible zoom inside the located window asked too;
      # last_zoom_only_steps: the first this many steps train only each row's last zoom call.
      questions=dict(locate=1, name=0, read=0, decimals=2, question_first=False, target_first=False,
                     cell_first=True, cell_only_steps=100_000, cell_window=False, answer_form="short",
                     prompt_form="short", zoom=0, last_zoom_only_steps=0),
      length_buckets=(96,), patch_buckets=(64,),
      eval_every=250, greedy_every_eval=False, probe_levels=("few", "easy"), probe_scenes=48,
      checkpoint_every=250, log_every=25,
      # vision_from: the tower from that run (a tower phase trained beside the decoder's, joined here).
      from_stage="pretrain_vision", vision_from="", freeze_vision=True,
      # Experimental (issue 13), training-only: weight of the objectness auxiliary loss (train/sft.py;
      # docs/miniature.md H7S); 0 = off. Its target is each image token's colourfulness relative to the
      # image's most colourful token, to this power, times objectness_scale.
      objectness_weight=0.0, objectness_power=4.0, objectness_scale=0.5))
  # Each phase: its stage's section with these settings changed (mini_o3_jax/pipeline/phases.py).
  c.phases = ml_collections.ConfigDict(dict(
      # The tower learns the kind on the token at each shape's centre (2,500 steps: at 1,500 it keeps the
      # kind for 70 % of shapes and the decoder never binds it, session 14).
      kind=dict(from_stage="pretrain_vision", steps=2500, targets=dict(shape_scale=0.8)),
      # The tower keeps the kind and learns each legible crop's digit on its glyph's token: a term of 3.0, since
      # one token of a row's 32 carries it (0.8 is not learnt, session 14). Each row brings a crop: 128 patches.
      digits=dict(from_stage="pretrain_vision_kind", steps=500, patch_buckets=(128,), length_buckets=(128,),
                  curriculum="0:few=0.5,medium=0.5", targets=dict(shape_scale=0.8, digit_scale=3.0)),
      # The digit wherever the agent's own crops put it: "digits" teaches it only at the crop's centre, where the
      # generator puts it (read 85 % there, 12-19 % on the agent's zoom a few pixels off; session 18).
      moved=dict(from_stage="pretrain_vision_digits", steps=500, patch_buckets=(128,), length_buckets=(128,),
                 curriculum="0:few=0.5,medium=0.5", read_jitter=0.12,
                 targets=dict(shape_scale=0.8, digit_scale=3.0, digit_tokens="core")),
      # The tower on the agent's own observations: each row the base's direct search (the scene, the window the
      # located shape's call returns, the legible zoom inside it), the kind on every image's shapes and the digit
      # on the tool's zoom. The scene-only towers fit a window worse than a zero output (session 19: 1.19 -> 0.36
      # relative loss in 500 steps; on it the base reads the tool's own zoom 83-96 % after 200 zoom steps).
      search=dict(from_stage="pretrain_vision_moved", steps=1000, patch_buckets=(208, 256), length_buckets=(192,),
                  curriculum="0:few=0.1,same_colour=0.2,medium=0.3,hard=0.4", search_rows=1,
                  targets=dict(shape_scale=0.8, digit_scale=3.0, digit_tokens="core", shape_on_crops=True)),
      # The same on the search through the shape's own zoom (window -> the shape -> its label: every call asks for
      # something its image shows; session 20): the tower learns the object's zoom, where the label first shows,
      # and marks where in its token each label too small to read lies (the next zoom's place) and each shape's centre
      # (the object's zoom needs its place finer than a token).
      search_object=dict(from_stage="pretrain_vision_search", steps=500, patch_buckets=(256, 288),
                         length_buckets=(256,), curriculum="0:few=0.1,same_colour=0.2,medium=0.3,hard=0.4",
                         search_rows=2, targets=dict(shape_scale=0.8, digit_scale=3.0, digit_tokens="core",
                                                     shape_on_crops=True, label_scale=3.0, centre_scale=1.5)),
      # The bound decoder on the kind tower where only the kind separates the named shape from its
      # look-alikes (session 13, C1 + C2).
      same_colour=dict(from_stage="pretrain", vision_from="pretrain_vision_kind", steps=2500, lr=5e-4,
                       curriculum="0:few=0.2,same_colour=0.4,medium=0.2,hard=0.2;"
                                  "1000:few=0.1,same_colour=0.5,medium=0.2,hard=0.2",
                       probe_levels=("same_colour", "medium", "hard")),
      # The whole answer, its box the cell's half-size window (the agent's first crop, session 13's W1), and
      # read questions on a legible crop, on the digits tower, asked as the agent is asked (its instructions and
      # task question; the crop as the call's observation: session 17) and answered in the base's short form
      # (answers in the agent's words do not keep the skills in 800 steps: session 17).
      window=dict(from_stage="pretrain_same_colour", vision_from="pretrain_vision_digits", steps=800, lr=5e-4,
                  curriculum="0:few=0.1,same_colour=0.2,medium=0.3,hard=0.4",
                  questions=dict(read=1, cell_only_steps=0, cell_window=True, prompt_form="agent"),
                  patch_buckets=(128,), length_buckets=(128,), probe_levels=("few", "medium", "hard"),
                  probe_scenes=96),
      # The window's observation returned and the legible zoom inside it asked for (the cell of the window, then
      # the call on observation_1), then the digit of that zoom's observation: the base's whole direct search
      # (session 18). Where to zoom is its slow skill: the window's cell 44 / 36 % medium / hard after 1,200 steps
      # (prior ~31; session 19).
      zoom=dict(from_stage="pretrain_window", vision_from="pretrain_vision_search", steps=600, lr=1e-3,
                curriculum="0:few=0.1,same_colour=0.2,medium=0.3,hard=0.4",
                questions=dict(read=1, zoom=1, cell_only_steps=0, cell_window=True, prompt_form="agent"),
                patch_buckets=(208, 256), length_buckets=(192,), probe_levels=("few", "medium", "hard"),
                probe_scenes=96),
      # The direct search through the shape's own zoom: the window, then the shape (twice its side around it), then
      # its label's legible zoom from that, then the digit (session 20: from the window the label is 1.6 view px and
      # where to zoom stays near its prior).
      object=dict(from_stage="pretrain_zoom", vision_from="pretrain_vision_search_object", steps=600, lr=1e-3,
                  curriculum="0:few=0.1,same_colour=0.2,medium=0.3,hard=0.4",
                  questions=dict(read=1, zoom=2, cell_only_steps=0, cell_window=True, prompt_form="agent"),
                  patch_buckets=(256, 288), length_buckets=(256,), probe_levels=("few", "medium", "hard"),
                  probe_scenes=96)))
  # out: "" = WORKDIR/base; check_scenes: held-out scenes per level of the probe the export redoes on
  # its own files (skills_check.json: what a copy of the directory must reproduce).
  c.base_export = ml_collections.ConfigDict(dict(out="", check_scenes=8))
  return c
