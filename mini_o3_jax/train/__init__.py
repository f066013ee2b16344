"""Training: train state, batches, SFT and GRPO steps, checkpoints, multi-host (the mesh and its
logical-axis rules are `mini_o3_jax.sharding`).

  state         TrainState (graphdef, params, opt_state, step, rng, optional reference params),
                created sharded; the jitted-step plumbing (ShardedStep, gradient accumulation)
  batch         SFTBatch / RLBatch pytrees, host collation into length / patch buckets, per-host sharding
  losses        pure loss functions (cross-entropy, GRPO advantages, clipped surrogate, over-turn mask)
  optimizer     AdamW with warmup + cosine, clipping, decay mask, vision freezing
  sft, rl       the jitted SFT and GRPO steps
  checkpoint    Orbax checkpoints of the state and the data iterator
  distributed   jax.distributed initialisation and host-local data helpers

Modules are imported explicitly (`from mini_o3_jax.train import sft`); nothing is re-exported here.
"""
