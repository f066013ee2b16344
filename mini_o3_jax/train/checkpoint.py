"""Orbax checkpoints of the train state and the data iterator's position.

One checkpoint = one step directory holding
  state/  params, opt_state, step, rng (and ref_params when present) as sharded arrays, and
  data/   a JSON document with the data iterator's state (e.g. a grain iterator's `get_state()`).
Saves are asynchronous (the arrays are copied off the devices before `save` returns, the files are
written in the background), happen every `save_interval_steps`, keep the last `max_to_keep`, and are
atomic: Orbax writes into a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest one. Restores read into any mesh: the target's
shardings decide the layout, not the saved one (saved on 8 devices, restored on 1 or 4).

A newest checkpoint damaged after the fact (truncated arrays, a lost manifest, an emptied step
directory) does not block a resume: `restore` without a step falls back to the newest step that
restores, logs which step was skipped and why, and moves the damaged one aside to
`damaged_step_<N>` (kept for inspection, and out of the way of the step's next save).

`restore_params` / `restore_model` read a model's parameters alone (optimizer state skipped) from any
Checkpointer directory or step directory into any mesh: what training starts from, evaluation and
export read.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
from typing import Any, Callable

from etils import epath

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mini_o3_jax.model.config import VLMConfig
from mini_o3_jax.model.vlm import VLM
from mini_o3_jax import sharding as sharding_lib
from mini_o3_jax.train import state as state_lib
from mini_o3_jax.train.state import TrainState

_BYTES_KEY = "__base64_bytes__"
DAMAGED_PREFIX = "damaged_step_"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Attributes:
    directory: where step directories go (created if missing; a local path or a gs:// URL).
    save_interval_steps: `maybe_save` saves when step % interval == 0.
    max_to_keep: newest checkpoints kept (None keeps all).
    async_save: write files in a background thread.
    replica_parallel_min_bytes: a replicated array is written cooperatively by its replicas (each
      writing a slice) only when a slice is at least this big; smaller ones are written whole by one
      replica, which spares compiling an on-device slice per small array.
  """
  directory: str
  save_interval_steps: int = 1000
  max_to_keep: int | None = 3
  async_save: bool = True
  replica_parallel_min_bytes: int = 1 << 20


def _encode(data_state: Any) -> dict[str, Any]:
  """JSON-able wrapper; bytes states (grain's DataLoader iterator) become base64."""
  if isinstance(data_state, bytes):
    return {"value": {_BYTES_KEY: base64.b64encode(data_state).decode("ascii")}}
  return {"value": data_state}


def _decode(doc: Any) -> Any:
  value = (doc or {}).get("value")
  if isinstance(value, dict) and set(value) == {_BYTES_KEY}:
    return base64.b64decode(value[_BYTES_KEY])
  return value


def _type_handlers(min_slice_bytes: int) -> ocp.type_handlers.TypeHandlerRegistry:
  """Orbax's default handlers, with the jax.Array handler's replica-parallel threshold set."""
  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()), (str, th.StringHandler()),
      (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=min_slice_bytes)))


def _state_tree(state: TrainState) -> dict[str, Any]:
  tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}
  if state.ref_params is not None:
    tree["ref_params"] = state.ref_params
  return tree


class Checkpointer:
  """Saves and restores TrainStates (plus data-iterator state) with an `ocp.CheckpointManager`.

  Every process of a multi-process run must make the same calls (Orbax coordinates the writes).
  """

  def __init__(self, config: CheckpointConfig):
    self.config = config
    directory = config.directory if "://" in config.directory else os.path.abspath(config.directory)
    if config.save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {config.save_interval_steps}")
    # The interval is applied by `maybe_save` (Orbax's own policy would also save the first step).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.max_to_keep,
        create=True,
        enable_async_checkpointing=config.async_save)
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(
            type_handler_registry=_type_handlers(config.replica_parallel_min_bytes)),
        "data": ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (an interrupted save never counts), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: TrainState, data_state: Any = None, *, step: int | None = None,
           force: bool = True) -> bool:
    """Saves `state` at `step` (default: `state.step`). Returns whether a save started.

    With `force=False` only steps on the save interval are saved (see `maybe_save`). The arrays are
    copied to host memory before this returns, so the caller may donate `state` to the next step.
    """
    step = int(jax.device_get(state.step)) if step is None else int(step)
    if not force and step % self.config.save_interval_steps:
      return False
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(_state_tree(state)),
                              data=ocp.args.JsonSave(_encode(data_state)))
    return self._manager.save(step, args=args, force=True)

  def maybe_save(self, state: TrainState, data_state: Any = None, *, step: int | None = None) -> bool:
    """Saves when step % save_interval_steps == 0."""
    return self.save(state, data_state, step=step, force=False)

  def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
    """Reads a checkpoint into the layout of `target` (default step: the latest).

    Args:
      target: a TrainState whose leaves are `jax.ShapeDtypeStruct`s with concrete shardings (see
        `state.abstract_train_state`) or real arrays (their shardings are used); its mesh may differ
        from the one the checkpoint was saved on.
      step: which checkpoint.

    Returns:
      (state, data_state): the restored TrainState (graphdef from `target`) and the saved data state.
      Without `step`, the newest checkpoint that restores (see the module docstring).
    """
    if step is None:
      return self._newest_restorable(lambda s: self._restore(target, s))
    return self._restore(target, step)

  def _restore(self, target: TrainState, step: int) -> tuple[TrainState, Any]:
    def spec(x):
      sharding = getattr(x, "sharding", None)
      if sharding is None:
        raise ValueError("restore target leaves need a concrete sharding")
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    abstract = jax.tree.map(spec, _state_tree(target))
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args),
        data=ocp.args.JsonRestore()))
    tree = out["state"]
    state = TrainState(graphdef=target.graphdef, params=tree["params"], opt_state=tree["opt_state"],
                       step=tree["step"], rng=tree["rng"], ref_params=tree.get("ref_params"))
    return state, _decode(out["data"])

  def restore_params(self, target_params: Any, step: int | None = None) -> Any:
    """Only the params (e.g. an SFT checkpoint as the start and reference of RL), in `target_params`'
    layout (ShapeDtypeStructs with shardings, or arrays)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_params)}
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)))
    return out["state"]["params"]

  def _newest_restorable(self, restore: Callable[[int], Any]) -> Any:
    """`restore(step)` for the newest step where it succeeds; the newer, damaged steps are moved aside.

    When no step restores, nothing is moved and the newest step's error is raised (a target that
    matches no checkpoint, e.g. another model size, must not look like damage).
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures: list[tuple[int, Exception]] = []
    for step in steps:
      try:
        out = restore(step)
      except Exception as e:  # noqa: BLE001 - any damage: TensorStore, JSON, missing files
        failures.append((step, e))
        continue
      for bad, error in failures:
        moved = self._set_aside(bad)
        log.warning("checkpoint step %d in %s does not restore (%s: %s); resumed from step %d instead, "
                    "the damaged step is kept at %s", bad, self.directory, type(error).__name__,
                    str(error).strip().splitlines()[0][:300] if str(error).strip() else "", step, moved)
      return out
    step, error = failures[0]
    raise ValueError(f"no checkpoint in {self.directory} restores; the newest (step {step}) fails with "
                     f"{type(error).__name__}: {str(error).strip()[:500]}") from error

  def _set_aside(self, step: int) -> str:
    """Moves step directory `step` to `damaged_step_<step>[_k]` (process 0) and forgets it."""
    directory = epath.Path(self.directory)
    target = directory / f"{DAMAGED_PREFIX}{step}"
    k = 1
    while target.exists():
      target, k = directory / f"{DAMAGED_PREFIX}{step}_{k}", k + 1
    if jax.process_index() == 0:
      (directory / str(step)).rename(target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"mini_o3_set_aside_{step}")
    self._manager.reload()
    return os.fspath(target)

  def wait(self) -> None:
    """Blocks until background writes are finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------ a model's parameters

def resolve_checkpoint(path: str) -> tuple[str, int | None]:
  """A Checkpointer directory (-> its latest step) or one of its step directories -> (directory, step).

  Raises:
    FileNotFoundError: the path does not exist, or holds no complete checkpoint.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint path not found: {path}")
  if p.name.isdigit() and (p / "state").is_dir():
    return os.fspath(p.parent), int(p.name)
  if not p.is_dir() or not any(c.name.isdigit() and c.is_dir() for c in p.iterdir()):
    raise FileNotFoundError(f"no checkpoint in {path}: expected a Checkpointer directory (holding step "
                            "directories such as 0/, 100/) or one of its step directories")
  return os.fspath(p), None


def restore_params(checkpoint: str, config: VLMConfig, *, mesh=None, dtype=None) -> tuple[Any, int]:
  """The params of a checkpoint (optimizer state skipped), sharded for `mesh` -> (params, step).

  Args:
    checkpoint: a Checkpointer directory (latest step) or a step directory in one; a local or gs:// path.
    config: the model config the checkpoint was trained with (shapes).
    mesh: where to place the params (default: all devices on the fsdp axis).
    dtype: read the params in this dtype (default the config's `param_dtype`); Orbax converts on read.
  """
  directory, step = resolve_checkpoint(checkpoint)
  mesh = mesh if mesh is not None else sharding_lib.make_mesh((1, -1, 1))
  if dtype is not None:
    config = config.replace(param_dtype=jnp.dtype(dtype).name)
  _, abstract = state_lib.abstract_model(config)
  shardings = state_lib.param_shardings(config, mesh)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(abstract),
                        shardings)
  with Checkpointer(CheckpointConfig(directory, async_save=False)) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
      raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' at step {step}'} in {directory}")
    try:
      return ckpt.restore_params(target, step=step), step
    except (ValueError, KeyError) as e:
      raise ValueError(f"checkpoint {directory} step {step} does not match the model config: {e}") from e


def restore_model(checkpoint: str, config: VLMConfig, *, mesh=None, dtype=None) -> tuple[VLM, int]:
  """`restore_params` as an NNX model -> (model, step)."""
  if dtype is not None:
    config = config.replace(param_dtype=jnp.dtype(dtype).name)
  params, step = restore_params(checkpoint, config, mesh=mesh)
  graphdef, _ = state_lib.abstract_model(config)
  return nnx.merge(graphdef, params), step
