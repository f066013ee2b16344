"""Confidence intervals and noise tests for accuracies over n tasks (statsmodels), at 95%.

* one accuracy: the Wilson score interval;
* two models on independent task samples: the Agresti-Caffo interval of the difference;
* one model at two turn budgets: the budgets score the same trajectories (a trajectory cut at the
  smaller budget is a prefix of the one at the larger), so they are paired; the exact McNemar test on
  the tasks that flip between them decides whether a gain is beyond noise.
"""

from __future__ import annotations

import dataclasses

from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

CONFIDENCE = 0.95


def correct_count(accuracy: float, n: int) -> int:
  return int(round(accuracy * n))


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
  """The 95% Wilson interval of an accuracy of correct / n, as fractions."""
  low, high = proportion_confint(correct, n, alpha=1 - CONFIDENCE, method="wilson")
  p = correct / n  # the interval holds p exactly; statsmodels can miss 0 or 1 by rounding
  return min(float(low), p), max(float(high), p)


@dataclasses.dataclass(frozen=True)
class Difference:
  """accuracy(a) - accuracy(b) in points, its 95% interval, and whether 0 lies outside it."""
  points: float
  low: float
  high: float

  @property
  def beyond_noise(self) -> bool:
    return self.low > 0 or self.high < 0

  def describe(self, n_a: int, n_b: int) -> str:
    return (f"difference {self.points:+.1f} points, 95% [{self.low:+.1f}, {self.high:+.1f}] (n={n_a}/{n_b})"
            + ("" if self.beyond_noise else ", within noise"))


def independent_difference(correct_a: int, n_a: int, correct_b: int, n_b: int) -> Difference:
  """Two models on independent samples of tasks: the Agresti-Caffo interval of the difference."""
  low, high = confint_proportions_2indep(correct_a, n_a, correct_b, n_b, method="agresti-caffo",
                                         compare="diff", alpha=1 - CONFIDENCE)
  return Difference(100 * (correct_a / n_a - correct_b / n_b), 100 * float(low), 100 * float(high))


def paired_gain_pvalue(gained: int, lost: int) -> float:
  """Exact McNemar p-value of `gained` tasks right only at the larger budget vs `lost` right only at the
  smaller one."""
  return float(mcnemar([[0, lost], [gained, 0]], exact=True).pvalue)
