"""Where the stages get their data and their model: the synthetic demo, or real downloads and checkpoints.

Every switch defaults to the demo's behaviour, so a config that sets none of them runs exactly as before.

  config.data.source      "synthetic" (scripted cold-start) | "coldstart" (the released Mini-o3 trajectories)
  config.rl.source        "synthetic" | "visualprobe" (split `config.rl.split`, default "train")
  config.eval.benchmarks  absent: the synthetic tiers | ("visualprobe/hard", "vstar/test", "hrbench_4k/test", ...)
  config.data_dir         the folder holding the local downloads, and `config.datasets` their sub-folders
                          (coldstart, visualprobe, vstar, hrbench); an absolute sub-folder wins
  config.tokenizer.kind   "small" (the demo's BPE, trained in the work dir) | "qwen" (the real Qwen2.5 one)
  config.model.preset     absent: the demo's sizes | "qwen25vl_7b" | "qwen25vl_3b" | "tiny"
  config.model.init_from  "" (random init, or the previous stage's checkpoint in the work dir) | an HF
                          directory (`model.hf.load_pretrained`) | a Checkpointer directory (Orbax, e.g.
                          another run's `ckpt/sft`, or one written by `tools/import_hf.py`)
  config.mesh             (data, fsdp, tensor), one entry may be -1; default (1, -1, 1); when set, the
                          sampler shards its slots over it too
  config.min_pixels, config.max_pixels   every image's budget (the demo has one `view_pixels` instead)

Evaluation of benchmarks also reads `config.eval.samples_per_task` (K of Avg@K per benchmark name),
`option_seed`, `n_per_tier` (0: every question), `chunk` (questions per rollout call) and `model_name`.
"""

from __future__ import annotations

import collections.abc
import functools
import json
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np
from flax import nnx

from mini_o3_jax import run_config
from mini_o3_jax.agent import task as agent_task
from mini_o3_jax.agent.trajectory import Trajectory
from mini_o3_jax.data import benchmarks, coldstart_release, coldstart_store
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model.hf import load_pretrained
from mini_o3_jax.train import checkpoint as ckpt_lib

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
# benchmark name -> the `config.datasets` entry naming its download folder
DATASET_OF = {"visualprobe": "visualprobe", "vstar": "vstar", "hrbench_4k": "hrbench", "hrbench_8k": "hrbench"}


def is_synthetic(section) -> bool:
  return section.get("source", SYNTHETIC) == SYNTHETIC


def dataset_dir(config, name: str) -> str:
  """`config.data_dir` joined with `config.datasets[name]` (default: `name`); must exist."""
  sub = (config.get("datasets") or {}).get(name, name)
  path = os.path.join(config.get("data_dir") or "", sub)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{name} data not found at {path!r}: set --config.data_dir (and config.datasets.{name})")
  return path


# ----------------------------------------------------------------------------- model

def is_hf_dir(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def has_checkpoint(workdir: str, stage: str) -> bool:
  """Whether the work directory holds a saved step of `stage` (a resumed run skips `init_from`)."""
  d = os.path.join(workdir, "ckpt", stage)
  return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def trained_label_shade(path: str) -> float | None:
  """The label shade of the world an exported base was trained on (its training_summary.json), None when the
  directory records none (not a base of configs/pretrain_tiny.py)."""
  summary = os.path.join(path, "training_summary.json")
  if not os.path.isfile(summary):
    return None
  with open(summary) as f:
    return json.load(f).get("label_shade", 0.0)


def init_params(config, mcfg: config_lib.VLMConfig, mesh) -> Any | None:
  """Parameters from `config.model.init_from` (sharded for `mesh`), or None when it is empty."""
  path = config.model.get("init_from") or ""
  if not path:
    return None
  if is_hf_dir(path):
    log.info("init from the HF checkpoint %s", path)
    base_shade, shade = trained_label_shade(path), run_config.task_config(config).label_shade
    if base_shade is not None and base_shade != shade:
      log.warning("%s was trained on labels %g darker than their shapes; this run's world has label_shade=%g "
                  "(set --config.label_shade=%g to run on its world)", path, base_shade, shade, base_shade)
    model, _ = load_pretrained(path, mcfg.dtype, param_dtype=mcfg.param_dtype, mesh=mesh, remat=mcfg.remat,
                               attention=mcfg.attention, attention_block=mcfg.attention_block)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params, step = ckpt_lib.restore_params(path, mcfg, mesh=mesh)
  log.info("init from %s (step %d)", path, step)
  return params


# ----------------------------------------------------------------------------- data

class ReleaseTrajectories(collections.abc.Sequence):
  """The released cold-start trajectories as `Trajectory` objects, images decoded on access.

  Every row's messages are checked against the protocol when the set is opened (no image decoded);
  rows that do not parse are left out and counted in `skipped`.
  """

  def __init__(self, path: str, limit: int | None = None):
    self.release = coldstart_release.ColdStartRelease(path, skip_bad=True)
    self.index, self.skipped = [], []
    for i in range(len(self.release) if not limit else min(limit, len(self.release))):
      row_id, messages = self.release.messages(i)
      n = coldstart_release.count_image_parts(messages)
      try:
        Trajectory.from_messages(messages, [None] * n, id=row_id)
        self.index.append(i)
      except ValueError as err:
        self.skipped.append(f"{row_id}: {err}")
    if self.skipped:
      log.warning("cold-start release: %d rows do not follow the protocol and are left out; first: %s",
                  len(self.skipped), self.skipped[0])
    log.info("cold-start release %s: %d trajectories (%d bad rows skipped by the reader)", path, len(self.index),
             self.release.num_skipped)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> Trajectory:  # type: ignore[override]
    t = self.release[self.index[i]]
    return Trajectory.from_messages(t.messages, t.images, id=t.id)


COLLECTED = "collected"  # data.source: trajectories the `coldstart` stage collected with a model


def sft_trajectories(config) -> ReleaseTrajectories | list[Trajectory]:
  """The released cold-start set, or (data.source = "collected") a `coldstart` stage's output dir."""
  if config.data.get("source") == COLLECTED:
    directory = config.data.get("collected_dir")
    if not directory:
      raise ValueError('data.source="collected" needs data.collected_dir (the coldstart stage\'s output, '
                       "e.g. WORKDIR/coldstart)")
    trajs = coldstart_store.load_collected(directory)
    if not trajs:
      raise ValueError(f"no collected trajectories in {directory}")
    return trajs[:config.data.get("limit") or None]
  return ReleaseTrajectories(dataset_dir(config, "coldstart"), limit=config.data.get("limit") or None)


@functools.lru_cache(maxsize=8)
def _benchmark(name: str, split: str, data_dir: str, option_seed: int) -> benchmarks.Benchmark:
  return benchmarks.load_benchmark(name, split, data_dir, skip_bad=True, option_seed=option_seed)


def benchmark(config, entry: str, option_seed: int = 0) -> benchmarks.Benchmark:
  """'visualprobe/hard' (or 'vstar', split 'test' by default) from its download folder."""
  name, _, split = entry.partition("/")
  if name not in DATASET_OF:
    raise ValueError(f"unknown benchmark {entry!r}; expected one of {sorted(DATASET_OF)}")
  return _benchmark(name, split or "test", dataset_dir(config, DATASET_OF[name]), option_seed)


def rl_tasks(config, indices: Sequence[int]) -> list[agent_task.Task]:
  """The prompts at `indices` of the RL prompt stream over the configured benchmark split, each
  repeated group_size times.

  The stream runs through a seeded permutation of the split, re-drawn every epoch.
  """
  c = config.rl
  bench = benchmark(config, f"{c.source}/{c.get('split', 'train')}")
  n = len(bench)
  if n == 0:
    raise ValueError(f"{c.source}/{c.get('split', 'train')} has no usable rows")
  tasks = []
  for k in indices:
    epoch, i = divmod(k, n)
    order = np.random.default_rng([config.seed, epoch]).permutation(n)
    tasks += [agent_task.Task.from_record(bench[int(order[i])])] * c.group_size
  return tasks


def eval_chunks(config, entry: str, chunk: int) -> Iterator[tuple[int, list[agent_task.Task]]]:
  """(offset, tasks) of a benchmark in chunks of `chunk` questions, each repeated K times.

  K = `config.eval.samples_per_task[name]` (default 1): Avg@K is the accuracy over all rows. Chunks
  bound how many full-resolution images are held at once.
  """
  c = config.eval
  name = entry.partition("/")[0]
  bench = benchmark(config, entry, c.get("option_seed", 0))
  n = len(bench) if not c.get("n_per_tier") else min(c.n_per_tier, len(bench))
  k = int((c.get("samples_per_task") or {}).get(name, 1))
  offset = 0
  for start in range(0, n, chunk):
    tasks = [agent_task.Task.from_record(bench[i]) for i in range(start, min(n, start + chunk)) for _ in range(k)]
    yield offset, tasks
    offset += len(tasks)
