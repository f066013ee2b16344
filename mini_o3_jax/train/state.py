"""The train state: model graph, parameters, optimizer state, step and RNG, created sharded.

Parameters live as a plain nested dict of arrays (`nnx.to_pure_dict` of the model's `nnx.Param` state):
optax, Orbax and `jax.jit` shardings all treat it as an ordinary pytree, and `nnx.merge(graphdef, params)`
rebuilds the module inside jit. The state is never materialised unsharded: shapes come from
`nnx.eval_shape`, shardings from each parameter's `logical_axes`, and the values from a jitted
initialiser with those `out_shardings`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mini_o3_jax.model.config import VLMConfig
from mini_o3_jax.model.vlm import VLM
from mini_o3_jax import sharding as sharding_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import optimizer as optimizer_lib

Params = dict[str, Any]
Rules = tuple[tuple[str, Any], ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a training step reads and writes.

  Attributes:
    graphdef: the model's static structure (`nnx.split(model)[0]`); not a pytree leaf.
    params: nested dict of parameter arrays (fp32 master weights unless the config says otherwise).
    opt_state: the optax state for `params`.
    step: int32 [] number of optimizer updates applied.
    rng: uint32 [2] raw PRNG key, split once per step (for anything stochastic in a step).
    ref_params: frozen copy of the initial params for the KL penalty, or None.
  """
  graphdef: nnx.GraphDef = dataclasses.field(metadata=dict(static=True))
  params: Params
  opt_state: optax.OptState
  step: jax.Array
  rng: jax.Array
  ref_params: Params | None = None

  def model(self) -> VLM:
    """The NNX module over the current params (works inside and outside jit)."""
    return nnx.merge(self.graphdef, self.params)

  def replace(self, **kw) -> TrainState:
    return dataclasses.replace(self, **kw)


def _is_sharding(x: Any) -> bool:
  return isinstance(x, jax.sharding.Sharding)


def abstract_model(config: VLMConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """graphdef and the abstract (ShapeDtypeStruct) Param state, without allocating anything."""
  model = nnx.eval_shape(lambda: VLM(config, rngs=nnx.Rngs(0)))
  graphdef, params, _ = nnx.split(model, nnx.Param, ...)
  return graphdef, params


def param_shardings(config: VLMConfig, mesh: Mesh, rules: Rules = sharding_lib.DEFAULT_RULES) -> Params:
  """NamedSharding per parameter (nested dict like `params`), from the logical-axis rules."""
  _, abstract = abstract_model(config)
  return nnx.to_pure_dict(sharding_lib.state_shardings(abstract, mesh, rules))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Params, shardings: Params,
                        mesh: Mesh) -> optax.OptState:
  """Shardings of `tx.init(params)`: moments follow their parameter, everything else is replicated.

  optax mirrors the params tree inside its state (Adam moments, MultiSteps accumulators, masked
  sub-trees), so an opt-state leaf whose key path ends with a parameter's key path and has that
  parameter's shape takes that parameter's sharding. Counters and empty states are replicated.
  """
  by_path = {}
  for path, s in jax.tree_util.tree_leaves_with_path(shardings, is_leaf=_is_sharding):
    by_path[optimizer_lib.path_names(path)] = s
  shapes = {optimizer_lib.path_names(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)

  def one(path, leaf):
    names = optimizer_lib.path_names(path)
    for start in range(len(names)):
      suffix = names[start:]
      if suffix in by_path and shapes[suffix] == leaf.shape:
        return by_path[suffix]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def train_state_shardings(state_like: TrainState, mesh: Mesh, param_sh: Params,
                          tx: optax.GradientTransformation) -> TrainState:
  """A TrainState of NamedShardings matching `state_like` (abstract or concrete)."""
  replicated = NamedSharding(mesh, P())
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_like.params)
  return TrainState(
      graphdef=state_like.graphdef,
      params=param_sh,
      opt_state=opt_state_shardings(tx, abstract_params, param_sh, mesh),
      step=replicated,
      rng=replicated,
      ref_params=None if state_like.ref_params is None else param_sh,
  )


def make_tx(optimizer_config: optimizer_lib.OptimizerConfig, params_like: Params) -> optax.GradientTransformation:
  """The optimizer for a model's params (see `optimizer.make_optimizer`)."""
  return optimizer_lib.make_optimizer(optimizer_config, params_like)


def create_train_state(
    config: VLMConfig,
    tx: optax.GradientTransformation | Callable[[Params], optax.GradientTransformation],
    mesh: Mesh,
    *,
    seed: int = 0,
    rules: Rules = sharding_lib.DEFAULT_RULES,
    params: Params | None = None,
    with_reference: bool = False,
) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
  """Creates a sharded TrainState on `mesh`.

  Args:
    config: the model config.
    tx: an optax transformation, or a function params -> transformation (e.g.
      `lambda p: make_tx(opt_cfg, p)`), called on the abstract params.
    mesh: the device mesh.
    seed: initialises the params (when `params` is None) and the state RNG.
    rules: logical -> mesh axis rules.
    params: pretrained params (nested dict, e.g. `nnx.to_pure_dict(nnx.state(model, nnx.Param))` of a
      model from `load_pretrained(..., mesh=mesh)`): device arrays are resharded to the rules if needed;
      host (numpy) arrays must be identical on every process, and each process places only its shards.
    with_reference: keep a frozen copy of the initial params for the KL penalty.

  Returns:
    (state, shardings, tx): the state, a TrainState of NamedShardings to pass to the steps and to
    restore checkpoints with, and the optax transformation.
  """
  graphdef, abstract = abstract_model(config)
  abstract_params = nnx.to_pure_dict(abstract)
  if callable(tx) and not isinstance(tx, optax.GradientTransformation):
    tx = tx(abstract_params)
  param_sh = nnx.to_pure_dict(sharding_lib.state_shardings(abstract, mesh, rules))
  skeleton = TrainState(graphdef, abstract_params, None, None, None,
                        abstract_params if with_reference else None)
  shardings = train_state_shardings(skeleton, mesh, param_sh, tx)

  def build(params_in: Params | None) -> TrainState:
    if params_in is None:
      model = VLM(config, rngs=nnx.Rngs(seed))
      params_in = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(
        graphdef=graphdef,
        params=params_in,
        opt_state=tx.init(params_in),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed + 1),
        # A real copy: the reference must not alias params, which the step donates.
        ref_params=jax.tree.map(jnp.copy, params_in) if with_reference else None,
    )

  if params is None:
    state = jax.jit(lambda: build(None), out_shardings=shardings)()
  else:
    params = jax.tree.map(_put_sharded, params, param_sh)
    state = jax.jit(build, in_shardings=(param_sh,), out_shardings=shardings)(params)
  return state, shardings, tx


def _put_sharded(x: Any, sharding: NamedSharding) -> jax.Array:
  """A device array -> resharded; a host array (same on every process) -> only its local shards placed."""
  if isinstance(x, jax.Array):
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def abstract_train_state(shardings: TrainState, state_or_config: TrainState | VLMConfig,
                         tx: optax.GradientTransformation | None = None) -> TrainState:
  """ShapeDtypeStructs with concrete NamedShardings: the restore target for a checkpoint.

  `state_or_config` gives the shapes: an existing state (any mesh) or a model config plus `tx`.
  """
  if isinstance(state_or_config, TrainState):
    shapes = state_or_config
  else:
    graphdef, abstract = abstract_model(state_or_config)
    params = nnx.to_pure_dict(abstract)
    shapes = TrainState(graphdef, params, jax.eval_shape(tx.init, params), jax.ShapeDtypeStruct((), jnp.int32),
                        jax.ShapeDtypeStruct((2,), jnp.uint32),
                        params if shardings.ref_params is not None else None)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def count_params(params: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- step plumbing

Metrics = dict[str, jax.Array]


def apply_gradients(state: TrainState, grads: Params, tx: optax.GradientTransformation) -> TrainState:
  """One optimizer update; advances `step` and splits the RNG (pure, jit-able)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  rng, _ = jax.random.split(state.rng)
  return state.replace(params=params, opt_state=opt_state, step=state.step + 1, rng=rng)


def accumulate_gradients(loss_fn: Callable[[Params, Any], tuple[jax.Array, Metrics]], params: Params,
                         micro_batches: Any, num_micro: int,
                         constrain: Callable[[Any], Any] = lambda x: x,
                         grad_shardings: Params | None = None) -> tuple[jax.Array, Metrics, Params]:
  """Sums loss, aux sums and gradients of `loss_fn` over micro-batches with a `jax.lax.scan`.

  `loss_fn` must already be normalised by the global count (so the sum over micro-batches is the
  global loss); aux values must be sums too. `micro_batches` has a leading [num_micro] axis on every
  leaf. Only one micro-batch's activations are alive at a time.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    (loss, aux), grads = grad_fn(params, constrain(jax.tree.map(lambda x: x[0], micro_batches)))
    return loss, aux, grads

  def body(carry, micro):
    (loss, aux), grads = grad_fn(params, constrain(micro))
    if grad_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  first = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro_batches)
  as_spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  shapes = jax.eval_shape(grad_fn, jax.tree.map(as_spec, params), first)
  (loss_s, aux_s), grads_s = shapes
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, aux_s, grads_s))
  if grad_shardings is not None:
    zeros = (zeros[0], zeros[1], jax.lax.with_sharding_constraint(zeros[2], grad_shardings))
  (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro_batches)
  return loss, aux, grads


class ShardedStep:
  """`jax.jit` of `fn(state, batch) -> (state, metrics)` with explicit shardings and a donated state.

  in_shardings: the state's (from `create_train_state`) and the batch layout (batch axis over
  data x fsdp); out_shardings: the state's again and replicated metrics. One compiled program per
  batch structure (e.g. with / without images) and shape bucket.
  """

  def __init__(self, fn: Callable[[TrainState, Any], tuple[TrainState, Metrics]], mesh: Mesh,
               state_shardings: TrainState, *, donate: bool = True):
    self.fn, self.mesh, self.state_shardings, self.donate = fn, mesh, state_shardings, donate
    self._cache: dict[Any, Any] = {}

  def jitted(self, batch: Any):
    leaves, treedef = jax.tree.flatten(batch)
    key = (treedef, tuple(np.ndim(x) for x in leaves))
    if key not in self._cache:
      self._cache[key] = jax.jit(
          self.fn,
          in_shardings=(self.state_shardings, batch_lib.batch_shardings(batch, self.mesh)),
          out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
          donate_argnums=(0,) if self.donate else ())
    return self._cache[key]

  # Traced under the mesh so that kernels XLA cannot partition (splash attention) run per shard.
  def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
    with jax.set_mesh(self.mesh):
      return self.jitted(batch)(state, batch)

  def lower(self, state: TrainState, batch: Any):
    with jax.set_mesh(self.mesh):
      return self.jitted(batch).lower(state, batch)


def timed_step(step: Callable[[TrainState, Any], tuple[TrainState, Metrics]], state: TrainState,
               batch: Any) -> tuple[TrainState, dict[str, float]]:
  """Runs a step and waits for it; adds `step_time_s` and `tokens_per_s` (real tokens / wall time).

  Fetching the metrics blocks until the step is done, so use it where metrics are logged anyway.
  """
  start = time.perf_counter()
  state, metrics = step(state, batch)
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  elapsed = time.perf_counter() - start
  metrics["step_time_s"] = elapsed
  metrics["tokens_per_s"] = metrics.get("num_tokens", 0.0) / max(elapsed, 1e-9)
  return state, metrics
