"""Training batches: pytree dataclasses, host-side collation into buckets, per-host sharding.

Layout (per row images): every array has the batch on axis 0 except
the M-RoPE `positions` [3, batch, seq] (axis 1), so a batch shards over `data` x `fsdp` with each row's
images on the same device as its tokens. Sequences are right-padded to a length bucket and each row's
patches to a patch bucket, so a run compiles once per (bucket, bucket) pair actually used.

Per-token arrays are aligned with `input_ids`: position t describes token t (its loss / response mask,
its behaviour log-prob). The steps shift them to next-token targets inside jit.

Example dicts (host side, what `collate_sft` / `collate_rl` read):
  input_ids        int [T_i]
  loss_mask        int [T_i]   1 on the model's own tokens (the `tokenize_conversation` loss mask; for RL
                               the response mask: generated tokens 1, prompt / observation tokens 0)
  pixel_values     float [P_i, patch_dim]   all the row's images, in order (optional)
  image_grid_thw   int [N_i, 3]             one grid per image (optional)
  RL only:
  old_logprobs     float [T_i]  behaviour-policy log p(token t | < t), 0 where loss_mask is 0
  reward           float        the trajectory's reward
  group_id         int          the question the trajectory answers (its GRPO group)
  overturn         bool         cut off by the turn / context limit without an answer
  ref_logprobs     float [T_i]  optional reference-policy log-probs (else the step computes them)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mini_o3_jax.model.config import VLMConfig
from mini_o3_jax.model import rope
from mini_o3_jax.model.vision import VisionInputs
from mini_o3_jax.model.vlm import ModelInputs, check_token_ids
from mini_o3_jax import shapes
from mini_o3_jax import sharding as sharding_lib
from mini_o3_jax.train import distributed

Example = Mapping[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SFTBatch:
  """inputs: ModelInputs (per-row images); loss_mask int32 [batch, seq] (1 = assistant token);
  image_saliency: optional float32 [batch, patches / merge_unit], each merged image token's saliency in
  [0, 1] and -1 on padding tokens (the target of `sft.SFTConfig.objectness_weight`; None = absent);
  image_colour: optional int32 [batch, patches / merge_unit] each token's palette colour and
  image_cell: optional int32 [batch, patches / merge_unit, 2] its (row, column) in its image's merged
  grid, image_shape: optional int32 [batch, patches / merge_unit] the kind of the shape it shows (-1: none)
  and image_digit: optional int32 [batch, patches / merge_unit] the digit of the label it shows (-1: none),
  image_label: optional float32 [batch, patches / merge_unit, 3] (1, dx, dy) on a token holding the centre of a
  label too small to read, (dx, dy) in [-0.5, 0.5) where in the token it lies, 0 elsewhere, and image_centre: the
  same for the shapes' centres
  (with image_saliency, the tower's feature targets: `train.vision_targets`)."""
  inputs: ModelInputs
  loss_mask: Any
  image_saliency: Any = None
  image_colour: Any = None
  image_cell: Any = None
  image_shape: Any = None
  image_digit: Any = None
  image_label: Any = None
  image_centre: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RLBatch:
  """A batch of trajectories for one GRPO update.

  inputs: ModelInputs; response_mask int32 [batch, seq]; old_logprobs float32 [batch, seq];
  rewards float32 [batch]; group_ids int32 [batch] in [0, batch) (-1 for padding rows);
  overturn bool [batch]; ref_logprobs float32 [batch, seq] or None.
  """
  inputs: ModelInputs
  response_mask: Any
  old_logprobs: Any
  rewards: Any
  group_ids: Any
  overturn: Any
  ref_logprobs: Any = None


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  """How host batches are padded.

  Attributes:
    batch_size: rows per host (the global batch is `batch_size * process_count`); missing rows are
      filled with all-padding rows that carry no loss.
    length_buckets: allowed padded sequence lengths (ascending).
    patch_buckets: allowed padded patches per row (ascending; multiples of the merge unit, 4).
    pad_token_id: the id written at padding positions (never attended to, never a target); None = 0.
    patches_follow_length: pad patches per row to the sequence bucket when they fit in it (a multiple
      of the merge unit), so each length bucket compiles one shape instead of one per patch bucket.
      Suits data whose images are small next to their text (patches per row <= tokens per row).
  """
  batch_size: int
  length_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
  patch_buckets: tuple[int, ...] = (64, 256, 1024, 4096, 16384, 65536)
  pad_token_id: int | None = 0
  patches_follow_length: bool = False


def _grid(example: Example) -> np.ndarray:
  g = example.get("image_grid_thw")
  return np.zeros((0, 3), np.int64) if g is None else np.asarray(g, np.int64).reshape(-1, 3)


def _needs(examples: Sequence[Example]) -> tuple[int, int]:
  seq = max((len(e["input_ids"]) for e in examples), default=1)
  patches = max((int(np.prod(_grid(e), -1).sum()) for e in examples), default=0)
  return seq, patches


def build_model_inputs(config: VLMConfig, input_ids: np.ndarray, attention_mask: np.ndarray,
                       row_grids: Sequence[np.ndarray], row_pixels: Sequence[np.ndarray | None],
                       num_patches: int | None) -> ModelInputs:
  """Numpy ModelInputs for right-padded rows with per-row images (no device transfer).

  The per-row layout (tests/row_inputs.py builds it independently with jnp), kept on the host so that each process can hand
  only its own rows to `jax.make_array_from_process_local_data`.

  Args:
    input_ids, attention_mask: int [batch, seq].
    row_grids: per row int [images_r, 3].
    row_pixels: per row float [patches_r, patch_dim] or None.
    num_patches: padded patches per row, or None for a text-only batch (no vision inputs).
  """
  b = input_ids.shape[0]
  merge, vcfg = config.vision.spatial_merge_size, config.vision
  positions = np.zeros((3,) + input_ids.shape, np.int32)
  for r in range(b):
    grid = row_grids[r] if len(row_grids[r]) else None
    positions[:, r:r + 1], _ = rope.get_rope_index(input_ids[r:r + 1], grid, attention_mask[r:r + 1],
                                                   image_token_id=config.image_token_id,
                                                   spatial_merge_size=merge)
  if num_patches is None:
    return ModelInputs(input_ids.astype(np.int32), attention_mask.astype(np.int32), positions)
  pixels = np.zeros((b, num_patches, vcfg.patch_dim), np.float32)
  visions = []
  for r in range(b):
    n = int(np.prod(row_grids[r], -1).sum())
    if n:
      pv = np.asarray(row_pixels[r], np.float32)
      if pv.shape != (n, vcfg.patch_dim):
        raise ValueError(f"row {r}: pixel_values shape {pv.shape} does not match its grids ({n} patches)")
      pixels[r, :n] = pv
    visions.append(VisionInputs.build(row_grids[r], vcfg, pad_to=num_patches))
  vision = jax.tree.map(lambda *xs: np.stack(xs), *visions)
  return ModelInputs(input_ids.astype(np.int32), attention_mask.astype(np.int32), positions, pixels, vision)


def _collate_common(examples: Sequence[Example], model_config: VLMConfig, batch_config: BatchConfig,
                    seq_len: int | None, num_patches: int | None):
  """Pads ids / masks to [batch_size, seq] and builds the model inputs. Returns (inputs, fields)."""
  b = batch_config.batch_size
  if len(examples) > b:
    raise ValueError(f"{len(examples)} examples for a batch of {b}")
  need_seq, need_patches = _needs(examples)
  # Every host must pick the same buckets, else the global arrays would disagree in shape.
  need_seq, need_patches = distributed.global_max([need_seq, need_patches])
  seq = seq_len or shapes.bucket(need_seq, batch_config.length_buckets, what="sequence length")
  if seq < need_seq:
    raise ValueError(f"seq_len={seq} is shorter than the longest example ({need_seq} tokens)")
  if (num_patches is None and need_patches and batch_config.patches_follow_length and need_patches <= seq
      and seq % model_config.vision.merge_unit == 0):
    num_patches = seq
  if num_patches is None and need_patches:
    num_patches = shapes.bucket(need_patches, batch_config.patch_buckets, what="patches per row")
  if num_patches is not None and num_patches < need_patches:
    raise ValueError(f"num_patches={num_patches} < {need_patches} patches in one row")
  if num_patches is not None and num_patches % model_config.vision.merge_unit:
    raise ValueError(f"num_patches={num_patches} must be a multiple of {model_config.vision.merge_unit}")
  pad = 0 if batch_config.pad_token_id is None else batch_config.pad_token_id
  ids = np.full((b, seq), pad, np.int32)
  attn = np.zeros((b, seq), np.int32)
  grids, pixels = [], []
  for r in range(b):
    if r < len(examples):
      e = examples[r]
      n = len(e["input_ids"])
      check_token_ids(e["input_ids"], model_config.text.vocab_size, name=f"example {r}'s input_ids")
      ids[r, :n] = np.asarray(e["input_ids"], np.int32)
      attn[r, :n] = 1
      grids.append(_grid(e))
      pixels.append(e.get("pixel_values"))
    else:
      grids.append(np.zeros((0, 3), np.int64))
      pixels.append(None)
  inputs = build_model_inputs(model_config, ids, attn, grids, pixels, num_patches)

  def per_token(key: str, dtype, default=0) -> np.ndarray:
    out = np.full((b, seq), default, dtype)
    for r, e in enumerate(examples):
      if key in e and e[key] is not None:
        v = np.asarray(e[key], dtype)
        if v.shape != (len(e["input_ids"]),):
          raise ValueError(f"example {r}: {key} has shape {v.shape}, input_ids {len(e['input_ids'])}")
        out[r, :len(v)] = v
    return out

  return inputs, per_token


def collate_sft(examples: Sequence[Example], model_config: VLMConfig, batch_config: BatchConfig, *,
                seq_len: int | None = None, num_patches: int | None = None) -> SFTBatch:
  """Host-local numpy SFTBatch of `batch_config.batch_size` rows (padding rows carry no loss).

  `seq_len` / `num_patches` force a size instead of the bucket (e.g. a fixed shape for benchmarks).
  """
  inputs, per_token = _collate_common(examples, model_config, batch_config, seq_len, num_patches)
  loss_mask = per_token("loss_mask", np.int32) * inputs.attention_mask
  return SFTBatch(inputs=inputs, loss_mask=loss_mask)


def collate_rl(examples: Sequence[Example], model_config: VLMConfig, batch_config: BatchConfig, *,
               seq_len: int | None = None, num_patches: int | None = None) -> RLBatch:
  """Host-local numpy RLBatch. Group ids are renumbered 0.. in order of first appearance.

  Every group must be complete on one host: group statistics are computed over the global batch, but
  renumbering is per host, so hosts offset their ids by `host index * batch_size` to keep them apart.
  Padding rows get group id -1 (dropped from every group statistic) and no response tokens.
  """
  inputs, per_token = _collate_common(examples, model_config, batch_config, seq_len, num_patches)
  b = batch_config.batch_size
  response_mask = per_token("loss_mask", np.int32) * inputs.attention_mask
  old = per_token("old_logprobs", np.float32) * response_mask
  has_ref = [("ref_logprobs" in e and e["ref_logprobs"] is not None) for e in examples]
  if any(has_ref) and not all(has_ref):
    raise ValueError("either every example or none carries ref_logprobs")
  ref = per_token("ref_logprobs", np.float32) * response_mask if examples and all(has_ref) else None
  rewards = np.zeros((b,), np.float32)
  overturn = np.zeros((b,), bool)
  group_ids = np.full((b,), -1, np.int32)
  first_seen: dict[Any, int] = {}
  offset = distributed.process_index() * b
  for r, e in enumerate(examples):
    rewards[r] = float(e["reward"])
    overturn[r] = bool(e["overturn"])
    group_ids[r] = offset + first_seen.setdefault(e["group_id"], len(first_seen))
  return RLBatch(inputs=inputs, response_mask=response_mask, old_logprobs=old, rewards=rewards,
                 group_ids=group_ids, overturn=overturn, ref_logprobs=ref)


def example_from_rollout(result: Any, *, reward: float, group_id: Any) -> dict[str, Any]:
  """An RL example dict from a sampler rollout (`sampler.rollout.RolloutResult` or alike).

  Reads token_ids, response_mask, logprobs (behaviour log-probs aligned with the tokens),
  pixel_values (a list, one [patches, patch_dim] array per image), image_grid_thw and overturn.
  """
  pixels = list(result.pixel_values)
  example = {
      "input_ids": np.asarray(result.token_ids, np.int32),
      "loss_mask": np.asarray(result.response_mask, np.int32),
      "old_logprobs": np.asarray(result.logprobs, np.float32),
      "reward": float(reward),
      "group_id": group_id,
      "overturn": bool(result.overturn),
  }
  if pixels:
    example["pixel_values"] = np.concatenate([np.asarray(p, np.float32) for p in pixels])
    example["image_grid_thw"] = np.asarray(result.image_grid_thw, np.int64).reshape(-1, 3)
  return example


# ------------------------------------------------------------------------------------- sharding

def _batch_axis(path) -> int:
  """positions is [3, batch, seq]; everything else has the batch first."""
  last = path[-1] if path else None
  name = getattr(last, "name", getattr(last, "key", None))
  return 1 if name == "positions" else 0


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
  """NamedSharding per leaf: the batch axis over data x fsdp, the rest replicated."""
  def one(path, x):
    if np.ndim(x) == 0:
      return NamedSharding(mesh, P())
    return sharding_lib.batch_sharding(mesh, np.ndim(x), _batch_axis(path))
  return jax.tree_util.tree_map_with_path(one, batch)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch -> global sharded jax.Arrays (each process passes only its own rows)."""
  shardings = batch_shardings(batch, mesh)
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), batch, shardings)


def split_microbatches(batch: Any, k: int) -> Any:
  """[.., batch, ..] -> [k, .., batch / k, ..]: micro-batch i holds rows i, i + k, i + 2k, ...

  Strided rows (not contiguous blocks) keep every micro-batch spread over all devices: a device's
  contiguous block of rows holds rows of every residue mod k, so the split moves no data.
  """
  def one(path, x):
    if k == 1:
      return x[None]
    a = _batch_axis(path)
    n = x.shape[a]
    if n % k:
      raise ValueError(f"batch of {n} rows does not split into {k} micro-batches")
    x = x.reshape(x.shape[:a] + (n // k, k) + x.shape[a + 1:])
    return jnp.moveaxis(x, a + 1, 0)
  return jax.tree_util.tree_map_with_path(one, batch)


def constrain_batch(batch: Any, mesh: Mesh) -> Any:
  """with_sharding_constraint of every leaf to the batch layout (inside jit)."""
  return jax.lax.with_sharding_constraint(batch, batch_shardings(batch, mesh))


# ------------------------------------------------------------------------- synthetic examples

def random_examples(config: VLMConfig, n: int, *, seq_len: int, images_per_row: int = 1,
                    grid: tuple[int, int, int] = (1, 4, 4), rl: bool = False, group_size: int = 4,
                    seed: int = 0, vary_length: bool = True) -> list[dict[str, Any]]:
  """Random but well-formed multi-turn rows (for tests and benchmarks).

  Each row: text, then per image `<vision_start> image_pad * k <vision_end>` followed by an assistant-like
  span with loss mask 1, up to about `seq_len` tokens. RL rows add behaviour log-probs, rewards in
  {0, 1}, a group id per `group_size` consecutive rows and a few over-turn flags.
  """
  rng = np.random.default_rng(seed)
  vocab = config.text.vocab_size
  special = {config.image_token_id, config.vision_start_token_id, config.vision_end_token_id,
             config.video_token_id}
  text_ids = np.array([i for i in range(vocab) if i not in special])
  tokens_per_image = int(np.prod(grid)) // config.vision.merge_unit
  patch_dim = config.vision.patch_dim
  min_len = images_per_row * (tokens_per_image + 5)  # 2 text + start + pads + end + 1 answer token
  if seq_len < min_len:
    raise ValueError(f"seq_len={seq_len} too short for {images_per_row} images of {tokens_per_image} tokens")
  out = []
  for i in range(n):
    length = int(rng.integers(max(seq_len // 2, min_len), seq_len + 1)) if vary_length else seq_len
    # Answer spans share what the images leave over; the last span takes the remainder.
    budget = length - images_per_row * (tokens_per_image + 4)
    spans = [budget // max(images_per_row, 1)] * images_per_row
    ids, mask = [], []
    for k in range(images_per_row):
      ids += list(rng.choice(text_ids, 2)) + [config.vision_start_token_id]
      ids += [config.image_token_id] * tokens_per_image + [config.vision_end_token_id]
      mask += [0] * (4 + tokens_per_image)
      span = spans[k] if k < images_per_row - 1 else length - len(ids)
      ids += list(rng.choice(text_ids, span))
      mask += [1] * span
    if not images_per_row:
      ids = list(rng.choice(text_ids, length))
      mask = [0] * (length // 4) + [1] * (length - length // 4)
    ex: dict[str, Any] = {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}
    if images_per_row:
      ex["image_grid_thw"] = np.tile(np.asarray(grid, np.int64), (images_per_row, 1))
      ex["pixel_values"] = rng.normal(size=(images_per_row * int(np.prod(grid)), patch_dim)).astype(np.float32)
    if rl:
      ex["old_logprobs"] = (-rng.uniform(0.5, 6.0, size=length) * ex["loss_mask"]).astype(np.float32)
      ex["reward"] = float(rng.integers(0, 2))
      ex["group_id"] = i // group_size
      ex["overturn"] = bool(rng.random() < 0.15)
    out.append(ex)
  return out
