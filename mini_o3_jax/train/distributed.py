"""Multi-host setup: `jax.distributed.initialize` from config or environment, and host-local data helpers.

Every process runs the same program. Each reads only its own rows of the global batch (the rows its
devices hold under the batch sharding), and only process 0 writes logs and exports. Call
`maybe_initialize` before anything touches a JAX backend (device lists, arrays, jit).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from mini_o3_jax import sharding as sharding_lib

# Environment variables read when the config leaves a field unset (also what `jax.distributed` reads
# on its own for some cluster types).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How to join a multi-process run.

  Attributes:
    coordinator_address: "host:port" of process 0's coordinator; None reads JAX_COORDINATOR_ADDRESS.
    num_processes: None reads JAX_NUM_PROCESSES.
    process_id: None reads JAX_PROCESS_ID.
    local_device_ids: devices this process owns (GPU-style setups); None reads JAX_LOCAL_DEVICE_IDS.
    auto_on_tpu: on a multi-host TPU VM slice, call `jax.distributed.initialize()` with no arguments
      (JAX discovers the topology from the TPU metadata).
    initialization_timeout: seconds to wait for all processes.
  """
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  auto_on_tpu: bool = True
  initialization_timeout: int = 300


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def resolve(config: DistributedConfig) -> DistributedConfig:
  """Fills unset fields from the environment."""
  ids = config.local_device_ids
  if ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS):
    ids = tuple(int(i) for i in os.environ[ENV_LOCAL_DEVICE_IDS].split(","))
  return dataclasses.replace(
      config,
      coordinator_address=config.coordinator_address or os.environ.get(ENV_COORDINATOR) or None,
      num_processes=config.num_processes if config.num_processes is not None else _env_int(ENV_NUM_PROCESSES),
      process_id=config.process_id if config.process_id is not None else _env_int(ENV_PROCESS_ID),
      local_device_ids=ids)


def _on_multihost_tpu() -> bool:
  """A TPU VM that is one worker of several (read from the env, without starting a backend)."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1 or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def maybe_initialize(config: DistributedConfig = DistributedConfig()) -> bool:
  """Calls `jax.distributed.initialize` when this is a multi-process run. Returns True if it did.

  Explicit settings (config or env) win; otherwise a multi-host TPU slice initialises automatically;
  otherwise this is a single-process run and nothing happens. Calling it twice is harmless.
  """
  if jax.distributed.is_initialized():
    return False
  cfg = resolve(config)
  if cfg.coordinator_address is not None:
    if cfg.num_processes is None or cfg.process_id is None:
      raise ValueError("a coordinator address needs num_processes and process_id "
                       f"(config or {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})")
    if cfg.num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id, local_device_ids=cfg.local_device_ids,
                               initialization_timeout=cfg.initialization_timeout)
  elif cfg.auto_on_tpu and _on_multihost_tpu():
    jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main_process() -> bool:
  """True on the one process that writes logs, metrics and exports."""
  return jax.process_index() == 0


def host_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
  """Indices of the global batch rows this process feeds (in the order its local data must list them).

  These are the rows the batch sharding puts on this process's devices; with the default device order
  they form one contiguous block per process.
  """
  sharding = sharding_lib.batch_sharding(mesh, 1)
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  starts = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_batch)
                   for idx in index_map.values()})
  return np.concatenate([np.arange(a, b) for a, b in starts]) if starts else np.zeros((0,), np.int64)


def host_batch_size(mesh: Mesh, global_batch: int) -> int:
  return len(host_rows(mesh, global_batch))


def global_max(values: Sequence[int]) -> list[int]:
  """Element-wise max of small host integers over all processes (identity on one process)."""
  values = [int(v) for v in values]
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
  return [int(v) for v in np.asarray(gathered).reshape(jax.process_count(), -1).max(0)]


def sync(name: str, timeout_s: int = 600) -> None:
  """Barrier across processes (no-op on one). `name` must be unique per barrier in a run.

  Uses the coordination service's barrier, which waits up to `timeout_s` (a device collective would
  fail after ~30 s on CPU if one process is still compiling); falls back to a device collective.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = getattr(jax_distributed.global_state, "client", None)
  if client is not None:
    client.wait_at_barrier(f"mini_o3_sync_{name}", timeout_s * 1000)
  else:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
