"""The demo's data and SFT stages: scripted cold-start trajectories, then supervised fine-tuning.

Both resume: the tokenizer is reused from the work directory, and SFT restores its latest Orbax
checkpoint (parameters, optimizer state, step, RNG and the data iterator's position).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Iterator, Sequence

import jax

from mini_o3_jax.data import coldstart, loader, synthetic
from mini_o3_jax.eval import report
from mini_o3_jax.pipeline import common, sources
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax import progress
from mini_o3_jax import run_config
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import optimizer as opt_lib
from mini_o3_jax.train import sft as sft_lib
from mini_o3_jax.train import state as state_lib

log = logging.getLogger(__name__)


def coldstart_trajectories(config) -> Sequence:
  """The scripted cold-start set; every image replaced by the view the model sees (saves memory).

  With `config.data.source = "coldstart"`, the released trajectories instead (images decoded on access).
  """
  if not sources.is_synthetic(config.data):
    return sources.sft_trajectories(config)
  tcfg, explorer = run_config.task_config(config), run_config.explorer_config(config)
  out = []
  for tier, n in config.data.sft_tasks.items():
    out += progress.bar(scripted_views(tier, n, "train", tcfg, explorer), total=n, desc=f"cold-start {tier}",
                        leave=False)
  return out


def scripted_views(tier: str, n: int, split: str, tcfg,
                   explorer: coldstart.ExplorerConfig = coldstart.ExplorerConfig()) -> Iterator:
  """Scripted trajectories of (tier, split) with every image replaced by the view the model sees."""
  for traj in coldstart.scripted_coldstart(tier, n, split=split, task_config=tcfg, config=explorer):
    views = [synthetic.render_view(im, None, tcfg) for im in traj.images]
    yield dataclasses.replace(traj, images=views, metadata=dict(traj.metadata))


def run_data(config, workdir: str) -> dict:
  """Builds the tokenizer and writes a summary and a few pictures of the cold-start data."""
  config = common.resolve(config)
  tokenizer = common.build_tokenizer(config, workdir)
  tcfg = run_config.task_config(config)
  summary = {}
  for tier in synthetic.TIERS:
    trajs = list(coldstart.scripted_coldstart(tier, min(40, config.data.sft_tasks[tier]), split="train",
                                              task_config=tcfg, config=run_config.explorer_config(config)))
    summary[tier] = coldstart.summarize(trajs)
    longest = max(trajs, key=lambda t: t.num_turns)
    report.render_trajectory(longest, target_box=synthetic.task_from_id(longest.id, tcfg).target_box,
                             correct=True).save(common.path(workdir, "data", f"coldstart_{tier}.png"))
  summary["tokenizer_vocab"] = len(tokenizer)
  with open(common.path(workdir, "data", "coldstart_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def make_state(config, mcfg, optimizer_config, mesh, *, seed: int, params=None):
  return state_lib.create_train_state(mcfg, lambda p: state_lib.make_tx(optimizer_config, p), mesh, seed=seed,
                                      params=params)


def restore_params(workdir: str, stage: str, mcfg, mesh):
  """The parameters of a finished stage's latest checkpoint, sharded for `mesh` (optimizer state skipped)."""
  if not sources.has_checkpoint(workdir, stage):
    raise FileNotFoundError(f"stage {stage!r} has no checkpoint in {os.path.join(workdir, 'ckpt', stage)}: run it first")
  return ckpt_lib.restore_params(os.path.join(workdir, "ckpt", stage), mcfg, mesh=mesh)[0]


def run_sft(config, workdir: str) -> dict:
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  stage = run_config.sft_stage(config, mcfg)
  loop = stage.loop
  init = None if sources.has_checkpoint(workdir, "sft") else sources.init_params(config, mcfg, mesh)
  state, shardings, tx = make_state(config, mcfg, stage.optimizer, mesh, seed=config.seed, params=init)
  step_fn = sft_lib.make_sft_step(stage.step, tx, mesh, shardings,
                                  learning_rate_fn=opt_lib.make_schedule(stage.optimizer))
  log.info("SFT: %d parameters, %d steps of %d trajectories", state_lib.count_params(state.params), loop.steps,
           stage.batch.batch_size)

  trajs = coldstart_trajectories(config)
  min_pixels, max_pixels = run_config.pixel_budget(config)
  example_cfg = loader.ExampleConfig(min_pixels=min_pixels, max_pixels=max_pixels, max_tokens=config.data.max_tokens,
                                       **image_lib.settings_for(mcfg))
  lengths = None
  if stage.group_by_length:
    # Batches of similar lengths pad to small buckets: attention and logits cost follow the padding.
    lengths = [loader.example_length(t, tokenizer, example_cfg) for t in trajs]
    keep = [i for i, n in enumerate(lengths) if n <= example_cfg.max_tokens]
    log.info("SFT: %d of %d trajectories within %d tokens", len(keep), len(trajs), example_cfg.max_tokens)
    trajs, lengths = [trajs[i] for i in keep], [lengths[i] for i in keep]
  dataset = loader.examples_dataset(trajs, tokenizer, example_cfg, drop_long=lengths is None)
  collate = functools.partial(batch_lib.collate_sft, model_config=mcfg, batch_config=stage.batch)
  rows = stage.batch.batch_size
  if lengths is None:
    batches = loader.batches(dataset, rows, collate, seed=config.seed)
  else:
    batches = loader.length_grouped_batches(dataset, lengths, rows, collate, seed=config.seed)

  ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(os.path.join(workdir, "ckpt", "sft"),
                                                         save_interval_steps=loop.checkpoint_every, max_to_keep=2))
  start = 0
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(state_lib.abstract_train_state(shardings, state))
    batches.set_state(data_state)
    start = int(jax.device_get(state.step))
    common.check_resume("sft", start, loop.steps, ckpt.directory)
    log.info("SFT: resumed from step %d", start)
  metrics_log = common.MetricLog(common.path(workdir, "metrics", "sft.jsonl"), start)
  metrics = {}
  with progress.bar(range(start, loop.steps), desc="SFT", initial=start, total=loop.steps) as bar:
    for step in bar:
      batch = batch_lib.shard_batch(next(batches), mesh)
      state, metrics = state_lib.timed_step(step_fn, state, batch)
      bar.set_postfix_str(common.fmt_metrics(metrics, ("loss", "accuracy")))
      if (step + 1) % loop.log_every == 0 or step + 1 == loop.steps:
        metrics_log.write(step + 1, metrics)
        log.info("SFT step %d: %s", step + 1, common.fmt_metrics(
            metrics, ("loss", "accuracy", "grad_norm", "learning_rate", "step_time_s", "tokens_per_s")))
      ckpt.maybe_save(state, batches.get_state())
  if ckpt.latest_step() != loop.steps:
    ckpt.save(state, batches.get_state())
  ckpt.close()
  metrics_log.close()
  metrics = common.last_metrics(metrics_log.file, metrics)
  return {"steps": loop.steps, "final_loss": metrics.get("loss"), "final_accuracy": metrics.get("accuracy")}
