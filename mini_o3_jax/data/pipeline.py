"""grain pipelines from trajectories to training examples and batches.

trajectory (messages + images) -> chat template + image preprocessing at the pixel budget -> an example
{input_ids, loss_mask, pixel_values, image_grid_thw} -> shuffled (seeded), sharded per host, repeated,
batched by `collate` (length / patch buckets) -> a checkpointable iterator (`get_state` / `set_state`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import grain
import numpy as np

from mini_o3_jax.agent.trajectory import Trajectory
from mini_o3_jax.processing import chat
from mini_o3_jax.processing import image as image_lib


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
  """How a trajectory becomes tokens: pixel budget per image and the vision tower's geometry."""
  min_pixels: int = image_lib.DEFAULT_MIN_PIXELS
  max_pixels: int = image_lib.DEFAULT_MAX_PIXELS
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  add_default_system: bool = True
  max_tokens: int | None = None  # longer examples raise (or are dropped by `sft_dataset(drop_long=True)`)


class ExampleTooLong(ValueError):
  pass


def trajectory_example(traj: Trajectory, tokenizer, config: ExampleConfig) -> dict[str, Any]:
  """Tokenizes one trajectory; the loss mask covers exactly the assistant's turns."""
  images = [im if not isinstance(im, str) else image_lib.load_image(im) for im in traj.images]
  processed = [image_lib.preprocess_image(im, config.min_pixels, config.max_pixels, patch_size=config.patch_size,
                                          temporal_patch_size=config.temporal_patch_size,
                                          merge_size=config.merge_size) for im in images]
  grids = [g for _, g in processed]
  enc = chat.tokenize_conversation(tokenizer, traj.to_messages(), grids, config.merge_size,
                                   add_default_system=config.add_default_system)
  n = len(enc["input_ids"])
  if config.max_tokens is not None and n > config.max_tokens:
    raise ExampleTooLong(f"trajectory {traj.id!r} has {n} tokens > max_tokens={config.max_tokens}")
  return {
      "id": traj.id,
      "input_ids": enc["input_ids"],
      "loss_mask": enc["loss_mask"],
      "pixel_values": np.concatenate([pv for pv, _ in processed]).astype(np.float32),
      "image_grid_thw": np.stack(grids).astype(np.int64),
  }


def examples_dataset(trajectories: Sequence[Trajectory], tokenizer, config: ExampleConfig, *,
                     drop_long: bool = False) -> grain.MapDataset:
  """A random-access dataset of tokenized examples (tokenized lazily, on access).

  With `drop_long`, examples over `config.max_tokens` are filtered out instead of raising.
  """

  def example(t: Trajectory):
    try:
      return trajectory_example(t, tokenizer, config)
    except ExampleTooLong:
      if drop_long:
        return None
      raise

  ds = grain.MapDataset.source(list(trajectories)).map(example)
  return ds.filter(lambda e: e is not None) if drop_long else ds


def batches(dataset: grain.MapDataset, batch_size: int, collate: Callable[[Sequence[dict]], Any], *, seed: int,
            shuffle: bool = True, repeat: bool = True, process_index: int = 0, process_count: int = 1,
            drop_remainder: bool = True) -> grain.DatasetIterator:
  """A checkpointable iterator of collated batches; each host reads its own slice of the data.

  The shuffle is seeded and re-drawn every epoch; `iterator.get_state()` / `set_state()` resume it
  exactly (the state goes into the training checkpoint).
  """
  ds = dataset
  if process_count > 1:
    ds = ds[process_index::process_count]
  if shuffle:
    ds = ds.seed(seed).shuffle()
  if repeat:
    ds = ds.repeat()
  return iter(ds.to_iter_dataset().batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate))


def length_histogram(examples: Sequence[dict], edges: Sequence[int]) -> dict[int, int]:
  """How many examples fall into each length bucket (to choose buckets)."""
  lengths = np.asarray([len(e["input_ids"]) for e in examples])
  out = {}
  prev = 0
  for edge in edges:
    out[edge] = int(((lengths > prev) & (lengths <= edge)).sum())
    prev = edge
  out[-1] = int((lengths > prev).sum())
  return out
