"""The paper's four claims in miniature, checked on evaluation rows, each with its noise test, and its
"no cold start" ablation where that model was trained (RL straight from the base).

Rows are `metrics.json`'s (`model`, `tier`, `max_turns`, `n`, `accuracy`, `mean_turns`, ...). Differences
between models are independent samples (Agresti-Caffo intervals); gains between budgets of one model
are paired (the same trajectories: exact McNemar), `eval.statistics`.
"""

from __future__ import annotations

from mini_o3_jax.eval import statistics


def cell(rows, model, tier, budget):
  for r in rows:
    if r["model"] == model and r["tier"] == tier and r["max_turns"] == budget:
      return r
  return None


def difference(a: dict, b: dict) -> statistics.Difference:
  """accuracy(a) - accuracy(b) of two eval rows (independent task samples) with its 95% interval."""
  return statistics.independent_difference(statistics.correct_count(a["accuracy"], a["n"]), a["n"],
                                           statistics.correct_count(b["accuracy"], b["n"]), b["n"])


def _noise(a: dict | None, b: dict | None) -> str:
  if a is None or b is None:
    return ""
  return "; " + difference(a, b).describe(a["n"], b["n"])


def _turn_gain_noise(low: dict | None, high: dict | None) -> str:
  """A gain between two budgets of one model: the same trajectories, so the exact McNemar test. A
  trajectory right within the smaller budget is right within the larger, so every flip is a gain."""
  if low is None or high is None:
    return ""
  gained = statistics.correct_count(high["accuracy"], high["n"]) - statistics.correct_count(low["accuracy"], low["n"])
  p = statistics.paired_gain_pvalue(max(gained, 0), max(-gained, 0))
  return f"; {gained:+d} of {high['n']} tasks, exact McNemar p={p:.3g}" + ("" if p < 0.05 else ", within noise")


def check_claims(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
  """The paper's four claims in miniature: (claim, holds (None = not measured), the numbers)."""
  budgets = sorted({r["max_turns"] for r in rows})
  top = budgets[-1] if budgets else None
  low = 4 if 4 in budgets else (budgets[0] if budgets else None)
  out = []

  def acc(model, tier, b):
    r = cell(rows, model, tier, b)
    return None if r is None else 100 * r["accuracy"]

  sft_m, none_m = acc("sft", "medium", top), acc("no_tools", "medium", 1)
  out.append(("Tools matter: SFT with crops beats the same model answering from the downscaled image by "
              ">= 30 points (medium)", None if None in (sft_m, none_m) else sft_m - none_m >= 30,
              f"sft {sft_m} vs no_tools {none_m}" + _noise(cell(rows, "sft", "medium", top),
                                                            cell(rows, "no_tools", "medium", 1))))
  rl_h, sft_h = acc("rl", "hard", top), acc("sft", "hard", top)
  out.append(("RL helps: hard-tier accuracy after RL >= SFT + 5 points (same budget)",
              None if None in (rl_h, sft_h) else rl_h >= sft_h + 5,
              f"rl {rl_h} vs sft {sft_h} at {top} turns" + _noise(cell(rows, "rl", "hard", top),
                                                                  cell(rows, "sft", "hard", top))))
  hi = [acc("rl", "hard", b) for b in (16, 32) if b in budgets]
  at_low = acc("rl", "hard", low)
  best = max((b for b in (16, 32) if b in budgets), key=lambda b: acc("rl", "hard", b) or 0.0, default=None)
  out.append((f"Test-time turn scaling: RL hard accuracy at 16/32 turns > at {low} turns",
              None if not hi or at_low is None or None in hi else max(hi) > at_low,
              f"{low} turns {at_low}, 16/32 turns {hi}"
              + ("" if best is None else _turn_gain_noise(cell(rows, "rl", "hard", low), cell(rows, "rl", "hard", best)))))
  m, nm = cell(rows, "rl", "hard", top), cell(rows, "rl_no_overturn_mask", "hard", top)
  if m is None or nm is None:
    out.append(("Over-turn masking matters: without it, shorter trajectories and less turn scaling", None,
                "rl_no_overturn_mask not evaluated"))
  else:
    gain_m = acc("rl", "hard", top) - acc("rl", "hard", low)
    gain_nm = acc("rl_no_overturn_mask", "hard", top) - acc("rl_no_overturn_mask", "hard", low)
    holds = nm["mean_turns"] < m["mean_turns"] and gain_nm < gain_m
    out.append(("Over-turn masking matters: without it, shorter trajectories and less turn scaling", holds,
                f"mean turns {m['mean_turns']:.2f} (mask) vs {nm['mean_turns']:.2f} (no mask); "
                f"gain {low}->{top} turns {gain_m:.1f} vs {gain_nm:.1f} points; at {top} turns mask vs no mask"
                + _noise(m, nm)))
  c, nc = cell(rows, "rl", "hard", top), cell(rows, "rl_no_coldstart", "hard", top)
  if nc is not None:  # an ablation the default demo may leave out: reported only where it ran
    holds = None if c is None else (nc["mean_turns"] < c["mean_turns"] and nc["accuracy"] < c["accuracy"])
    out.append(("Cold start matters: RL straight from the base searches in fewer turns and answers worse "
                "than RL after the cold-start SFT (hard)", holds,
                f"no cold start: mean turns {nc['mean_turns']:.2f}, accuracy {100 * nc['accuracy']:.1f}"
                + ("" if c is None else f"; after SFT: {c['mean_turns']:.2f}, {100 * c['accuracy']:.1f}"
                   + _noise(c, nc))))
  return out
