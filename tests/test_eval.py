"""Turn-budget truncation, scoring and the report files."""

import json

import numpy as np
import pytest
import scipy.stats

from mini_o3_jax import agent
from mini_o3_jax.data import coldstart, synthetic
from mini_o3_jax.eval import claims, diagnostics, report, statistics, turn_scaling


@pytest.fixture(scope="module")
def trajectories():
  return list(coldstart.scripted_coldstart("hard", 12))


def test_truncation_scores_unfinished_searches_as_overturn(trajectories):
  judge = agent.RuleJudge()
  for t in trajectories:
    for k in range(1, 12):
      cut = turn_scaling.truncate_to_budget(t, k)
      cut.validate()
      o = turn_scaling.outcome(cut, judge)
      if t.num_turns <= k:
        assert cut is t and o.correct and o.stop_reason == "answer"
      else:
        assert cut.num_turns == k and cut.stop_reason == "max_turns" and cut.overturn
        assert not o.correct and not o.answered
        assert len(cut.images) == 1 + sum(u.observation_index is not None for u in cut.turns)


def test_rows_are_monotone_for_a_fixed_trajectory_set(trajectories):
  rows = turn_scaling.turn_scaling_rows("scripted", "hard", trajectories, [1, 2, 4, 8, 16], agent.RuleJudge())
  acc = [r.accuracy for r in rows]
  assert acc == sorted(acc) and acc[0] == 0.0 and acc[-1] == 1.0
  turns = np.array([t.num_turns for t in trajectories])
  assert rows[2].accuracy == pytest.approx(np.mean(turns <= 4))
  assert rows[-1].mean_turns_correct == pytest.approx(turns.mean())


def test_wrong_answers_and_errors_are_counted():
  traj = agent.Trajectory(question="q", images=[np.zeros((4, 4, 3), np.uint8)], gold="3", id="x")
  traj.turns = [agent.Turn('<grounding>{"bbox_2d": [0.5, 0.5, 0.4, 0.6], "source": "original_image"}</grounding>',
                           error="degenerate"), agent.Turn("<answer>4</answer>")]
  traj.stop_reason = "answer"
  o = turn_scaling.outcome(traj, agent.RuleJudge())
  assert not o.correct and o.answered and o.tool_calls == 1 and o.tool_errors == 1
  row = turn_scaling.aggregate("m", "t", 4, [o])
  assert row.tool_error_rate == 1.0 and row.accuracy == 0.0


def test_report_files(tmp_path, trajectories):
  rows = [r.as_dict() for r in turn_scaling.turn_scaling_rows("scripted", "hard", trajectories, [1, 4, 32],
                                                              agent.RuleJudge())]
  report.write_metrics(str(tmp_path / "metrics.json"), rows, note="x")
  assert json.load(open(tmp_path / "metrics.json"))["eval"][0]["max_turns"] == 1
  written = report.plot_turn_scaling(str(tmp_path / "plot.png"), rows, train_turn_limit=6)
  assert written == [str(tmp_path / "plot.png"), str(tmp_path / "plot.pdf")]
  assert (tmp_path / "plot.png").stat().st_size > 10_000 and (tmp_path / "plot.pdf").stat().st_size > 1_000
  for r in rows:  # the band is the Wilson interval of the row's own count
    assert (r["accuracy_low"], r["accuracy_high"]) == pytest.approx(
        statistics.wilson_interval(round(r["accuracy"] * r["n"]), r["n"]))
    assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
  grid = report.accuracy_grid(rows)
  assert "| scripted | hard | 12 |" in grid
  longest = max(trajectories, key=lambda t: t.num_turns)
  assert report.render_trajectory(longest).size[0] >= 900


def test_trajectory_picture_frames_each_crop_and_marks_the_outcome():
  cfg = synthetic.SyntheticConfig(view_min_pixels=112 * 112, view_max_pixels=112 * 112)
  traj = max(coldstart.scripted_coldstart("hard", 6, split="train", task_config=cfg), key=lambda t: t.num_turns)
  task = synthetic.task_from_id(traj.id, cfg)
  crops = report._crop_regions(traj)
  assert len(crops) == traj.num_turns - 1 >= 2  # every turn but the answer crops
  img = np.asarray(report.render_trajectory(traj, target_box=task.target_box, correct=True, thumb=224))
  badge = img[4:38, 8:42].reshape(-1, 3)
  assert ((badge == (0x2c, 0xa0, 0x2c)).all(-1)).mean() > 0.4  # the green tick badge
  wrong = np.asarray(report.render_trajectory(traj, correct=False))[4:38, 8:42].reshape(-1, 3)
  assert ((wrong == (0xd6, 0x27, 0x28)).all(-1)).mean() > 0.4
  # The crop grid beside the original is as tall as it: no half-blank canvas on the right.
  right = img[60:60 + 448, 460:]
  assert (right != 255).any(-1).mean() > 0.5


def test_search_diagnostics_reads_the_first_turn_and_the_answer():
  def rec(question, first_text, first_error, action_type, answer):
    return {"question": question, "final_answer": answer,
            "turns": [{"text": first_text, "error": first_error, "action": {"type": action_type}}]}

  records = [
      rec("What is the digit written on the yellow hexagon?", "<think>I need the digit on the yellow hexagon.",
          None, "tool_call", "3"),
      rec("What number is shown on the red cross?", "<think>I need the digit on the blue cross.", None,
          "tool_call", "12"),
      rec("What number is shown on the red cross?", "<grounding>{bad", "not valid JSON", "tool_call_error", None),
      rec("What number is shown on the red cross?", "<answer>4</answer>", None, "answer", " 4 "),
  ]
  d = diagnostics.search_diagnostics(records)
  assert d == {"names_target": 0.25, "digit_answer": 0.5, "first_call_valid": 0.5}
  assert diagnostics.search_diagnostics([]) == {}


def test_no_tools_policy_opens_with_the_trained_final_turn():
  from mini_o3_jax import agent
  from mini_o3_jax.pipeline import eval_stages
  traj = agent.Trajectory(question="Which digit is printed on the cyan hexagon?", images=[], gold="1")
  assert eval_stages._answer_at_once(0, traj) == "<think>The digit on the cyan hexagon is "
  other = agent.Trajectory(question="What colour is the car?", images=[], gold="red")
  assert eval_stages._answer_at_once(0, other) == eval_stages.DIRECT_ANSWER
  traj.turns.append(agent.Turn("<think>The digit on the cyan hexagon is 3.</think>\n<answer>3</answer>"))
  assert eval_stages._answer_at_once(0, traj) is None


def _row(model, tier, max_turns, accuracy, n=20, mean_turns=2.0):
  return {"model": model, "tier": tier, "max_turns": max_turns, "n": n, "accuracy": accuracy,
          "mean_turns": mean_turns, "overturn_rate": 0.0}


def test_claims_are_checked_with_their_thresholds_and_noise():
  rows = [_row("no_tools", "medium", 1, 0.10)]
  for b, sft, rl, nm in ((4, (0.5, 0.2), 0.30, 0.30), (32, (0.6, 0.25), 0.45, 0.32)):
    rows += [_row("sft", "medium", b, sft[0]), _row("sft", "hard", b, sft[1]), _row("rl", "hard", b, rl, mean_turns=5.0),
             _row("rl_no_overturn_mask", "hard", b, nm, mean_turns=3.0)]
  checked = claims.check_claims(rows)
  assert [holds for _, holds, _ in checked] == [True, True, True, True]
  # 60% vs 10% of 20: beyond noise; 45% vs 25% of 20 passes the +5 threshold but is within noise.
  assert "within noise" not in checked[0][2] and "difference +50.0" in checked[0][2]
  assert "difference +20.0" in checked[1][2] and "within noise" in checked[1][2]
  # The interval is Agresti-Caffo's: add one success and one failure to each sample, then Wald.
  p1, p2 = (0.45 * 20 + 1) / 22, (0.25 * 20 + 1) / 22
  half = 100 * scipy.stats.norm.ppf(0.975) * ((p1 * (1 - p1) + p2 * (1 - p2)) / 22) ** 0.5
  got = claims.difference(rows[-2], rows[-3])
  assert (got.low, got.high) == pytest.approx((100 * (p1 - p2) - half, 100 * (p1 - p2) + half))
  # Turn scaling (30% -> 45% of 20 = 3 more tasks, paired): exact McNemar p = 2 / 2**3 = 0.25, within noise.
  assert "+3 of 20 tasks, exact McNemar p=0.25, within noise" in checked[2][2]
  # The mask claim carries its own noise test (45% vs 32% at 32 turns).
  assert "difference +15.0" in checked[3][2] and "within noise" in checked[3][2]
  no_rl = [r for r in rows if not r["model"].startswith("rl")]
  assert [holds for _, holds, _ in claims.check_claims(no_rl)] == [True, None, None, None]
  # The no-cold-start ablation, where it ran: fewer turns and a worse answer than RL after SFT (45% at 5 turns).
  ablation = rows + [_row("rl_no_coldstart", "hard", 32, 0.05, mean_turns=1.1)]
  claim, holds, numbers = claims.check_claims(ablation)[4]
  assert claim.startswith("Cold start matters") and holds
  assert "no cold start: mean turns 1.10, accuracy 5.0; after SFT: 5.00, 45.0" in numbers and "difference +40.0" in numbers
  longer = rows + [_row("rl_no_coldstart", "hard", 32, 0.05, mean_turns=6.0)]
  assert claims.check_claims(longer)[4][1] is False


@pytest.mark.parametrize("correct,n", [(0, 20), (5, 20), (17, 20), (120, 200)])
def test_wilson_interval_matches_its_formula(correct, n):
  z = scipy.stats.norm.ppf(0.975)
  p = correct / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  assert statistics.wilson_interval(correct, n) == pytest.approx((max(centre - half, 0.0), centre + half))


def test_paired_gain_pvalue_is_the_exact_binomial_on_flips():
  for gained, lost in ((6, 0), (5, 0), (9, 3), (0, 0)):
    flips = gained + lost
    want = 1.0 if flips == 0 else min(1.0, 2 * scipy.stats.binom.cdf(min(gained, lost), flips, 0.5))
    assert statistics.paired_gain_pvalue(gained, lost) == pytest.approx(want)
