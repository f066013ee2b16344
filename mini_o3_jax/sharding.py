"""One mesh, logical axis names on every array, one table of rules from logical to mesh axes.

Mesh axes (MaxText-style): `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (Megatron-style: attention heads, MLP hidden and vocab split).
Parameters carry their logical names as `logical_axes` metadata; batches, activations and the
sampler's KV cache name theirs where they are placed (`named_sharding`). A leaf: model, sampler and
training import it, it imports none of them.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). The first rule whose mesh axes are still
# free in a given parameter wins, so a mesh axis is never used twice in one PartitionSpec.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Activations and batches.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("activation_heads", "tensor"),
    # The sampler's KV cache: k [layers, slots, kv_heads, head_dim, length], v [..., length, head_dim].
    ("cache_slots", ("data", "fsdp")),
    ("cache_kv_heads", "tensor"),
    ("cache_length", None),
    ("cache_head_dim", None),
    # Parameters.
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("merger", "fsdp"),
    ("patch", None),
    ("norm", None),
    ("table", None),  # Qwen3-VL vision position table rows
)


def make_mesh(shape: Sequence[int] = (1, -1, 1), axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of `shape` over `devices` (default: all); one entry may be -1 meaning "the rest"."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {shape} does not match axes {axes}")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one -1 in mesh shape {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot fill mesh {shape}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh {shape} needs {math.prod(shape)} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def logical_to_spec(logical_axes: Iterable[str | None] | None, rules=DEFAULT_RULES,
                    mesh: Mesh | None = None) -> P:
  """Maps a tuple of logical names to a PartitionSpec; mesh axes of size 1 are dropped."""
  if logical_axes is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    targets = tuple(a for a in targets if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
    used.update(targets)
    out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return P(*out)


def _divisible(shape, spec: P, mesh: Mesh) -> P:
  """Drops sharding on dimensions the mesh axes do not divide (e.g. a vocab of 151,936 over 3)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    size = math.prod(mesh.shape[a] for a in axes)
    out.append(entry if size and dim % size == 0 else None)
  return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every leaf of an (abstract) nnx.State, from each Variable's `logical_axes`."""

  def one(var):
    axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    spec = logical_to_spec(axes, rules, mesh)
    return NamedSharding(mesh, _divisible(value.shape, spec, mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules=DEFAULT_RULES) -> NamedSharding:
  """The NamedSharding of an array whose dimensions have `logical_axes`; with `shape`, dimensions the
  mesh axes do not divide stay replicated."""
  return NamedSharding(mesh, divisible_spec(mesh, logical_axes, shape, rules))


def divisible_spec(mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules=DEFAULT_RULES) -> P:
  """`logical_to_spec` on `mesh` (a Mesh or an AbstractMesh), without the splits `shape` does not divide."""
  spec = logical_to_spec(logical_axes, rules, mesh)
  return spec if shape is None else _divisible(shape, spec, mesh)


def batch_spec_axes(mesh: Mesh, rules=DEFAULT_RULES) -> str | tuple[str, ...] | None:
  """The PartitionSpec entry of a batch dimension on `mesh` (None when it is not split)."""
  return logical_to_spec(("batch",), rules, mesh)[0]


def batch_ways(mesh: Mesh | None, rules=DEFAULT_RULES) -> int:
  """Into how many shards a batch dimension is split on `mesh`."""
  if mesh is None:
    return 1
  axes = batch_spec_axes(mesh, rules)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Shards dimension `batch_axis` as `batch`, replicates the rest."""
  axes: list[str | None] = [None] * ndim
  axes[batch_axis] = "batch"
  return named_sharding(mesh, axes)
