"""grain pipelines from trajectories to training examples and batches.

trajectory (messages + images) -> chat template + image preprocessing at the pixel budget -> an example
{input_ids, loss_mask, pixel_values, image_grid_thw} -> shuffled (seeded), sharded per host, repeated,
batched by `collate` (length / patch buckets) -> a checkpointable iterator (`get_state` / `set_state`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Callable, Sequence

import grain
import numpy as np
import PIL.Image

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
  mean: tuple[float, ...] = image_lib.OPENAI_CLIP_MEAN  # Qwen3-VL: image_lib.settings_for(model_config)
  std: tuple[float, ...] = image_lib.OPENAI_CLIP_STD
  add_default_system: bool = True
  max_tokens: int | None = None  # longer examples raise (or are dropped by `sft_dataset(drop_long=True)`)


class ExampleTooLong(ValueError):
  pass


def trajectory_example(traj: Trajectory, tokenizer, config: ExampleConfig) -> dict[str, Any]:
  """Tokenizes one trajectory; the loss mask covers exactly the assistant's turns."""
  images = [im if not isinstance(im, str) else image_lib.load_image(im) for im in traj.images]
  processed = [image_lib.preprocess_image(im, config.min_pixels, config.max_pixels, patch_size=config.patch_size,
                                          temporal_patch_size=config.temporal_patch_size,
                                          merge_size=config.merge_size, mean=config.mean, std=config.std)
               for im in images]
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

  # A Sequence (e.g. a lazily decoded release) is read on access; anything else is listed first.
  source = trajectories if isinstance(trajectories, collections.abc.Sequence) else list(trajectories)
  ds = grain.MapDataset.source(source).map(example)
  return ds.filter(lambda e: e is not None) if drop_long else ds


def example_length(traj: Trajectory, tokenizer, config: ExampleConfig) -> int:
  """`len(trajectory_example(traj)["input_ids"])` without preprocessing any pixels (grids from sizes)."""
  def resized(im) -> tuple[int, int]:
    if isinstance(im, str):
      with PIL.Image.open(im) as f:  # reads the header only
        width, height = image_lib.displayed_size(f)
    else:
      width, height = im.size
    return image_lib.smart_resize(height, width, config.patch_size * config.merge_size,
                                  config.min_pixels, config.max_pixels)

  grids = [(1, h // config.patch_size, w // config.patch_size) for h, w in map(resized, traj.images)]
  enc = chat.tokenize_conversation(tokenizer, traj.to_messages(), grids, config.merge_size,
                                   add_default_system=config.add_default_system)
  return len(enc["input_ids"])


def length_grouped_order(lengths: Sequence[int], global_batch: int, seed: int, epoch: int,
                         window_batches: int = 16) -> np.ndarray:
  """One epoch's example order in which each run of `global_batch` indices has similar lengths.

  Shuffle (seeded per epoch), sort each window of `window_batches` batches by length, cut it into
  batches, shuffle the batches. Batches then pad to a bucket near their own length instead of the
  longest example of the data set, while every example is still seen once per epoch in random
  company. The tail that does not fill a batch is dropped (it is seen in other epochs).
  """
  lengths = np.asarray(lengths)
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  window = global_batch * window_batches
  groups = []
  for start in range(0, len(order), window):
    chunk = order[start:start + window]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    groups += [chunk[i:i + global_batch] for i in range(0, len(chunk) - global_batch + 1, global_batch)]
  if not groups:
    raise ValueError(f"{len(lengths)} examples do not fill one batch of {global_batch}")
  return np.concatenate([groups[i] for i in rng.permutation(len(groups))])


class _GroupedIndices(collections.abc.Sequence):
  """Random access to `length_grouped_order` epoch after epoch, this host's rows of each batch only."""

  def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, process_index: int,
               process_count: int, epochs: int):
    self._lengths, self._batch, self._seed = np.asarray(lengths), batch_size, seed
    self._host, self._hosts = process_index, process_count
    self._per_epoch = len(length_grouped_order(lengths, batch_size * process_count, seed, 0)) // process_count
    self._epochs, self._cached = epochs, (None, None)

  def __len__(self) -> int:
    return self._per_epoch * self._epochs

  def __getitem__(self, j: int) -> int:
    epoch, local = divmod(int(j), self._per_epoch)
    if self._cached[0] != epoch:
      self._cached = (epoch, length_grouped_order(self._lengths, self._batch * self._hosts, self._seed, epoch))
    step, row = divmod(local, self._batch)
    return int(self._cached[1][(step * self._hosts + self._host) * self._batch + row])


def length_grouped_batches(dataset: grain.MapDataset, lengths: Sequence[int], batch_size: int,
                           collate: Callable[[Sequence[dict]], Any], *, seed: int, process_index: int = 0,
                           process_count: int = 1, epochs: int = 100_000) -> grain.DatasetIterator:
  """Like `batches` (shuffled, repeated, per-host, checkpointable), with length-grouped batches.

  `lengths[i]` is the token count of `dataset[i]` (see `example_length`); every host takes its own
  `batch_size` rows of each global batch.
  """
  if len(lengths) != len(dataset):
    raise ValueError(f"{len(lengths)} lengths for {len(dataset)} examples")
  order = _GroupedIndices(lengths, batch_size, seed, process_index, process_count, epochs)
  ds = grain.MapDataset.source(order).map(lambda i: dataset[i])
  return iter(ds.to_iter_dataset().batch(batch_size, drop_remainder=True, batch_fn=collate))


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
