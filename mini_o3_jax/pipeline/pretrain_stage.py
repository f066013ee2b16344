"""The `pretrain_vision` and `pretrain` stages: a tiny base that grounds and reads, trained on fresh synthetic scenes.

`pretrain_vision` trains the tower alone on feature targets (`train.vision_targets`); `pretrain` trains the
decoder (from that stage's checkpoint with `from_stage`, the tower frozen or not). Rows come from
`data.grounding.SceneStream` (a pure function of the step, so a resumed run sees the rows it would have
seen); the step is the SFT step (next-token loss on the answers only). A held-out probe (teacher-forced
accuracy per skill, and greedy boxes scored against the scene) runs every `eval_every` steps and at the
end, and its table lands in WORKDIR/pretrain/skills.json.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax
from flax import nnx
import numpy as np

from mini_o3_jax import export as export_lib
from mini_o3_jax import progress
from mini_o3_jax import run_config

from mini_o3_jax.data import grounding, scene_levels
from mini_o3_jax.model import vision as vision_lib
from mini_o3_jax.model import vlm
from mini_o3_jax.pipeline import base_card, common, grounding_probe, phases, sources
from mini_o3_jax.pipeline.train_stages import make_state, restore_params
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import optimizer as opt_lib
from mini_o3_jax.train import sft as sft_lib
from mini_o3_jax.train import state as state_lib
from mini_o3_jax.train import vision_targets

log = logging.getLogger(__name__)


def search_rows(zooms: int = 1) -> grounding.GroundingConfig:
  """A tower row that is the base's direct search: the scene, the located shape's window, (with 2 `zooms` the shape's
  own zoom inside it,) the legible zoom inside the last, read."""
  return grounding.GroundingConfig(locate=1, name=0, read=1, zoom=zooms, cell_first=True, cell_window=True,
                                   prompt_form="agent")


def with_saliency(batch: batch_lib.SFTBatch, examples, model_config, power: float) -> batch_lib.SFTBatch:
  """`batch` with `image_saliency` float32 [batch, patches / merge_unit]: each row's merged image tokens'
  saliency (`processing.image.token_saliency` of its pixels), -1 on padding tokens and padding rows."""
  v = model_config.vision
  b, num_patches = batch.inputs.pixel_values.shape[:2]
  out = np.full((b, num_patches // v.merge_unit), -1.0, np.float32)
  mean, std = image_lib.normalization(model_config.model_type)
  for r, e in enumerate(examples):
    if e.get("pixel_values") is None:
      continue
    s = image_lib.token_saliency(e["pixel_values"], e["image_grid_thw"], patch_size=v.patch_size,
                                 temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
                                 mean=mean, std=std, power=power)
    out[r, :len(s)] = s
  return dataclasses.replace(batch, image_saliency=out)


def with_feature_targets(batch: batch_lib.SFTBatch, examples, model_config,
                         stage: run_config.PretrainVisionStage) -> batch_lib.SFTBatch:
  """`batch` with the tower's feature targets' inputs (`train.vision_targets`): per merged image token its
  saliency within its colour (-1 on padding), its palette colour, its (row, column) cell, the kind of
  the row's scene shape that covers most of it or whose centre it holds (`stage.shape_tokens`; -1: none, and on
  every later image of the row unless `stage.shape_on_crops`: the crops' shapes too, placed by `crop_regions`)
  and, on a read question's crop, the digit the glyph's tokens show (`stage.digit_tokens`; -1 elsewhere); with the
  targets' label_scale, on every later image that is not read (a window, an object's zoom), (1, dx, dy) on the token
  holding each label's glyph centre (`token_points`), and with centre_scale the same for the shapes' centres on the
  images their kinds are placed on."""
  v = model_config.vision
  b, num_patches = batch.inputs.pixel_values.shape[:2]
  tokens = num_patches // v.merge_unit
  saliency = np.full((b, tokens), -1.0, np.float32)
  colour = np.zeros((b, tokens), np.int32)
  cell = np.zeros((b, tokens, 2), np.int32)
  shape = np.full((b, tokens), -1, np.int32)
  digit = np.full((b, tokens), -1, np.int32)
  label = np.zeros((b, tokens, 3), np.float32)
  centre = np.zeros((b, tokens, 3), np.float32)
  mean, std = image_lib.normalization(model_config.model_type)
  kind_tokens = image_lib.token_centres if stage.shape_tokens == "centre" else image_lib.token_boxes
  digit_tokens = image_lib.token_centres if stage.digit_tokens == "centre" else _core_tokens
  for r, e in enumerate(examples):
    if e.get("pixel_values") is None:
      continue
    s, k = image_lib.token_colours(e["pixel_values"], e["image_grid_thw"], np.asarray(stage.palette),
                                   chroma_floor=stage.chroma_floor, power=stage.saliency_power,
                                   patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                   merge_size=v.spatial_merge_size, mean=mean, std=std)
    saliency[r, :len(s)], colour[r, :len(k)] = s, k
    cell[r, :len(s)] = image_lib.token_cells(e["image_grid_thw"], v.spatial_merge_size)
    grids = np.asarray(e["image_grid_thw"]).reshape(-1, 3)
    starts = np.cumsum([0] + [int(np.prod(g)) // v.merge_unit for g in grids])
    if len(e.get("object_boxes", ())):
      regions = np.asarray(e.get("crop_regions", np.zeros((0, 4))), np.float64) if stage.shape_on_crops else ()
      for j, region in enumerate([(0.0, 0.0, 1.0, 1.0), *regions]):
        boxes, kinds = _boxes_in(region, e["object_boxes"], e["object_shapes"],
                                 keep_centred=stage.shape_tokens == "centre")
        if not len(boxes):
          continue
        covering = kind_tokens(boxes, grids[j], v.spatial_merge_size)
        shape[r, starts[j]:starts[j + 1]] = np.where(covering >= 0, kinds[np.clip(covering, 0, None)], -1)
        if stage.targets.centre_scale:
          centre[r, starts[j]:starts[j + 1]] = token_points(boxes, grids[j], v.spatial_merge_size)
    for j, glyph, d in zip(e.get("read_images", ()), e.get("read_glyphs", ()), e.get("read_digits", ())):
      holds = digit_tokens(glyph[None], grids[j], v.spatial_merge_size) >= 0
      digit[r, starts[j]:starts[j + 1]][holds] = d
    if stage.targets.label_scale and len(e.get("object_glyphs", ())):
      read = set(np.asarray(e.get("read_images", ())).tolist())
      unread = [j for j in range(1, len(grids)) if j not in read]
      for j in unread:  # a window's or an object's view: the labels it shows, too small to read
        glyphs, _ = _boxes_in(e["crop_regions"][j - 1], e["object_glyphs"], np.zeros(len(e["object_glyphs"])),
                              keep_centred=True)
        label[r, starts[j]:starts[j + 1]] = token_points(glyphs, grids[j], v.spatial_merge_size)
  return dataclasses.replace(batch, image_saliency=saliency, image_colour=colour, image_cell=cell,
                             image_shape=shape, image_digit=digit,
                             image_label=label if stage.targets.label_scale else None,
                             image_centre=centre if stage.targets.centre_scale else None)


def token_points(boxes: np.ndarray, grid_thw, merge_size: int) -> np.ndarray:
  """float32 [tokens, 3] for one image of grid `grid_thw`: (1, dx, dy) on each merged token holding the centre of
  a box (relative [x0, y0, x1, y1], float [n, 4]), (dx, dy) in [-0.5, 0.5) the centre's offset from the
  token's centre in tokens; 0 elsewhere (`image_lib.token_centres`' tokens)."""
  t, h, w = (int(v) for v in grid_thw)
  th, tw = h // merge_size, w // merge_size
  out = np.zeros((th * tw, 3), np.float32)
  for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
    if not (0 <= x0 + x1 < 2 and 0 <= y0 + y1 < 2):
      continue  # its centre lies outside the image
    x, y = tw * (x0 + x1) / 2, th * (y0 + y1) / 2
    col, row = min(tw - 1, int(x)), min(th - 1, int(y))
    out[row * tw + col] = (1.0, x - col - 0.5, y - row - 0.5)
  return np.tile(out, (t, 1))


def _boxes_in(region, boxes, kinds, keep_centred: bool) -> tuple[np.ndarray, np.ndarray]:
  """The shapes' boxes (relative to the scene) relative to the crop `region` of it, with their kinds: those whose
  centre the crop holds (`keep_centred`: the kind's token is the one holding it) or that it touches."""
  x0, y0, x1, y1 = region
  boxes = (np.asarray(boxes, np.float64).reshape(-1, 4) - [x0, y0, x0, y0]) / [x1 - x0, y1 - y0, x1 - x0, y1 - y0]
  if keep_centred:
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    keep = (cx >= 0) & (cx < 1) & (cy >= 0) & (cy < 1)
  else:
    keep = (boxes[:, 2] > 0) & (boxes[:, 0] < 1) & (boxes[:, 3] > 0) & (boxes[:, 1] < 1)
  return boxes[keep], np.asarray(kinds)[keep]


def _core_tokens(glyphs: np.ndarray, grid_thw, merge_size: int) -> np.ndarray:
  """`image_lib.token_boxes` of each glyph box's central half: the tokens holding a readable part of it."""
  x0, y0, x1, y1 = np.asarray(glyphs, np.float64).reshape(-1, 4).T
  dx, dy = (x1 - x0) / 4, (y1 - y0) / 4
  return image_lib.token_boxes(np.stack([x0 + dx, y0 + dy, x1 - dx, y1 - dy], -1), grid_thw, merge_size)


def _train_on_scenes(name: str, workdir: str, state, shardings, step_fn, loop: run_config.Loop,
                     stream: grounding.SceneStream, collate, mesh, probe: grounding_probe.GroundingProbe | None = None,
                     greedy_every_eval: bool = False) -> tuple[Any, dict, dict]:
  """The loop of a stage on fresh scenes: resume, steps, logs, probes, checkpoints -> (state, last
  metrics, last skills). Scenes for the next step are drawn on a host thread while this one runs."""
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(os.path.join(workdir, "ckpt", name),
                                                         save_interval_steps=loop.checkpoint_every, max_to_keep=2))
  start = 0
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(state_lib.abstract_train_state(shardings, state))
    start = int(jax.device_get(state.step))
    common.check_resume(name, start, loop.steps, ckpt.directory)
    log.info("%s: resumed from step %d", name, start)
  metrics_log = common.MetricLog(common.path(workdir, "metrics", f"{name}.jsonl"), start)
  skills_log = common.MetricLog(common.path(workdir, "metrics", f"{name}_skills.jsonl"), start) if probe else None
  metrics, skills = {}, {}
  with concurrent.futures.ThreadPoolExecutor(1) as pool, \
       progress.bar(range(start, loop.steps), desc=name, initial=start, total=loop.steps) as bar:
    upcoming = pool.submit(lambda s: collate(stream.rows_for(s)), start)
    for step in bar:
      batch = upcoming.result()
      if step + 1 < loop.steps:
        upcoming = pool.submit(lambda s: collate(stream.rows_for(s)), step + 1)
      state, metrics = state_lib.timed_step(step_fn, state, batch_lib.shard_batch(batch, mesh))
      bar.set_postfix_str(common.fmt_metrics(metrics, ("loss", "accuracy")))
      if (step + 1) % loop.log_every == 0 or step + 1 == loop.steps:
        metrics_log.write(step + 1, metrics)
        log.info("%s step %d: %s", name, step + 1, common.fmt_metrics(
            metrics, ("loss", "accuracy", "grad_norm", "learning_rate", "step_time_s")))
      if probe is not None and ((loop.eval_every and (step + 1) % loop.eval_every == 0) or step + 1 == loop.steps):
        skills = probe.run(state.model(), greedy=step + 1 == loop.steps or greedy_every_eval)
        skills_log.write(step + 1, skills)
        log.info("%s skills at step %d: %s", name, step + 1, grounding_probe.format_skills(skills))
      ckpt.maybe_save(state, {"step": step + 1})
  if ckpt.latest_step() != loop.steps:
    ckpt.save(state, {"step": loop.steps})
  ckpt.close()
  return state, common.last_metrics(metrics_log.file, metrics), skills


def sincos_table_params(mcfg, seed: int, scale: float) -> dict:
  """A fresh model's parameters (host arrays) whose Qwen3-VL position table is `scale` times the sin-cos code
  of its grid (`model.vision.sincos_position_table`)."""
  params = nnx.to_pure_dict(nnx.state(vlm.VLM(mcfg, rngs=nnx.Rngs(seed)), nnx.Param))
  v = mcfg.vision
  params["visual"]["pos_embed"] = np.asarray(scale * vision_lib.sincos_position_table(v.grid_per_side, v.hidden_size),
                                             params["visual"]["pos_embed"].dtype)
  return jax.tree.map(np.asarray, params)


def _start_params(config, workdir: str, name: str, fresh: bool, from_stage: str, mcfg, mesh,
                  vision_from: str = ""):
  """A run's first parameters: None when it resumes its own checkpoint (not `fresh`), else the `from_stage`
  run's last, else `model.init_from`'s (None: a fresh init); the tower from the `vision_from` run's last."""
  if not fresh:
    return None
  if from_stage:
    log.info("%s: starts from the %s run's checkpoint", name, from_stage)
    params = restore_params(workdir, from_stage, mcfg, mesh)
  else:
    params = sources.init_params(config, mcfg, mesh)
  if vision_from:
    if params is None:
      raise ValueError(f"{name}: vision_from={vision_from!r} needs a model to put the tower in (from_stage or "
                       "model.init_from)")
    log.info("%s: its tower from the %s run's checkpoint", name, vision_from)
    params = {**params, "visual": restore_params(workdir, vision_from, mcfg, mesh)["visual"]}
  return params


def tower_questions(stage: run_config.PretrainVisionStage) -> grounding.GroundingConfig:
  """What a tower row asks: only its images matter. One short question a scene, and with the digit target a read
  question too, for its crop (where the digit is legible); or the base's whole direct search."""
  if stage.search_rows:
    return search_rows(stage.search_rows)
  return grounding.GroundingConfig(locate=1, name=0, read=int(stage.targets.digit_scale > 0),
                                   read_jitter=stage.read_jitter)


def run_pretrain_vision(config, workdir: str, name: str = "pretrain_vision") -> dict:
  """The tower alone on feature targets (`train.vision_targets`), the decoder untouched: the first half
  of the base's recipe; `pretrain` with `from_stage="pretrain_vision"` and a frozen tower follows. As a
  phase (`pipeline.phases`) from a trained model, it re-tunes that model's tower.

  Every step's scenes are fresh, so its loss is already a held-out number."""
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  stage = run_config.pretrain_vision_stage(config, mcfg)
  fresh = not sources.has_checkpoint(workdir, name)
  init = _start_params(config, workdir, name, fresh, stage.from_stage, mcfg, mesh)
  if fresh and init is None and stage.position_table_sincos:
    init = sincos_table_params(mcfg, config.seed, stage.position_table_sincos)
  state, shardings, tx = make_state(config, mcfg, stage.optimizer, mesh, seed=config.seed, params=init)
  step_fn = vision_targets.make_vision_step(stage.targets, tx, mesh, shardings,
                                            learning_rate_fn=opt_lib.make_schedule(stage.optimizer))
  log.info("%s: %d steps of %d fresh scenes, the tower alone", name, stage.loop.steps, stage.batch.batch_size)
  stream = grounding.SceneStream(stage.curriculum, tower_questions(stage), run_config.task_config(config), tokenizer,
                                 rows=stage.batch.batch_size, seed=config.seed,
                                 split=phases.scene_split(scene_levels.VISION_SPLIT, name, "pretrain_vision"),
                                 image=image_lib.settings_for(mcfg))
  collate_rows = functools.partial(batch_lib.collate_sft, model_config=mcfg, batch_config=stage.batch)
  _, metrics, _ = _train_on_scenes(name, workdir, state, shardings, step_fn, stage.loop, stream,
                                   lambda rows: with_feature_targets(collate_rows(rows), rows, mcfg, stage), mesh)
  return {"steps": stage.loop.steps, "final_loss": metrics.get("loss")}


def run_pretrain(config, workdir: str, name: str = "pretrain") -> dict:
  """The decoder (the tower frozen or not) on questions about fresh scenes, probed on held-out ones; its
  table lands in WORKDIR/<name>/skills.json."""
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  stage = run_config.pretrain_stage(config, mcfg)
  loop, scenes_per_step = stage.loop, stage.batch.batch_size
  tcfg = run_config.task_config(config)
  init = _start_params(config, workdir, name, not sources.has_checkpoint(workdir, name), stage.from_stage, mcfg, mesh,
                       stage.vision_from)
  state, shardings, tx = make_state(config, mcfg, stage.optimizer, mesh, seed=config.seed, params=init)
  step_fn = sft_lib.make_sft_step(stage.step, tx, mesh, shardings,
                                  learning_rate_fn=opt_lib.make_schedule(stage.optimizer))
  log.info("%s: %d parameters, %d steps of %d fresh scenes", name, state_lib.count_params(state.params),
           loop.steps, scenes_per_step)
  stream = grounding.SceneStream(stage.curriculum, stage.questions, tcfg, tokenizer, rows=scenes_per_step,
                                 seed=config.seed, split=phases.scene_split(scene_levels.PRETRAIN_SPLIT, name, "pretrain"),
                                 image=image_lib.settings_for(mcfg))
  collate_rows = functools.partial(batch_lib.collate_sft, model_config=mcfg, batch_config=stage.batch)

  def collate(rows):
    batch = collate_rows(rows)
    return with_saliency(batch, rows, mcfg, stage.objectness_power) if stage.step.objectness_weight else batch
  probe_cfg = grounding_probe.ProbeConfig(levels=stage.probe_levels, scenes=stage.probe_scenes,
                                          seq_len=max(stage.batch.length_buckets),
                                          num_patches=max(stage.batch.patch_buckets))
  probe = grounding_probe.GroundingProbe(probe_cfg, stage.questions, tcfg, tokenizer, mcfg, seed=config.seed)
  state, metrics, skills = _train_on_scenes(name, workdir, state, shardings, step_fn, loop, stream, collate, mesh,
                                            probe, stage.greedy_every_eval)
  if not skills:
    skills = probe.run(state.model(), greedy=True)
  with open(common.path(workdir, name, "skills.json"), "w") as f:
    json.dump(skills, f, indent=2)
  return {"steps": loop.steps, "final_loss": metrics.get("loss"), "skills": grounding_probe.format_skills(skills)}


def run_export_base(config, workdir: str) -> dict:
  """The pretrained base as an HF directory (WORKDIR/base, or `base_export.out`) with its skills and summary:
  the last `pretrain` run of `config.stages` (a phase's, when the recipe ends in one), and every training
  run of the recipe in training_summary.json.

  This is the directory a run's `model.init_from` names to start from the base; README.md is its model card
  (`base_card`).
  """
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  runs = phases.runs_of(config.stages)
  exported = phases.last_run(runs, "pretrain")
  source = exported.name
  params = restore_params(workdir, source, mcfg, mesh)
  graphdef, _ = state_lib.abstract_model(mcfg)
  model = nnx.merge(graphdef, params)
  out = config.base_export.get("out") or os.path.join(workdir, "base")
  min_pixels, max_pixels = run_config.pixel_budget(config)
  export_lib.export_model(model, mcfg, tokenizer, out, min_pixels=min_pixels, max_pixels=max_pixels)
  summary = {"seed": config.seed, "view_pixels": config.view_pixels,
             "label_shade": run_config.task_config(config).label_shade,
             "parameters": state_lib.count_params(params),
             "exported_run": source,
             "runs": [_run_summary(phases.configure(config, r), workdir, r) for r in runs if r.stage in phases.PHASED]}
  with open(os.path.join(out, "training_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  # The exported run's own probe (its probe_scenes a level) when it ran one; else the check's, on fewer scenes.
  skills, probe_scenes = None, None
  skills_file = os.path.join(workdir, source, "skills.json")
  if os.path.exists(skills_file):
    with open(skills_file) as f:
      skills = json.load(f)
    with open(os.path.join(out, "skills.json"), "w") as f:
      json.dump(skills, f, indent=2)
    probe_scenes = phases.configure(config, exported).pretrain.probe_scenes
  check = _check_export(out, config, mcfg, exported)
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(base_card.model_card(summary, skills or check["skills"], check, probe_scenes))
  return {"path": out, "run": source, "check": grounding_probe.format_skills(check["skills"])}


def _check_export(out: str, config, mcfg, run: phases.StageRun) -> dict:
  """Probes the export read back from `out` on `base_export.check_scenes` held-out scenes per level of
  the exported run's probe and records the table and how to redo it in out/skills_check.json: a copy of
  the directory must reproduce it (`grounding_probe.probe_export` with the recorded settings)."""
  stage = run_config.pretrain_stage(phases.configure(config, run), mcfg)
  world = run_config.task_config(config)
  check = {"seed": config.seed, "view_pixels": config.view_pixels, "label_shade": world.label_shade,
           "levels": list(stage.probe_levels),
           "scenes": config.base_export.get("check_scenes", 8), "seq_len": max(stage.batch.length_buckets),
           "num_patches": max(stage.batch.patch_buckets), "questions": dataclasses.asdict(stage.questions)}
  check["skills"] = grounding_probe.redo_check(out, check, world)
  with open(os.path.join(out, "skills_check.json"), "w") as f:
    json.dump(check, f, indent=2)
  return check


def _run_summary(config, workdir: str, run: phases.StageRun) -> dict:
  """A training run's settings and how it ended, as the base's training_summary.json lists it."""
  section = config[run.stage]
  keys = ("steps", "batch_size", "lr", "curriculum", "from_stage", "vision_from")
  out = {"run": run.name, **{k: section.get(k) for k in keys}}
  if run.stage == "pretrain":
    out["questions"] = section.questions.to_dict()
  else:
    out["targets"] = section.targets.to_dict()
  rows = common.read_jsonl(os.path.join(workdir, "metrics", f"{run.name}.jsonl"))
  if rows:
    out.update(final_loss=rows[-1].get("loss"), wall_time_s=rows[-1].get("time_s"))
  return out
