"""Building blocks shared by the vision tower and the decoder.

Every parameter carries `logical_axes` metadata (MaxText-style logical names such as `embed`, `mlp`,
`q_heads`); `mini_o3_jax.sharding` maps those names to mesh axes with one table of rules. Modules
built with `stack=L` hold L layers' parameters with a leading `layers` axis so the layer loop is a
`jax.lax.scan` (one compiled layer body, whatever the depth).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def _stacked(shape: Sequence[int], axes: Axes, stack: int | None) -> tuple[tuple[int, ...], Axes]:
  if stack is None:
    return tuple(shape), tuple(axes)
  return (stack, *shape), ("layers", *axes)


def param(rngs: nnx.Rngs | None, shape, axes: Axes, dtype, *, init: str = "normal", std: float = 0.02,
          stack: int | None = None) -> nnx.Param:
  """A parameter with logical axis names; `init` is normal(std) | zeros | ones."""
  shape, axes = _stacked(shape, axes, stack)
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    raise ValueError(f"unknown init {init!r}")
  return nnx.Param(value.astype(dtype), logical_axes=axes)


class Linear(nnx.Module):
  """y = x @ kernel [+ bias]; kernel is [in, out] (the transpose of torch's Linear.weight)."""

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None], bias: bool,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, stack: int | None = None,
               std: float = 0.02):
    self.kernel = param(rngs, (in_features, out_features), axes, param_dtype, std=std, stack=stack)
    self.bias = param(None, (out_features,), (axes[1],), param_dtype, init="zeros", stack=stack) if bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """Qwen's RMSNorm: normalise in fp32, cast back to the input dtype, then scale."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, stack: int | None = None):
    self.weight = param(None, (dim,), ("norm",), param_dtype, init="ones", stack=stack)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, statistics in fp32 (Qwen3-VL's vision tower)."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, stack: int | None = None):
    self.weight = param(None, (dim,), ("norm",), param_dtype, init="ones", stack=stack)
    self.bias = param(None, (dim,), ("norm",), param_dtype, init="zeros", stack=stack)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]; `attend` reuses it as a tied output head."""

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               std: float = 0.02):
    self.embedding = param(rngs, (vocab_size, dim), ("vocab", "embed"), param_dtype, std=std)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


def activation(name: str):
  if name == "silu":
    return jax.nn.silu
  if name in ("gelu", "gelu_pytorch_exact"):
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh", "quick_gelu"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unsupported activation {name!r}")


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)) — Qwen2's SwiGLU (the vision tower's has biases)."""

  def __init__(self, dim: int, hidden: int, *, act: str, bias: bool, rngs: nnx.Rngs, dtype, param_dtype,
               stack: int | None = None, std: float = 0.02):
    kw = dict(bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=stack, std=std)
    self.gate_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.up_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(hidden, dim, axes=("mlp", "embed"), **kw)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class MLP(nnx.Module):
  """fc2(act(fc1(x))) with biases — Qwen3-VL's vision MLP."""

  def __init__(self, dim: int, hidden: int, *, act: str, rngs: nnx.Rngs, dtype, param_dtype,
               stack: int | None = None, std: float = 0.02):
    kw = dict(bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=stack, std=std)
    self.linear_fc1 = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.linear_fc2 = Linear(hidden, dim, axes=("mlp", "embed"), **kw)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_fc2(activation(self.act)(self.linear_fc1(x)))


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [..., seq, heads, head_dim]; cos/sin [..., seq, head_dim] (broadcast over heads). fp32 inside."""
  x32 = x.astype(jnp.float32)
  cos, sin = cos[..., None, :].astype(jnp.float32), sin[..., None, :].astype(jnp.float32)
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def remat_policy(name: str):
  """Rematerialisation policy for the scanned layer body."""
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"unknown remat policy {name!r}")


def scan_layers(layers: nnx.Module, body, carry, xs=None, *, remat: str = "none", layer_slice: slice | None = None):
  """Runs `body(layer, carry, x) -> (carry, y)` over a stacked module with `jax.lax.scan`.

  `layers` holds parameters with a leading layer axis; each step sees one layer's slice, re-merged into
  the same module class, so layer code is written as for a single layer. `layer_slice` runs a
  contiguous subset of the layers.
  """
  graphdef, state = nnx.split(layers)
  if layer_slice is not None:
    state = jax.tree.map(lambda x: x[layer_slice], state)

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x)

  policy = remat_policy(remat)
  if remat != "none":
    step = jax.checkpoint(step, policy=policy, prevent_cse=False)
  return jax.lax.scan(step, carry, (state, xs))
