"""The demo's evaluation, report and export stages.

eval: every trained model on held-out synthetic tasks of every tier, one rollout per task at the
largest turn budget, scored at every budget by exact truncation (`eval.turn_scaling`); plus the
"no_tools" baseline: the SFT model made to answer at once from the downscaled image (its first turn
is forced to open with the wording of its trained final turns, "<think>The digit on the red cross is ",
so the next token is its reading of the digit).
report: report.md (tables, the four claims checked, figures), turn_scaling.png, metrics.json.
export: the RL model (or the best available) as an HF checkpoint with its tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from flax import nnx

from mini_o3_jax.agent import prompts
from mini_o3_jax.agent import task as agent_task
from mini_o3_jax.data import coldstart, loader, synthetic
from mini_o3_jax.eval import claims, diagnostics, report, turn_scaling
from mini_o3_jax import export as export_lib
from mini_o3_jax.pipeline import common, probe, sources, train_stages
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax import run_config
import mini_o3_jax.sampler.rollout as rollout_lib
from mini_o3_jax.train import state as state_lib

log = logging.getLogger(__name__)

# model name in the report -> (checkpoint stage, answers at once?)
MODELS = {"no_tools": ("sft", True), "sft": ("sft", False), "rl": ("rl", False),
          "rl_no_overturn_mask": ("rl_no_mask", False), "rl_no_coldstart": ("rl_no_coldstart", False)}
DIRECT_ANSWER = f"<think>{prompts.DIRECT_ANSWER_THOUGHT}</think>\n<answer>"


def _answer_at_once(task_index: int, traj) -> str | None:
  """The no-tools policy: the first turn opens as the scripted final turn does, with the digit next.

  An opening the model never saw in SFT ("I answer from the image.") is off its distribution: it then
  writes no digit at all, which measures the prompt rather than what the model reads in the image.
  """
  if traj.num_turns:
    return None
  cue = diagnostics.target_cue(traj.question)
  return f"<think>{coldstart.ANSWER_PREFIX} {cue} is " if cue else DIRECT_ANSWER


def _load_model(workdir: str, stage: str | None, config, mcfg, mesh):
  """A stage's checkpoint in the work directory, or (stage None) the model of `config.model.init_from`."""
  if stage is None:
    params = sources.init_params(config, mcfg, mesh)
  else:
    params = train_stages.restore_params(workdir, stage, mcfg, mesh)
  graphdef, _ = state_lib.abstract_model(mcfg)
  return nnx.merge(graphdef, params)


def _eval_models(config, workdir: str) -> list[tuple[str, str | None, bool]]:
  """(report name, checkpoint stage or None for `config.model.init_from`, answers at once?): the models this
  work directory trained, else (an evaluation of a model trained elsewhere) `model.init_from`'s."""
  models = [(name, stage, at_once) for name, (stage, at_once) in MODELS.items()]
  trained = [m for m in models if sources.has_checkpoint(workdir, m[1])]
  if not trained and config.model.get("init_from"):
    return [(config.eval.get("model_name", "model"), None, False)]
  return trained or models


def _eval_sets(config, tcfg):
  """(label, iterator of (task offset, tasks)): the synthetic test tiers, or `config.eval.benchmarks`."""
  c = config.eval
  if not c.get("benchmarks"):
    for tier in c.tiers:
      yield tier, iter([(0, [agent_task.Task(image=t.image, question=t.question, gold=t.answer, id=t.id)
                             for t in synthetic.generate_split(tier, "test", c.n_per_tier, tcfg)])])
    return
  for entry in c.benchmarks:
    yield entry, sources.eval_chunks(config, entry, c.get("chunk", 64))


def _without_images(traj):
  """The trajectory with its images replaced by stubs (scoring needs only the turns)."""
  return dataclasses.replace(traj, images=[f"<image {i}>" for i in range(len(traj.images))],
                             metadata=dict(traj.metadata))


def _record(traj, o: turn_scaling.Outcome) -> dict:
  stub = dataclasses.replace(traj, images=[f"<image {i}>" for i in range(len(traj.images))],
                             metadata=dict(traj.metadata))
  return {**stub.to_json_dict(), "outcome": dataclasses.asdict(o)}


def run_eval(config, workdir: str) -> dict:
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  c = config.eval
  tcfg = None if c.get("benchmarks") else run_config.task_config(config)
  judge = common.judge()
  rows, summary, skill_trajs = [], {}, None
  for name, stage, at_once in _eval_models(config, workdir):
    if stage is not None and not sources.has_checkpoint(workdir, stage):
      log.warning("eval: no %s checkpoint, skipping model %s", stage, name)
      continue
    model = _load_model(workdir, stage, config, mcfg, mesh)
    budgets = (1,) if at_once else tuple(c.budgets)
    sampler = rollout_lib.Sampler(model, tokenizer, run_config.rollout_config(
        config, c, max_turns=max(budgets), max_forced_tokens=32), mesh=common.sampler_mesh(config, mesh))
    # TensorBoard: one run per model, x = the test-time turn budget
    events = common.tensorboard_writer(os.path.join(workdir, "tensorboard", f"eval_{name}"))
    for tier, chunks in _eval_sets(config, tcfg):
      file = tier.replace("/", "_")
      trajs = []
      for offset, tasks in chunks:
        results = sampler.rollout(tasks, seed=config.seed + 7, policy=_answer_at_once if at_once else None,
                                  key_ids=range(offset, offset + len(tasks)))
        if not trajs:
          for k, r in enumerate(results[:c.viewer_examples]):
            target = (synthetic.task_from_id(r.trajectory.id, tcfg).target_box
                      if tcfg is not None and synthetic.is_task_id(r.trajectory.id) else None)
            report.render_trajectory(r.trajectory, target_box=target,
                                     correct=turn_scaling.outcome(r.trajectory, judge).correct,
                                     ).save(common.path(workdir, "eval", name, f"{file}_{k}.png"))
        trajs += [_without_images(r.trajectory) for r in results]
      tier_rows = turn_scaling.turn_scaling_rows(name, tier, trajs, budgets, judge)
      rows += [r.as_dict() for r in tier_rows]
      top = tier_rows[-1]
      summary[f"{name}/{tier}"] = round(top.accuracy, 3)
      log.info("eval %s/%s: %s", name, tier, ", ".join(f"{r.max_turns}t {100 * r.accuracy:.1f}%" for r in tier_rows))
      for r in tier_rows if events is not None else ():
        events.add_scalar(f"accuracy/{file}", 100 * r.accuracy, global_step=r.max_turns)
        events.add_scalar(f"mean_turns/{file}", r.mean_turns, global_step=r.max_turns)
      with open(common.path(workdir, "eval", name, f"{file}.jsonl"), "w") as f:
        for t in trajs:
          f.write(json.dumps(_record(t, turn_scaling.outcome(t, judge))) + "\n")
    if tcfg is not None and not at_once and c.get("skills_per_tier", 0):
      if skill_trajs is None:  # the same held-out trajectories for every model
        skill_trajs = [t for tier in c.tiers
                       for t in train_stages.scripted_views(tier, c.skills_per_tier, "test", tcfg,
                                                            run_config.explorer_config(config))]
      _write_skills(config, workdir, name, model, tokenizer, mcfg, skill_trajs)
    if events is not None:
      events.close()
  if c.get("benchmarks"):
    min_pixels, max_pixels = run_config.pixel_budget(config)
    settings = {"temperature": c.temperature, "samples_per_task": dict(c.get("samples_per_task") or {}),
                "min_pixels": min_pixels, "max_pixels": max_pixels, "max_context": c.max_context,
                "max_turn_tokens": c.max_turn_tokens, "judge": "rule (normalised exact match; option letter)",
                "option_seed": c.get("option_seed", 0), "benchmarks": list(c.benchmarks),
                "budgets": list(c.budgets), "model": config.model.get("init_from") or workdir}
  else:
    settings = {"temperature": c.temperature, "samples_per_task": 1, "view_pixels": config.view_pixels,
                "max_context": c.max_context, "judge": "rule (exact match of the digit)", "split": "test",
                "train_turn_limit": config.rl.max_turns, "budgets": list(c.budgets)}
  report.write_metrics(os.path.join(workdir, "metrics.json"), rows, settings=settings)
  return summary


def _write_skills(config, workdir: str, name: str, model, tokenizer, mcfg, trajs) -> None:
  """Teacher-forced accuracy by kind of token on scripted test-split trajectories (see `probe`)."""
  min_pixels, max_pixels = run_config.pixel_budget(config)
  example_cfg = loader.ExampleConfig(min_pixels=min_pixels, max_pixels=max_pixels, **image_lib.settings_for(mcfg))
  skills = probe.kind_accuracy(model, tokenizer, trajs, example_cfg, mcfg,
                               probe.ProbeConfig(seq_len=config.data.max_tokens))
  log.info("eval %s skills: %s", name, ", ".join(f"{k} {100 * skills[k]:.0f}%" for k in probe.KINDS if k in skills))
  with open(common.path(workdir, "eval", name, "skills.json"), "w") as f:
    json.dump(skills, f, indent=2)


def _diagnostics_table(workdir: str, tiers, task_config) -> str:
  rows = []
  for name, (_, at_once) in MODELS.items():
    for tier in tiers:
      path = os.path.join(workdir, "eval", name, f"{tier}.jsonl")
      if os.path.exists(path) and not at_once:  # a forced answer is no search to diagnose
        with open(path) as f:
          d = diagnostics.search_diagnostics([json.loads(line) for line in f], task_config)
        cells = {k: f"{100 * v:.0f}" for k, v in d.items() if not k.endswith("_chance")}
        for k in ("first_zoom_on_target", "first_zoom_on_object"):
          if k in d:
            cells[k] += f" ({100 * d[k + '_chance']:.0f})"
        rows.append({"model": name, "tier": tier, **cells})
  return report.markdown_table(rows, ["model", "tier", *diagnostics.DIAGNOSTICS]) if rows else "(no per-sample records)"


def _skills_table(workdir: str) -> str:
  rows = []
  for name in MODELS:
    path = os.path.join(workdir, "eval", name, "skills.json")
    if os.path.exists(path):
      with open(path) as f:
        d = json.load(f)
      rows.append({"model": name, **{k: f"{100 * d[k]:.0f} ({100 * d[f'prior_{k}']:.0f})"
                                     for k in probe.KINDS if k in d}})
  kinds = [k for k in probe.KINDS if any(k in r for r in rows)]  # "cell" only where a search names it
  rows = [{**{k: "" for k in kinds}, **r} for r in rows]
  return report.markdown_table(rows, ["model", *kinds]) if rows else "(not measured)"


def _model_family(config) -> str:
  """The family of the run's model: a base it starts from names its own (config.json's model_type)."""
  hf_file = run_config.hf_config_file(config.model.get("init_from") or "")
  if hf_file is None:
    return config.model.family
  with open(hf_file) as f:
    return json.load(f)["model_type"]


def run_report(config, workdir: str) -> dict:
  config = common.resolve(config)
  metrics_file = os.path.join(workdir, "metrics.json")
  if not os.path.exists(metrics_file):
    raise FileNotFoundError(f"{metrics_file} missing: run the eval stage first")
  with open(metrics_file) as f:
    metrics = json.load(f)
  rows = metrics["eval"]
  report.plot_turn_scaling(os.path.join(workdir, "turn_scaling.png"), rows,
                           train_turn_limit=metrics.get("settings", {}).get("train_turn_limit"))
  checked = claims.check_claims(rows)
  start = (f"started from the pretrained base {config.model.init_from}" if config.model.get("init_from")
           else "trained from scratch")
  family = _model_family(config)
  lines = ["# mini_o3_jax demo report", "",
           f"Synthetic visual search (digits legible only after zooming), a tiny {family} {start}: "
           "scripted cold-start SFT, then GRPO with and without over-turn masking.", "",
           "Settings: " + ", ".join(f"{k}={v}" for k, v in metrics.get("settings", {}).items()), "",
           "## Accuracy (%) by test-time turn budget", "", report.accuracy_grid(rows), "",
           "![turn scaling](turn_scaling.png)", "", "## The paper's claims in miniature", ""]
  for claim, holds, numbers in checked:
    mark = "not measured" if holds is None else ("HOLDS" if holds else "DOES NOT HOLD")
    if holds and "within noise" in numbers:
      mark = "HOLDS, BUT WITHIN NOISE"
    lines.append(f"- **{mark}** — {claim}: {numbers}")
  lines += ["", "## Diagnostics (% of test samples)", "",
            "names_target: the first thought names the question's target (the policy reads the question); "
            "first_zoom_on_target / first_zoom_on_object: the first crop of the original image is centred "
            "around the target / around any shape (the policy localises), in brackets the same for a crop of "
            "that size at a random place; digit_answer: the answer is one digit; "
            "first_call_valid: the first turn is a well-formed crop.", "",
            _diagnostics_table(workdir, config.eval.tiers, run_config.task_config(config))]
  lines += ["", "## Skills: teacher-forced next-token accuracy (%) on correct test-split trajectories", "",
            "goal: copying the target's colour and shape from the question; box_xy: the tenths digits of a crop's "
            "x0, y0 (where to look); box_rest: its other coordinate digits; cell: the grid cell named before a "
            "window-first search's first crop (where to look); read: digits read off a crop; other: the "
            "protocol's fixed wording. In brackets: the score of always writing the most frequent token (a "
            "policy that ignores the question and the image). See mini_o3_jax/pipeline/probe.py.", "", _skills_table(workdir)]
  lines += ["", "## All rows", "", report.markdown_table(rows, ["model", "tier", "max_turns", "n", "accuracy",
                                                              "mean_turns", "mean_turns_correct",
                                                              "overturn_rate", "tool_error_rate"])]
  for name in MODELS:
    pics = sorted(p for p in os.listdir(os.path.join(workdir, "eval", name))) if os.path.isdir(
        os.path.join(workdir, "eval", name)) else []
    pics = [p for p in pics if p.endswith(".png")]
    if pics:
      lines += ["", f"### Example trajectories: {name}", ""] + [f"![{p}](eval/{name}/{p})" for p in pics]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return {claim.split(":")[0]: holds for claim, holds, _ in checked}  # "Tools matter", "RL helps", ...


def run_export(config, workdir: str) -> dict:
  config, tokenizer, mcfg, mesh = common.setup(config, workdir)
  stage = next((s for s in ("rl", "sft") if sources.has_checkpoint(workdir, s)), None)
  if stage is None:
    raise FileNotFoundError("nothing to export: no rl or sft checkpoint in the work directory")
  model = _load_model(workdir, stage, config, mcfg, mesh)
  out = os.path.join(workdir, "hf_export")
  # The whole HF directory (weights, tokenizer, chat template, processor and generation configs).
  min_pixels, max_pixels = run_config.pixel_budget(config)
  export_lib.export_model(model, mcfg, tokenizer, out, min_pixels=min_pixels, max_pixels=max_pixels)
  return {"exported": stage, "path": out}
