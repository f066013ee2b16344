"""The `pretrain` stage: a tiny base that grounds and reads, trained on fresh synthetic scenes.

Rows come from `data.grounding.SceneStream` (a pure function of the step, so a resumed run sees the
rows it would have seen); the step is the SFT step (next-token loss on the answers only). A
held-out probe (teacher-forced accuracy per skill, and greedy boxes scored against the scene) runs
every `eval_every` steps and at the end, and its table lands in WORKDIR/pretrain/skills.json.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os

import jax
from flax import nnx
import numpy as np

from mini_o3_jax import export as export_lib
from mini_o3_jax import progress
from mini_o3_jax import run_config

from mini_o3_jax.data import grounding
from mini_o3_jax.pipeline import common, grounding_probe, sources
from mini_o3_jax.pipeline.train_stages import make_state, restore_params
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import optimizer as opt_lib
from mini_o3_jax.train import sft as sft_lib
from mini_o3_jax.train import state as state_lib

log = logging.getLogger(__name__)


def curriculum(config) -> grounding.Curriculum:
  return grounding.Curriculum.parse(config.pretrain.curriculum)


def grounding_config(config) -> grounding.GroundingConfig:
  q = config.pretrain.questions
  return grounding.GroundingConfig(locate=q.locate, name=q.name, read=q.read, decimals=q.decimals,
                                  question_first=q.get("question_first", False))


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


def run_pretrain(config, workdir: str) -> dict:
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  c = config.pretrain
  tcfg = run_config.task_config(config)
  ocfg = opt_lib.OptimizerConfig(lr=c.lr, warmup_steps=c.warmup_steps, total_steps=c.steps,
                                 end_lr_ratio=c.end_lr_ratio, weight_decay=c.weight_decay, grad_clip_norm=1.0,
                                 freeze_vision=c.get("freeze_vision", False))
  init = None if sources.has_checkpoint(workdir, "pretrain") else sources.init_params(config, mcfg, mesh)
  state, shardings, tx = make_state(config, mcfg, ocfg, mesh, seed=config.seed, params=init)
  objectness = c.get("objectness_weight", 0.0)
  sft_cfg = sft_lib.SFTConfig(objectness_weight=objectness,
                              objectness_scale=c.get("objectness_scale", sft_lib.SFTConfig.objectness_scale))
  step_fn = sft_lib.make_sft_step(sft_cfg, tx, mesh, shardings,
                                  learning_rate_fn=opt_lib.make_schedule(ocfg))
  log.info("pretrain: %d parameters, %d steps of %d fresh scenes", state_lib.count_params(state.params),
           c.steps, c.batch_size)
  stream = grounding.SceneStream(curriculum(config), grounding_config(config), tcfg, tokenizer,
                                 rows=c.batch_size, seed=config.seed)
  batch_cfg = batch_lib.BatchConfig(batch_size=c.batch_size, length_buckets=tuple(c.length_buckets),
                                    patch_buckets=tuple(c.patch_buckets), pad_token_id=mcfg.text.pad_token_id)
  collate_rows = functools.partial(batch_lib.collate_sft, model_config=mcfg, batch_config=batch_cfg)
  power = c.get("objectness_power", 4.0)

  def collate(rows):
    batch = collate_rows(rows)
    return with_saliency(batch, rows, mcfg, power) if objectness else batch
  probe_cfg = grounding_probe.ProbeConfig(levels=tuple(c.probe_levels), scenes=c.probe_scenes,
                                          seq_len=max(c.length_buckets), num_patches=max(c.patch_buckets))
  probe = grounding_probe.GroundingProbe(probe_cfg, grounding_config(config), tcfg, tokenizer, mcfg,
                                         seed=config.seed)

  ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(os.path.join(workdir, "ckpt", "pretrain"),
                                                         save_interval_steps=c.checkpoint_every, max_to_keep=2))
  start = 0
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(state_lib.abstract_train_state(shardings, state))
    start = int(jax.device_get(state.step))
    common.check_resume("pretrain", start, c.steps, ckpt.directory)
    log.info("pretrain: resumed from step %d", start)
  metrics_log = common.MetricLog(common.path(workdir, "metrics", "pretrain.jsonl"), start)
  skills_log = common.MetricLog(common.path(workdir, "metrics", "pretrain_skills.jsonl"), start)
  metrics, skills = {}, {}
  # Scenes for the next step are drawn on a host thread while the device runs this one.
  with concurrent.futures.ThreadPoolExecutor(1) as pool, \
       progress.bar(range(start, c.steps), desc="pretrain", initial=start, total=c.steps) as bar:
    upcoming = pool.submit(lambda s: collate(stream.rows_for(s)), start)
    for step in bar:
      batch = upcoming.result()
      if step + 1 < c.steps:
        upcoming = pool.submit(lambda s: collate(stream.rows_for(s)), step + 1)
      state, metrics = state_lib.timed_step(step_fn, state, batch_lib.shard_batch(batch, mesh))
      bar.set_postfix_str(common.fmt_metrics(metrics, ("loss", "accuracy")))
      if (step + 1) % c.log_every == 0 or step + 1 == c.steps:
        metrics_log.write(step + 1, metrics)
        log.info("pretrain step %d: %s", step + 1, common.fmt_metrics(
            metrics, ("loss", "accuracy", "grad_norm", "learning_rate", "step_time_s")))
      if (step + 1) % c.eval_every == 0 or step + 1 == c.steps:
        skills = probe.run(state.model(), greedy=step + 1 == c.steps or c.greedy_every_eval)
        skills_log.write(step + 1, skills)
        log.info("pretrain skills at step %d: %s", step + 1, grounding_probe.format_skills(skills))
      ckpt.maybe_save(state, {"step": step + 1})
  if ckpt.latest_step() != c.steps:
    ckpt.save(state, {"step": c.steps})
  ckpt.close()
  if not skills:
    skills = probe.run(state.model(), greedy=True)
  with open(common.path(workdir, "pretrain", "skills.json"), "w") as f:
    json.dump(skills, f, indent=2)
  metrics = common.last_metrics(metrics_log.file, metrics)
  return {"steps": c.steps, "final_loss": metrics.get("loss"), "skills": grounding_probe.format_skills(skills)}


def run_export_base(config, workdir: str) -> dict:
  """The pretrained base as an HF directory (WORKDIR/base, or `base_export.out`) with its skills and summary.

  This is the directory the demo's `model.init_from` names (the repository ships one: assets/tiny_base).
  """
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  params = restore_params(workdir, "pretrain", mcfg, mesh)
  graphdef, _ = state_lib.abstract_model(mcfg)
  model = nnx.merge(graphdef, params)
  out = config.base_export.get("out") or os.path.join(workdir, "base")
  min_pixels, max_pixels = run_config.pixel_budget(config)
  export_lib.export_model(model, mcfg, tokenizer, out, min_pixels=min_pixels, max_pixels=max_pixels)
  skills_file = os.path.join(workdir, "pretrain", "skills.json")
  summary = {"steps": config.pretrain.steps, "batch_size": config.pretrain.batch_size, "seed": config.seed,
             "curriculum": config.pretrain.curriculum, "questions": config.pretrain.questions.to_dict(),
             "view_pixels": config.view_pixels, "parameters": state_lib.count_params(params)}
  rows = common.read_jsonl(os.path.join(workdir, "metrics", "pretrain.jsonl"))
  if rows:
    summary.update(final_loss=rows[-1].get("loss"), wall_time_s=rows[-1].get("time_s"))
  with open(os.path.join(out, "training_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if os.path.exists(skills_file):
    with open(skills_file) as f, open(os.path.join(out, "skills.json"), "w") as g:
      g.write(f.read())
  return {"path": out}
