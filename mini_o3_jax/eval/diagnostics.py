"""Why a synthetic-task policy fails: first-turn diagnostics from its per-sample evaluation records."""

from __future__ import annotations

import re

import numpy as np

from mini_o3_jax import agent
from mini_o3_jax.data import synthetic

_CUE = re.compile(r"on the ([a-z]+ [a-z]+)\?\s*$")  # the target a synthetic question names


def target_cue(question: str) -> str | None:
  """The target a synthetic question names ("yellow hexagon"), or None for other questions."""
  cue = _CUE.search(question)
  return cue.group(1) if cue else None


DIAGNOSTICS = ("names_target", "first_zoom_on_target", "first_zoom_on_object", "digit_answer", "first_call_valid")


def centre_in(box, crop) -> bool:
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  return crop[0] <= cx <= crop[2] and crop[1] <= cy <= crop[3]


def search_diagnostics(records: list[dict], task_config: synthetic.SyntheticConfig | None = None) -> dict[str, float]:
  """Why a synthetic-task policy fails, from its per-sample eval records.

  names_target: the first thought names the question's target ("... on the yellow hexagon"), i.e. the
    policy conditions on the question at all; digit_answer: the final answer is a single digit;
    first_call_valid: the first turn is a well-formed crop call. With `task_config` (the scenes are
    regenerated from the record ids): first_zoom_on_target / first_zoom_on_object: the first turn crops
    the original image around the target's centre / any shape's centre (the policy localises at all),
    and *_chance: the same for a crop of the same size at a uniformly random place (what a policy that
    sizes its crops right but does not localise scores).
  """
  if not records:
    return {}
  names, digits, valid, on_target, on_object, target_chance, object_chance = [], [], [], [], [], [], []
  for r in records:
    first = r["turns"][0] if r["turns"] else {"text": "", "error": "no turn", "action": None}
    cue = target_cue(r["question"])
    names.append(cue is not None and f"on the {cue}" in first["text"])
    digits.append(bool(re.fullmatch(r"\s*\d\s*", r.get("final_answer") or "")))
    action = first.get("action") or {}
    valid.append(first["error"] is None and action.get("type") == "tool_call")
    if task_config is not None:
      task = synthetic.task_from_id(r["id"], task_config)
      call = agent.tools.parse_action(first["text"])
      crop = call.bbox if isinstance(call, agent.tools.ToolCall) and call.source_index == 0 else None
      on_target.append(crop is not None and centre_in(task.target_box, crop))
      on_object.append(crop is not None and any(centre_in(o.box, crop) for o in task.objects))
      shifted = _shifted_boxes(crop) if crop is not None else []
      target_chance.append(np.mean([centre_in(task.target_box, b) for b in shifted]) if shifted else 0.0)
      object_chance.append(np.mean([any(centre_in(o.box, b) for o in task.objects) for b in shifted])
                           if shifted else 0.0)
  out = {"names_target": float(np.mean(names)), "digit_answer": float(np.mean(digits)),
         "first_call_valid": float(np.mean(valid))}
  if task_config is not None:
    out.update(first_zoom_on_target=float(np.mean(on_target)), first_zoom_on_object=float(np.mean(on_object)),
               first_zoom_on_target_chance=float(np.mean(target_chance)),
               first_zoom_on_object_chance=float(np.mean(object_chance)))
  return out


def _shifted_boxes(box, steps: int = 9) -> list[tuple[float, float, float, float]]:
  """`box` moved to each point of a steps x steps grid over the image (same size): where a blind crop goes."""
  x0, y0, x1, y1 = box
  w, h = min(max(x1 - x0, 0.0), 1.0), min(max(y1 - y0, 0.0), 1.0)
  return [(x, y, x + w, y + h) for x in np.linspace(0, 1 - w, steps) for y in np.linspace(0, 1 - h, steps)]
