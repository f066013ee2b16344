"""GRPO with over-turn masking: the RL wing.

  rollouts     sampler results -> RL examples (reward, over-turn flag, groups, mini-batches), on the host
  advantages   group-normalised outcome advantages (over-turn reward 0)
  objective    the over-turn loss mask and PPO's clipped surrogate
  config       RLConfig, the step's options (one switch for the mask: `overturn_masking`)
  step         the jitted, sharded GRPO step; behaviour log-prob recomputation; the update loop

Modules are imported explicitly (`from mini_o3_jax.rl import step`); nothing is re-exported here.
"""
