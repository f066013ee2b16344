"""The measurements behind tools/bench/data.py (its docstring says what they are); loaded after the flags parse."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import absl.flags
import grain
import jax
import numpy as np

from mini_o3_jax.agent.trajectory import read_jsonl
from mini_o3_jax.data import coldstart, loader, synthetic
from mini_o3_jax.pipeline import common
from mini_o3_jax import run_config
from mini_o3_jax import sharding as sharding_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import optimizer as opt_lib
from mini_o3_jax.train import sft as sft_lib
from mini_o3_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_config():
  """configs/demo.py's config (the model, view budget, SFT batch and buckets the demo trains with)."""
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def demo_trajectories(config, n_per_tier: int, views: bool):
  """Scripted cold-start trajectories of every tier; with `views`, images shrunk as the demo's SFT does."""
  tcfg = run_config.task_config(config)
  out = []
  for tier in synthetic.TIERS:
    for traj in coldstart.scripted_coldstart(tier, n_per_tier, split="train", task_config=tcfg):
      if views:
        traj = dataclasses.replace(traj, images=[synthetic.render_view(im, None, tcfg) for im in traj.images])
      out.append(traj)
  return out


@dataclasses.dataclass(frozen=True)
class ToExample:
  """`loader.examples_dataset`'s map as a picklable object (worker processes receive the pipeline)."""
  tokenizer: object
  config: loader.ExampleConfig

  def __call__(self, traj):
    try:
      return loader.trajectory_example(traj, self.tokenizer, self.config)
    except loader.ExampleTooLong:
      return None


def _is_example(e) -> bool:
  return e is not None


def batch_iterator(trajs, tokenizer, example_cfg, collate, batch_size: int, workers: int):
  ds = grain.MapDataset.source(list(trajs)).map(ToExample(tokenizer, example_cfg)).filter(_is_example)
  it = ds.seed(0).shuffle().repeat().to_iter_dataset().batch(batch_size, drop_remainder=True, batch_fn=collate)
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  return iter(it)


def time_batches(iterator, warmup: int, batches: int) -> tuple[float, float]:
  """(wall, CPU) seconds per batch after `warmup` batches (worker start-up excluded); CPU time is this
  process's, all threads (worker processes not included)."""
  for _ in range(warmup):
    next(iterator)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(iterator)
  return (time.perf_counter() - start) / batches, (time.process_time() - cpu) / batches


def rate(fn, n: int) -> tuple[float, float]:
  """(items per wall second, CPU seconds per item) of fn(i) over i < n."""
  start, cpu = time.perf_counter(), time.process_time()
  for i in range(n):
    fn(i)
  return n / (time.perf_counter() - start), (time.process_time() - cpu) / n


def sft_loop(config, mcfg, iterator, mesh, steps: int) -> dict:
  """The demo's SFT loop: `next(iterator)` then the jitted step, each timed.

  A step whose batch shape is new compiles: it is left out of every statistic, with its data wait.
  Returns median / fastest step seconds, mean data wait per timed step, and the parameter count.
  """
  ocfg = opt_lib.OptimizerConfig(lr=config.sft.lr, warmup_steps=1, total_steps=1000, weight_decay=0.01,
                                 grad_clip_norm=1.0)
  state, shardings, tx = state_lib.create_train_state(mcfg, lambda p: state_lib.make_tx(ocfg, p), mesh, seed=0)
  step = sft_lib.make_sft_step(sft_lib.SFTConfig(), tx, mesh, shardings, learning_rate_fn=opt_lib.make_schedule(ocfg))
  seen, step_times, waits, step_cpu, wait_cpu, compile_s = set(), [], [], [], [], 0.0
  for _ in range(steps):
    start, cpu0 = time.perf_counter(), time.process_time()
    host = next(iterator)
    fetched, cpu1 = time.perf_counter(), time.process_time()
    state, metrics = step(state, batch_lib.shard_batch(host, mesh))
    jax.block_until_ready(metrics)
    done, cpu2 = time.perf_counter(), time.process_time()
    shape = (host.inputs.input_ids.shape, np.shape(host.inputs.pixel_values))
    if shape in seen:
      step_times.append(done - fetched)
      waits.append(fetched - start)
      step_cpu.append(cpu2 - cpu1)
      wait_cpu.append(cpu1 - cpu0)
    else:
      seen.add(shape)
      compile_s = max(compile_s, done - fetched)
  if not step_times:
    raise RuntimeError("every batch had a new shape: pass more --steps")
  return dict(median=statistics.median(step_times), fastest=min(step_times), timed=len(step_times),
              wait=statistics.mean(waits), cpu=statistics.median(step_cpu), wait_cpu=statistics.mean(wait_cpu),
              compile_s=compile_s, params=state_lib.count_params(state.params))


def run(args) -> int | None:
  absl.flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  q = args.quick
  workers = [int(w) for w in (args.workers or ("0,2" if q else "0,1,2")).split(",")]
  n_per_tier = args.n_per_tier or (16 if q else 48)
  n_batches = args.batches or (3 if q else 8)
  steps = args.steps or (6 if q else 12)
  rounds = args.rounds or 2
  n_tasks = args.tasks or (4 if q else 16)

  config = demo_config()
  if args.view_pixels:
    config.view_pixels = args.view_pixels
  bsz = args.batch_size or config.sft.batch_size
  load_before = os.getloadavg()
  tmp = tempfile.mkdtemp(prefix="bench_data_")
  tokenizer = common.build_tokenizer(config, tmp)
  mcfg = run_config.model_config(config, tokenizer)
  mesh = sharding_lib.make_mesh((1, -1, 1))
  example_cfg = loader.ExampleConfig(min_pixels=config.view_pixels, max_pixels=config.view_pixels,
                                       max_tokens=config.data.max_tokens)
  per_image = max(64, config.view_pixels // 196)  # patches; the demo's buckets are (256, 768) at 64
  batch_cfg = batch_lib.BatchConfig(batch_size=bsz, length_buckets=tuple(config.sft.length_buckets),
                                    patch_buckets=(4 * per_image, 12 * per_image), pad_token_id=mcfg.text.pad_token_id)
  collate = functools.partial(batch_lib.collate_sft, model_config=mcfg, batch_config=batch_cfg)

  views = demo_trajectories(config, n_per_tier, views=True)
  jsonl = os.path.join(tmp, "coldstart.jsonl")
  coldstart.write_jsonl_with_images(jsonl, os.path.join(tmp, "images"), demo_trajectories(config, n_per_tier, False))
  on_disk = [dataclasses.replace(t, images=[os.path.join(tmp, im) for im in t.images]) for t in read_jsonl(jsonl)]

  rows = []  # (what, workers, samples/s, CPU s per sample or None)
  print(f"# {len(views)} trajectories, batch {bsz}, workers {workers}", flush=True)
  # The consumer, in the loop as `run_sft` drives it (loader.batches: no worker processes).
  loop = sft_loop(config, mcfg, loader.batches(loader.examples_dataset(views, tokenizer, example_cfg,
                                                                           drop_long=True), bsz, collate, seed=0),
                  mesh, steps)
  step_rate = bsz / loop["fastest"]
  print(f"SFT step: median {1e3 * loop['median']:.0f} ms, fastest {1e3 * loop['fastest']:.0f} ms, data wait "
        f"{1e3 * loop['wait']:.0f} ms/step, first call {loop['compile_s']:.1f} s", flush=True)
  # The producers, alone: best of `rounds` rounds of `n_batches` batches each (neighbours on a shared
  # machine only ever slow a round down).
  for source, trajs in (("in-memory views", views), ("JSONL + PNG, full resolution", on_disk)):
    for w in workers if source == "in-memory views" else sorted({0, max(workers)}):
      it = batch_iterator(trajs, tokenizer, example_cfg, collate, bsz, w)
      per_batch, cpu = min(time_batches(it, warmup=(2 if w else 1) if r == 0 else 0, batches=n_batches)
                           for r in range(rounds))
      rows.append((f"grain SFT pipeline, {source}", str(w), bsz / per_batch, None if w else cpu / bsz))
      print(rows[-1], flush=True)
  tcfg = run_config.task_config(config)
  for tier in synthetic.TIERS:
    make = lambda i, t=tier: synthetic.make_task(t, 50_000 + i, tcfg)  # noqa: E731
    rows.append((f"synthetic tasks, {tier}", "-", *max(rate(make, n_tasks) for _ in range(rounds))))
    print(rows[-1], flush=True)
  for tier in synthetic.TIERS:
    script = lambda i, t=tier: next(coldstart.scripted_coldstart(t, 1, task_config=tcfg, start=60_000 + i))  # noqa
    rows.append((f"scripted cold-start trajectories, {tier}", "-",
                 *max(rate(script, n_tasks) for _ in range(rounds))))
    print(rows[-1], flush=True)
  load_after = os.getloadavg()

  print()
  print(f"# {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} {jax.devices()[0].platform}, "
        f"grain {getattr(grain, '__version__', '?')}, load average {load_before[0]:.1f} -> {load_after[0]:.1f}; "
        f"demo model {loop['params'] / 1e6:.2f}M params, batch {bsz}, view {config.view_pixels} px, "
        f"{len(views)} trajectories")
  data_share = loop["wait_cpu"] / (loop["wait_cpu"] + loop["cpu"])
  print(f"SFT loop as `run_sft` drives it (data fetched in the main process): step median "
        f"{1e3 * loop['median']:.0f} ms, fastest {1e3 * loop['fastest']:.0f} ms, waiting for data "
        f"{1e3 * loop['wait']:.0f} ms per step ({100 * loop['wait'] / (loop['wait'] + loop['median']):.0f}% of the "
        f"loop), {loop['timed']} timed steps; CPU time per step {1e3 * loop['cpu']:.0f} ms (step) + "
        f"{1e3 * loop['wait_cpu']:.0f} ms (data): data is {100 * data_share:.0f}% of the loop's CPU work")
  print()
  print("| producer / consumer | workers | samples/s | ms per batch | producer / SFT step | CPU ms per sample |")
  print("|---|---|---|---|---|---|")
  print(f"| SFT step (jit, demo model, fastest of {loop['timed']} on pipeline batches) | - | {step_rate:.1f} "
        f"| {1e3 * loop['fastest']:.0f} | 1.00 | {1e3 * loop['cpu'] / bsz:.1f} |")
  for what, w, r, cpu in rows:
    cpu_text = "-" if cpu is None else f"{1e3 * cpu:.1f}"
    print(f"| {what} | {w} | {r:.1f} | {1e3 * bsz / r:.0f} | {r / step_rate:.2f} | {cpu_text} |")
  sys.stdout.flush()
  shutil.rmtree(tmp, ignore_errors=True)

