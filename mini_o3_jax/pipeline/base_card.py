"""README.md of an exported base: the model card a person reads on opening the directory (or its hub page).

Written from the files beside it (training_summary.json, skills.json, skills_check.json), so it says what they
record and nothing else: what the model is, the command that reproduces it, its held-out skills, its runs.
"""

from __future__ import annotations

from typing import Any

from mini_o3_jax.eval import report

# The probe's columns a reader needs (grounding_probe.py): the greedy answer's first crop, cell and digit,
# then the teacher-forced rates with their constant-guess priors.
_GREEDY = (("on_target", "first crop holds the target"), ("cell", "names its 3 x 3 cell"),
           ("read", "answers a legible crop's digit, asked as its training asks, as `<answer>d</answer>`"),
           ("read_digit", "its first digit is the crop's, whatever the form"), ("iou50", "box IoU >= 0.5"),
           ("zoom_hit", "after the window, its zoom holds the digit at a legible size"),
           ("zoom_cell", "that zoom names the window's cell it is centred in"))
_FORCED = ("tf_cell", "prior_cell", "tf_read", "prior_read", "tf_zoom_cell", "prior_zoom_cell")

RECIPE_COMMAND = "tools/pretrain_base.sh WORKDIR --config.seed={seed}"
ONE_PROCESS_COMMAND = "python -m mini_o3_jax.main --config configs/pretrain_tiny.py --workdir WORKDIR --config.seed={seed}"


def _skills_rows(skills: dict[str, float], keys) -> list[dict[str, Any]]:
  levels = list(dict.fromkeys(k.split("/")[0] for k in skills))
  return [{"level": level, **{k: f"{100 * skills[f'{level}/{k}']:.0f} %" for k in keys if f"{level}/{k}" in skills}}
          for level in levels]


def _world(summary: dict) -> str:
  shade = summary.get("label_shade", 0.0)
  if not shade:
    return ""
  return (f" Its world's labels are drawn {100 * shade:.0f} % darker than their shapes (`label_shade={shade:g}`): a run "
          "started from it sets the same.")


def model_card(summary: dict, skills: dict[str, float], check: dict, probe_scenes: int | None) -> str:
  """The card's markdown. `probe_scenes`: held-out scenes a level behind `skills` (None: not recorded)."""
  seed = summary["seed"]
  asked = ""
  if check["questions"].get("zoom") == 2:
    asked = ("Its last run asks as the agent is asked (the agent's instructions and a question about the shape's "
             "digit), and teaches the whole direct search through the shape: the window's call, the shape's own zoom "
             "inside the window's observation, the label's legible zoom inside that, the digit of its observation, so "
             "a direct search in the demo (`data.first_crop=\"object_reflex\"`) is turns it writes already. ")
  elif check["questions"].get("zoom"):
    asked = ("Its last run asks as the agent is asked (the agent's instructions and a question about the shape's "
             "digit), and teaches the whole direct search: the window's call, the legible zoom inside the window's "
             "observation, the digit of that zoom's observation, so a direct search in the demo "
             "(`data.first_crop=\"zoom_reflex\"`) is turns it writes already. ")
  elif check["questions"].get("prompt_form") == "agent":
    asked = ("Its last run asks as the agent is asked (the agent's instructions and a question about the shape's "
             "digit; the crop returned as the observation of its call), so a search's first crop and final answer "
             "in the demo (`data.first_crop=\"cell_reflex\"`) are turns it writes already. ")
  greedy = [k for k, _ in _GREEDY if any(s.endswith("/" + k) for s in skills)]
  forced = [k for k in _FORCED if any(s.endswith("/" + k) for s in skills)]
  runs = [{"run": r["run"], "from": r.get("from_stage") or "-", "tower from": r.get("vision_from") or "-",
           "steps": r["steps"], "batch": r["batch_size"], "lr": f"{r['lr']:g}",
           "final loss": "-" if r.get("final_loss") is None else f"{r['final_loss']:.4f}",
           "wall s": "-" if r.get("wall_time_s") is None else f"{r['wall_time_s']:.0f}"} for r in summary["runs"]]
  scenes = f"{probe_scenes} held-out scenes a level" if probe_scenes else "held-out scenes"
  lines = [
      "---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: image-text-to-text",
      "tags: [mini-o3, qwen3_vl, visual-search, synthetic]", "---", "",
      "# mini_o3_jax tiny base",
      "",
      f"A {summary['parameters'] / 1e6:.2f} M-parameter Qwen3-VL (transformers' `Qwen3VLForConditionalGeneration`) "
      "pretrained by mini_o3_jax on its procedural visual-search world to ground and read before any agent data: "
      "asked where a named shape is, it is taught to name the shape's 3 x 3 cell and answer a `bbox_2d` crop of "
      "that cell's half-size window; shown a legible crop, to read the digit on it. The tables below say how well "
      f"it does. {asked}The demo's cold start, SFT and GRPO are meant to start from it. Every image (scene or crop) is shown at {summary['view_pixels']} pixels.{_world(summary)}",
      "",
      "Reproduce (fixed seed; every run resumes after a kill):",
      "",
      "```bash",
      RECIPE_COMMAND.format(seed=seed) + "   # two cores: tower phases beside decoder phases",
      ONE_PROCESS_COMMAND.format(seed=seed) + "   # the same runs, one process",
      "```",
      "",
      f"## Skills (greedy, {scenes}, the exported run's probe)",
      "",
      "Levels: few = 2-4 shapes, medium and hard = the demo's cluttered tiers with look-alikes. Columns: "
      + "; ".join(f"{k}: {what}" for k, what in _GREEDY if k in greedy) + ".",
      "",
      report.markdown_table(_skills_rows(skills, greedy), ["level", *greedy]),
      "",
      "Teacher-forced, with the constant-guess prior beside each:",
      "",
      report.markdown_table(_skills_rows(skills, forced), ["level", *forced]),
      "",
      f"`skills_check.json`: the same probe on {check['scenes']} scenes a level, read back from this directory's "
      "files alone; a copy must reproduce it (`mini_o3_jax.pipeline.grounding_probe.probe_export`).",
      "",
      f"## Training runs (exported: `{summary['exported_run']}`)",
      "",
      report.markdown_table(runs, list(runs[0])),
      "",
  ]
  return "\n".join(lines)
