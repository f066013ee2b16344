"""Evaluation: scoring, turn-scaling curves, reports and trajectory viewers."""

from mini_o3_jax.eval.turn_scaling import Outcome, Row, aggregate, outcome, truncate_to_budget, turn_scaling_rows

__all__ = ["Outcome", "Row", "aggregate", "outcome", "truncate_to_budget", "turn_scaling_rows"]
