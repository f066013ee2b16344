"""Per-device memory of a training or evaluation run on a mesh, before anything is allocated.

Exact parts: parameters, optimizer state and gradients are measured from the real objects: the model's
abstract state (`nnx.eval_shape`), `tx.init` under `jax.eval_shape`, and the shardings the code really
uses (`sharding.state_shardings`, `state.opt_state_shardings` on an `AbstractMesh` of the target
shape), so each leaf counts its own shard shape (a dimension the mesh axes do not divide stays whole,
as `sharding._divisible` does).

Estimated parts (analytic, per device, per micro-batch; `b` rows of `T` tokens on each device, `a`
bytes per activation in the compute dtype, head / MLP / vocab dimensions divided by `tensor` where the
rules shard them and the size divides):

* decoder activations kept for the backward pass, by the scanned layer body's remat policy:
  `full` keeps each layer's input (`T·D·a`), `dots` also the outputs of the weight matmuls
  (q, k, v, o, gate, up, down), `none` every intermediate including the attention scores;
* the working set of one layer in the backward pass: its intermediates recomputed (full / dots)
  plus their gradients, and the attention scores (fp32 logits and the probabilities) that exist at
  once, by the implementation `config.attention` resolves to on a TPU (`score_keys`): dense keeps
  [heads, T, T] (causal query blocks skip the keys above the diagonal, about half of it, see
  `causal_keys`), blockwise one [block, block] tile per layer, splash none in HBM (its tiles live in
  VMEM);
* the vision tower, per row of `P` padded patches: window blocks attend to 3 windows of 64 patches,
  its full-attention blocks to every patch of their image, with the same implementations;
* the output head: [b, T, vocab/tensor] logits and their gradient, or one chunk of them with
  `logits_chunk`;
* weights in use at once, whole over fsdp: one layer's (FSDP all-gathers them), the embedding and the
  output head, as compute-dtype copies, and their unsharded gradient before the reduce-scatter;
* the update's whole batch on device (every micro-batch of it): per-token ids, masks, positions and
  log-probs, and fp32 pixel values per patch, rows over data x fsdp;
* rollouts: the sampler's static KV cache (2 · layers · slots · kv_heads · head_dim · cache_len, slots
  over data x fsdp, kv heads over tensor when they divide), an appended chunk's attention over the
  whole cache, and the vision tower over one image per slot.

The peak of a training phase is params + reference + optimizer + gradients (two copies when
gradients are accumulated over micro-batches) + KV cache (the sampler keeps it between rollouts) +
the larger of the train step's and the rollout's transients. XLA's real buffer assignment adds
fusion temporaries and fragmentation; `Budget.headroom` leaves room for them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from mini_o3_jax.model.config import VLMConfig
from mini_o3_jax import sharding as sharding_lib
from mini_o3_jax.train.attention_memory import cache_score_keys, score_keys
from mini_o3_jax.train import optimizer as optimizer_lib
from mini_o3_jax.train import state as state_lib

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM per chip (one JAX device per chip) and TensorCores per chip.

  Accelerator types count TensorCores (v4-8 and v5p-8 are 4 chips: two cores per chip, one
  megacore device) or chips (v5e / v5litepod).
  """
  name: str
  hbm_gib: float
  cores_per_chip: int


# Cloud TPU system-architecture pages: v4 "32 GiB" HBM2, v5e "16 GB" HBM2, v5p "95 GB" HBM2e per chip.
CHIPS: Mapping[str, Chip] = {
    "v4": Chip("v4", 32.0, 2),
    "v5e": Chip("v5e", 16.0, 1),
    "v5p": Chip("v5p", 95.0, 2),
}


def tpu_slice(tpu_type: str) -> tuple[Chip, int]:
  """'v5p-32' -> (the v5p chip, 16 devices); 'v5litepod-16' is 'v5e-16'."""
  m = re.fullmatch(r"(v4|v5e|v5litepod|v5p)-(\d+)", tpu_type.strip().lower())
  if m is None:
    raise ValueError(f"unknown TPU type {tpu_type!r}; expected e.g. v4-8, v5e-16, v5p-32")
  chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
  cores = int(m.group(2))
  if cores % chip.cores_per_chip:
    raise ValueError(f"{tpu_type}: {cores} cores is not a whole number of {chip.name} chips")
  return chip, cores // chip.cores_per_chip


@dataclasses.dataclass(frozen=True)
class Phase:
  """What one phase (SFT, RL or evaluation) runs, as far as memory is concerned.

  Attributes:
    name: a label ("sft", "rl", "eval").
    train: whether it holds an optimizer and takes gradient steps.
    batch: rows per optimizer update (all hosts).
    grad_accum: micro-batches per update (activations are those of one micro-batch).
    seq_len: padded tokens per training row (the largest length bucket).
    patches_per_row: padded vision patches per training row (the largest patch bucket); 0 = text only.
    logits_chunk: positions per output-head evaluation (None: the whole sequence at once).
    train_vision: backpropagate into the vision tower.
    with_reference: a frozen copy of the parameters (RL with a KL penalty).
    optimizer: the optimizer, for the exact size of its state.
    rollout_slots: sampler slots (0: no sampler in this phase).
    rollout_context: the sampler's max_context (the KV cache holds it plus one chunk).
    rollout_chunk: the largest append chunk (tokens).
    rollout_patches: padded patches of one image in the sampler (the largest per-image bucket).
  """
  name: str
  train: bool = True
  batch: int = 1
  grad_accum: int = 1
  seq_len: int = 1024
  patches_per_row: int = 0
  logits_chunk: int | None = None
  train_vision: bool = True
  with_reference: bool = False
  optimizer: optimizer_lib.OptimizerConfig | None = None
  rollout_slots: int = 0
  rollout_context: int = 0
  rollout_chunk: int = 512
  rollout_patches: int = 0

  @property
  def micro_batch(self) -> int:
    return max(1, self.batch // self.grad_accum)

  @property
  def cache_len(self) -> int:
    """As `sampler.engine.EngineConfig.capacity`."""
    return -(-(self.rollout_context + self.rollout_chunk) // 8) * 8


@dataclasses.dataclass(frozen=True)
class MeshShape:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  @property
  def size(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def batch_ways(self) -> int:
    return self.data * self.fsdp

  def as_tuple(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  def abstract(self) -> AbstractMesh:
    return AbstractMesh(self.as_tuple(), sharding_lib.MESH_AXES)

  def __str__(self) -> str:
    return f"({self.data},{self.fsdp},{self.tensor})"


# ----------------------------------------------------------------------------- exact: the state

def param_count(config: VLMConfig) -> int:
  """Number of parameters, from the model's abstract state (nothing allocated)."""
  _, abstract = state_lib.abstract_model(config)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(abstract))))


def _shard_bytes(leaf: Any, sharding: jax.sharding.NamedSharding) -> int:
  return math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


@functools.lru_cache(maxsize=64)
def state_bytes(config: VLMConfig, mesh: MeshShape,
                optimizer: optimizer_lib.OptimizerConfig | None = None,
                rules=sharding_lib.DEFAULT_RULES) -> dict[str, int]:
  """Per-device bytes of the parameters, the optimizer state and one gradient tree.

  Uses the code's own shardings on an abstract mesh of `mesh`'s shape, so it equals what
  `state.create_train_state` allocates on each device (the step counter and RNG are left out: 12 bytes).
  Cached: the arguments are frozen dataclasses (treat the returned dict as read-only).
  """
  amesh = mesh.abstract()
  _, abstract = state_lib.abstract_model(config)
  params = nnx.to_pure_dict(abstract)
  shardings = nnx.to_pure_dict(sharding_lib.state_shardings(abstract, amesh, rules))
  out = {"params": sum(jax.tree.leaves(jax.tree.map(_shard_bytes, params, shardings)))}
  # Gradients have the params' shapes; the steps compute them in the params' dtype.
  out["grads"] = out["params"]
  out["opt_state"] = 0
  if optimizer is not None:
    tx = state_lib.make_tx(optimizer, params)
    opt_sh = state_lib.opt_state_shardings(tx, params, shardings, amesh)
    abstract_opt = jax.eval_shape(tx.init, params)
    out["opt_state"] = int(sum(jax.tree.leaves(jax.tree.map(_shard_bytes, abstract_opt, opt_sh))))
  return out


# ----------------------------------------------------------------------------- estimates: activations

def _split(n: int, ways: int) -> int:
  """A dimension after sharding over `ways` (unsharded when it does not divide, as the rules do)."""
  return n // ways if ways > 1 and n % ways == 0 else n


@dataclasses.dataclass(frozen=True)
class _Block:
  """Per-token sizes of one transformer block (elements; heads already split over tensor)."""
  d: int       # residual width
  f: int       # MLP hidden (local)
  q: int       # query width (local heads x head_dim)
  kv: int      # key width (local)
  heads: int   # local query heads

  def carry(self, a: int) -> int:
    return self.d * a

  def dots(self, a: int) -> int:
    """Outputs of the weight matmuls (what the `dots` policy saves): q, k, v, o, gate, up, down."""
    return a * (self.q + 2 * self.kv + 2 * self.d + 2 * self.f)

  def intermediates(self, a: int) -> int:
    """Every other per-token intermediate (norms in fp32, rotary in fp32, activations, products)."""
    return (self.dots(a) + a * (2 * self.f + 3 * self.d + 2 * self.q + self.kv)
            + 4 * (2 * self.d + self.q + self.kv))

  def scores(self, keys: int, a: int) -> int:
    """Attention logits (fp32) and probabilities (compute dtype) of one query token."""
    return int(self.heads * keys * (4 + a))


def _text_block(config: VLMConfig, tensor: int) -> _Block:
  t = config.text
  hd = t.head_dim
  return _Block(d=t.hidden_size, f=_split(t.intermediate_size, tensor),
                q=_split(t.num_attention_heads, tensor) * hd, kv=_split(t.num_key_value_heads, tensor) * hd,
                heads=_split(t.num_attention_heads, tensor))


def _vision_block(config: VLMConfig, tensor: int) -> _Block:
  v = config.vision
  heads = _split(v.num_heads, tensor)
  return _Block(d=v.hidden_size, f=_split(v.intermediate_size, tensor), q=heads * v.head_dim,
                kv=heads * v.head_dim, heads=heads)


def _saved(block: _Block, remat: str, keys: int, a: int) -> int:
  if remat == "full":
    return block.carry(a)
  if remat == "dots":
    return block.carry(a) + block.dots(a)
  return int(block.carry(a) + block.intermediates(a) + block.scores(keys, a))


def _working(block: _Block, remat: str, keys: int, a: int, backward: bool = True) -> int:
  """One layer's transient bytes per token: recomputed intermediates and their gradients."""
  one = block.intermediates(a) + block.scores(keys, a)
  if not backward:
    return one
  return one if remat == "none" else 2 * one


def _dtype_bytes(name: str) -> int:
  return jnp.dtype(name).itemsize


def activation_bytes(config: VLMConfig, phase: Phase, mesh: MeshShape) -> dict[str, int]:
  """Per-device transient bytes of one train micro-batch (empty for an evaluation phase)."""
  if not phase.train:
    return {}
  a = _dtype_bytes(config.dtype)
  b = -(-phase.micro_batch // mesh.batch_ways)  # rows per device
  tokens = b * phase.seq_len
  text = _text_block(config, mesh.tensor)
  layers = config.text.num_hidden_layers
  t = phase.seq_len
  keys = score_keys(config, t, causal=True)
  out = {
      # the residual stream kept per layer (and more, by policy), plus embeddings / final hidden
      # (Qwen3-VL: the decoder's input also carries the DeepStack features, `embed_levels` vectors a token)
      "text_saved": tokens * (layers * _saved(text, config.remat, keys, a)
                              + (2 + config.embed_levels) * text.d * a),
      "text_layer": tokens * (text.intermediates(a) * (1 if config.remat == "none" else 2)),
      "attn_scores": int(tokens * text.scores(keys, a)) * (1 if config.remat == "none" else 2),
  }
  vocab = _split(config.text.vocab_size, mesh.tensor)
  positions = t if phase.logits_chunk is None else min(phase.logits_chunk, t)
  # logits in the compute dtype, their fp32 log-softmax statistics and gradient
  out["logits"] = b * positions * vocab * (a + 2 * 4)
  out["vision"] = vision_bytes(config, b, phase.patches_per_row, mesh.tensor, backward=phase.train_vision)
  out["gathered"] = gathered_weight_bytes(config, mesh)
  # The whole update's batch on device (every micro-batch): ids, masks, 3-D positions, log-probs (4 bytes
  # each per token) and fp32 pixels plus their layout per patch.
  rows = -(-phase.batch // mesh.batch_ways)
  out["batch"] = rows * (phase.seq_len * 7 * 4 + phase.patches_per_row * (config.vision.patch_dim * 4 + 16))
  return out


def gathered_weight_bytes(config: VLMConfig, mesh: MeshShape, *, backward: bool = True) -> int:
  """Weights in use at once, whole over fsdp (split over tensor only), in the compute dtype.

  The largest of one decoder layer and one vision block, plus the embedding table and the output head:
  FSDP all-gathers each layer's weights for its matmuls, and the compute-dtype cast is a copy. In the
  backward pass, the same weights' gradient exists unsharded (fp32) before its reduce-scatter.
  """
  t, v = config.text, config.vision
  d, hd = t.hidden_size, t.head_dim
  # q and o: d x heads x head_dim each; k and v: d x kv_heads x head_dim each; gate, up, down: d x mlp.
  text_layer = 2 * d * (t.num_attention_heads + t.num_key_value_heads) * hd + 3 * d * t.intermediate_size
  vision_block = 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size
  heads = (1 if config.tie_word_embeddings else 2) * t.vocab_size * d
  n = (max(text_layer, vision_block) + heads) // mesh.tensor
  per = _dtype_bytes(config.dtype) if config.dtype != config.param_dtype else 0
  if backward and mesh.fsdp > 1:
    per += 4
  return n * per


def vision_bytes(config: VLMConfig, rows: int, patches: int, tensor: int, *, backward: bool) -> int:
  """The vision tower over `rows` rows of `patches` padded patches each (per device)."""
  if rows <= 0 or patches <= 0:
    return 0
  v = config.vision
  a = _dtype_bytes(config.dtype)
  block = _vision_block(config, tensor)
  windowed = hasattr(v, "fullatt_block_indexes")  # Qwen2.5-VL; Qwen3-VL's blocks are all full attention
  n_full = len(set(v.fullatt_block_indexes)) if windowed else v.depth
  n_window = v.depth - n_full
  window_keys = 3 * v.window_merged**2 * v.merge_unit if windowed else 0
  tokens = rows * patches
  full_keys = score_keys(config, patches, causal=False)
  work = max(_working(block, config.remat, full_keys, a, backward) if n_full else 0,
             _working(block, config.remat, window_keys, a, backward) if n_window else 0)
  saved = 0
  if backward:
    saved = (n_window * _saved(block, config.remat, window_keys, a)
             + n_full * _saved(block, config.remat, full_keys, a))
  return tokens * (saved + work + 2 * v.patch_dim * 4)


def rollout_bytes(config: VLMConfig, phase: Phase, mesh: MeshShape) -> dict[str, int]:
  """The sampler's KV cache and the larger of its encode / append transients (per device)."""
  if phase.rollout_slots <= 0:
    return {}
  a = _dtype_bytes(config.dtype)
  t = config.text
  slots = -(-phase.rollout_slots // mesh.batch_ways)
  kvh = _split(t.num_key_value_heads, mesh.tensor)
  cache = 2 * t.num_hidden_layers * slots * kvh * t.head_dim * phase.cache_len * a
  text = _text_block(config, mesh.tensor)
  chunk = slots * phase.rollout_chunk
  keys = cache_score_keys(config, phase.rollout_chunk, phase.cache_len)
  append = chunk * (_working(text, "none", keys, a, backward=False) + 2 * text.d * a)
  append += slots * _split(t.vocab_size, mesh.tensor) * 4
  encode = vision_bytes(config, slots, phase.rollout_patches, mesh.tensor, backward=False)
  return {"kv_cache": cache, "rollout_work": max(append, encode)}


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes by item, and the peak."""
  phase: str
  mesh: MeshShape
  items: dict[str, int]

  @property
  def static(self) -> int:
    return sum(self.items.get(k, 0) for k in ("params", "reference", "opt_state", "kv_cache"))

  @property
  def train_transient(self) -> int:
    keys = ("grads", "gathered", "batch", "text_saved", "text_layer", "attn_scores", "logits", "vision")
    return sum(self.items.get(k, 0) for k in keys)

  @property
  def peak(self) -> int:
    return self.static + max(self.train_transient, self.items.get("rollout_work", 0))


ITEMS = ("params", "reference", "opt_state", "grads", "gathered", "batch", "text_saved", "text_layer", "attn_scores", "logits",
         "vision", "kv_cache", "rollout_work")


def plan(config: VLMConfig, phase: Phase, mesh: MeshShape, rules=sharding_lib.DEFAULT_RULES) -> Plan:
  """Every item of `phase` on `mesh`, per device."""
  state = state_bytes(config, mesh, phase.optimizer if phase.train else None, rules)
  items = {"params": state["params"]}
  if phase.with_reference:
    items["reference"] = state["params"]
  if phase.train:
    items["opt_state"] = state["opt_state"]
    items["grads"] = state["grads"] * (2 if phase.grad_accum > 1 else 1)
  items.update(activation_bytes(config, phase, mesh))
  items.update(rollout_bytes(config, phase, mesh))
  return Plan(phase.name, mesh, items)


@dataclasses.dataclass(frozen=True)
class Budget:
  """A chip's HBM and the fraction a plan may use (the rest: XLA temporaries, fragmentation)."""
  chip: Chip
  headroom: float = 0.9

  @property
  def usable(self) -> float:
    return self.chip.hbm_gib * GiB * self.headroom

  def verdict(self, plan_: Plan) -> str:
    if plan_.peak <= self.usable:
      return "fits"
    if plan_.peak <= self.chip.hbm_gib * GiB:
      return "tight"
    return "no"


def candidate_meshes(devices: int, config: VLMConfig, max_tensor: int = 8) -> list[MeshShape]:
  """(1, devices/t, t) for t = 1, 2, 4, 8 dividing the devices and the query heads; then data x fsdp.

  Preference order: FSDP alone (least communication per byte saved), then tensor parallelism (it
  splits activations too), then a data axis (which replicates the state).
  """
  heads = config.text.num_attention_heads
  out = []
  for t in (1, 2, 4, 8):
    if t <= max_tensor and devices % t == 0 and heads % t == 0:
      out.append(MeshShape(1, devices // t, t))
  for d in (2, 4):
    if devices % d == 0 and devices // d >= 1:
      out.append(MeshShape(d, devices // d, 1))
  return out


def recommend(config: VLMConfig, phase: Phase, devices: int, budget: Budget,
              rows_per_device: Sequence[int] = (8, 4, 2, 1)) -> tuple[Plan, int] | None:
  """The first mesh (in `candidate_meshes` order) where some micro-batch fits, with its largest one.

  The micro-batch is set to `rows_per_device * batch ways` rows (grad_accum adjusted to keep the
  update's batch); returns (plan, rows per device) or None when nothing fits.
  """
  for mesh in candidate_meshes(devices, config):
    for rows in rows_per_device:
      micro = rows * mesh.batch_ways
      if phase.train and phase.batch % micro:
        continue
      p = dataclasses.replace(phase, grad_accum=max(1, phase.batch // micro)) if phase.train else phase
      if phase.rollout_slots and phase.rollout_slots % mesh.batch_ways:
        continue
      result = plan(config, p, mesh)
      if budget.verdict(result) == "fits":
        return result, rows
  return None


def gib(n: float) -> str:
  return f"{n / GiB:.1f}"


def table(plans: Sequence[tuple[str, Plan, Budget]], *, markdown: bool = True) -> str:
  """Rows: label, mesh, every item in GiB per device, peak, HBM, verdict."""
  used = [k for k in ITEMS if any(p.items.get(k) for _, p, _ in plans)]
  header = ["shape", "mesh (d,f,t)"] + used + ["peak", "HBM", "verdict"]
  rows = []
  for label, p, budget in plans:
    rows.append([label, str(p.mesh)] + [gib(p.items.get(k, 0)) for k in used]
                + [gib(p.peak), f"{budget.chip.hbm_gib:g}", budget.verdict(p)])
  if markdown:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  fmt = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
  return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def actual_state_bytes(tree: Any) -> int:
  """Bytes of a sharded pytree on its first device (for checking `state_bytes` against reality)."""
  total = 0
  device = None
  for x in jax.tree.leaves(tree):
    if not isinstance(x, jax.Array):
      continue
    shards = x.addressable_shards
    device = device or shards[0].device
    total += sum(s.data.nbytes for s in shards if s.device == device)
  return total
