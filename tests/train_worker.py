"""Shared helpers for the training tests, and a worker run as a subprocess by them.

Modes (python tests/train_worker.py MODE ...):
  resume        SFT on a grain pipeline with Orbax checkpoints: restores the latest checkpoint (state and
                data-iterator position) if there is one, runs to --steps, prints one JSON line per step;
                with --pause_after S it prints PAUSED after step S and sleeps until killed.
  multiprocess  one of several `jax.distributed` processes on 127.0.0.1: a few sharded SFT steps on the
                global mesh, each process feeding only its own rows; process 0 writes the results.

XLA_FLAGS / JAX_PLATFORMS must be set by the caller (the device count is per process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

MICRO_VOCAB = 128


def micro_config():
  """A ~57K-parameter Qwen2.5-VL (2 text layers, 1 vision block, 4-pixel patches)."""
  from mini_o3_jax.model.config import Qwen25VLConfig, TextConfig, VisionConfig
  text = TextConfig(vocab_size=MICRO_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, mrope_section=(2, 3, 3), rope_theta=10000.0,
                    max_position_embeddings=1024, bos_token_id=None, eos_token_id=None)
  vision = VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                        patch_size=4, fullatt_block_indexes=(0,), window_size=16)
  return Qwen25VLConfig(text=text, vision=vision, tie_word_embeddings=True, image_token_id=124,
                        video_token_id=125, vision_start_token_id=126, vision_end_token_id=127)


def optimizer_config(**kw):
  from mini_o3_jax.train import optimizer as optimizer_lib
  # eps 1e-4: entries with a near-zero gradient are not blown up to +-lr by Adam, so runs that differ
  # only in reduction order (sharded vs single device) stay within a tight tolerance.
  base = dict(lr=1e-2, warmup_steps=0, total_steps=1000, end_lr_ratio=1.0, weight_decay=0.0, grad_clip_norm=1.0,
              eps=1e-4)
  base.update(kw)
  return optimizer_lib.OptimizerConfig(**base)


BATCH = dict(length_buckets=(32, 64), patch_buckets=(16, 32))


def text_only_configs():
  """Optimizer and SFT configs for text-only runs: the vision tower frozen and out of the backward."""
  from mini_o3_jax.train import sft
  return optimizer_config(freeze_vision=True, vision_prefix="visual"), sft.SFTConfig(train_vision=False)


def host_params(config, seed: int = 0):
  """Deterministic numpy params of the model's shapes (cheaper than compiling the model's RNG init).

  Norm scales are ones, everything else normal(0, 0.05): the same on every process, so a multi-process
  run and a single-process run start from identical weights.
  """
  import jax
  from flax import nnx
  from mini_o3_jax.train import optimizer as optimizer_lib
  from mini_o3_jax.train import state as state_lib
  _, abstract = state_lib.abstract_model(config)
  rng = np.random.default_rng(seed)

  def one(path, x):
    if optimizer_lib.path_names(path)[-1] == "weight":
      return np.ones(x.shape, np.float32)
    return (0.05 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, nnx.to_pure_dict(abstract))


# ------------------------------------------------------------------------------------ resume

def run_resume(args) -> None:
  import grain
  import jax
  from mini_o3_jax.train import batch as batch_lib
  from mini_o3_jax.train import checkpoint as ckpt_lib
  from mini_o3_jax.train import sft
  from mini_o3_jax import sharding
  from mini_o3_jax.train import state as state_lib

  jax.config.update("jax_default_matmul_precision", "highest")
  cfg = micro_config()
  opt, sft_config = text_only_configs()
  mesh = sharding.make_mesh((1, 2, 1), devices=jax.devices()[:2])
  state, shardings, tx = state_lib.create_train_state(
      cfg, lambda p: state_lib.make_tx(opt, p), mesh, seed=0, params=host_params(cfg))
  examples = batch_lib.random_examples(cfg, 24, seq_len=40, images_per_row=0, seed=3)
  dataset = grain.MapDataset.source(examples).seed(7).shuffle().repeat()
  iterator = iter(dataset.to_iter_dataset())
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(args.workdir, save_interval_steps=args.save_every,
                                                         max_to_keep=2))
  start = 0
  if ckpt.latest_step() is not None:
    target = state_lib.abstract_train_state(shardings, state)
    state, data_state = ckpt.restore(target)
    iterator.set_state(data_state)
    start = int(jax.device_get(state.step))
    print(json.dumps({"restored": start}), flush=True)
  step_fn = sft.make_sft_step(sft_config, tx, mesh, shardings)
  batch_config = batch_lib.BatchConfig(batch_size=4, **BATCH)
  for step in range(start, args.steps):
    rows = [next(iterator) for _ in range(batch_config.batch_size)]
    batch = batch_lib.shard_batch(batch_lib.collate_sft(rows, cfg, batch_config), mesh)
    state, metrics = step_fn(state, batch)
    print(json.dumps({"step": step + 1, "loss": float(metrics["loss"])}), flush=True)
    ckpt.maybe_save(state, iterator.get_state(), step=step + 1)
    if args.pause_after is not None and step + 1 == args.pause_after:
      print("PAUSED", flush=True)
      while True:  # the test kills us here, possibly while the last save is still being written
        time.sleep(1)
  ckpt.close()


# ------------------------------------------------------------------------------ multiprocess

def global_examples():
  cfg = micro_config()
  from mini_o3_jax.train import batch as batch_lib
  return batch_lib.random_examples(cfg, 8, seq_len=40, images_per_row=0, seed=11)


def run_sft_steps(mesh, rows, num_steps: int, checkpoint_dir: str | None = None):
  """Runs `num_steps` SFT steps on the global batch made of this process's `rows`."""
  import jax
  from mini_o3_jax.train import batch as batch_lib
  from mini_o3_jax.train import checkpoint as ckpt_lib
  from mini_o3_jax.train import distributed
  from mini_o3_jax.train import sft
  from mini_o3_jax.train import state as state_lib

  cfg = micro_config()
  opt, sft_config = text_only_configs()
  state, shardings, tx = state_lib.create_train_state(
      cfg, lambda p: state_lib.make_tx(opt, p), mesh, params=host_params(cfg))
  examples = global_examples()
  local = [examples[i] for i in rows]
  batch = batch_lib.shard_batch(batch_lib.collate_sft(local, cfg, batch_lib.BatchConfig(len(local), **BATCH)), mesh)
  step_fn = sft.make_sft_step(sft_config, tx, mesh, shardings)
  step_fn.lower(state, batch).compile()
  # Processes may finish compiling far apart; the first collective must not wait long for its peer.
  distributed.sync("compiled")
  losses = []
  for _ in range(num_steps):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  restored_equal = None
  if checkpoint_dir is not None:
    with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(checkpoint_dir)) as ckpt:
      ckpt.save(state, {"rows": len(rows)})
      ckpt.wait()
      restored, _ = ckpt.restore(state_lib.abstract_train_state(shardings, state))
    restored_equal = trees_equal(restored.params, state.params)
  return losses, state, restored_equal


def _replicated_jit(fn, tree):
  """Runs `fn` in one jit with replicated outputs (one compile, readable on every process)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = jax.tree.leaves(tree)[0].sharding.mesh
  return jax.device_get(jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))(tree))


def trees_equal(a, b) -> bool:
  import jax
  import jax.numpy as jnp
  same = _replicated_jit(lambda t: jax.tree.map(jnp.array_equal, *t), (a, b))
  return bool(all(bool(x) for x in jax.tree.leaves(same)))


def param_checksums(params) -> dict[str, float]:
  """Per-parameter sums, computed in one jit (no per-leaf gathers across processes)."""
  import jax
  import jax.numpy as jnp
  from mini_o3_jax.train import optimizer as optimizer_lib
  sums = _replicated_jit(lambda p: jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32)), p), params)
  return {"/".join(optimizer_lib.path_names(path)): float(x)
          for path, x in jax.tree_util.tree_leaves_with_path(sums)}


def run_multiprocess(args) -> None:
  import jax
  from mini_o3_jax.train import distributed
  from mini_o3_jax import sharding

  distributed.maybe_initialize(distributed.DistributedConfig(
      coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
      process_id=args.process_id, initialization_timeout=120))
  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.process_count() == args.num_processes, jax.process_count()
  distributed.sync("initialized")
  mesh = sharding.make_mesh((2, 2, 2))
  rows = distributed.host_rows(mesh, 8)
  losses, state, restored_equal = run_sft_steps(mesh, rows, args.steps,
                                                os.path.join(args.out, "ckpt") if args.checkpoint else None)
  checksums = param_checksums(state.params)
  if distributed.is_main_process():
    with open(os.path.join(args.out, "result.json"), "w") as f:
      json.dump({"losses": losses, "checksums": checksums, "rows": [int(r) for r in rows],
                 "restored_equal": restored_equal, "process_count": jax.process_count()}, f)
  distributed.sync("done")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["resume", "multiprocess"])
  parser.add_argument("--workdir")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--save_every", type=int, default=2)
  parser.add_argument("--pause_after", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--port", type=int)
  parser.add_argument("--out")
  parser.add_argument("--checkpoint", action="store_true", help="multiprocess: also save / restore with Orbax")
  args = parser.parse_args(argv)
  if args.mode == "resume":
    run_resume(args)
  else:
    run_multiprocess(args)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
