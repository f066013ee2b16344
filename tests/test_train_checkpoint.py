"""Sharded train-state creation, Orbax checkpoints (round trip, cross-mesh, retention, atomicity),
and resuming a killed training run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
import train_worker as W  # noqa: E402

from mini_o3_jax import sharding  # noqa: E402
from mini_o3_jax.train import checkpoint as ckpt_lib  # noqa: E402
from mini_o3_jax.train import state as state_lib  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _opt():
  return W.optimizer_config(freeze_vision=True, vision_prefix="visual", weight_decay=0.1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A state created (jit-initialised, sharded) on the 2x2x2 mesh, saved once asynchronously."""
  cfg = W.micro_config()
  mesh = sharding.make_mesh((2, 2, 2))
  state, shardings, tx = state_lib.create_train_state(
      cfg, lambda p: state_lib.make_tx(_opt(), p), mesh, seed=3, with_reference=True)
  state = state.replace(step=state.step + 7)
  directory = str(tmp_path_factory.mktemp("ckpt"))
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(directory, save_interval_steps=1, max_to_keep=2))
  assert ckpt.save(state, {"next_index": 42, "epoch": 1})
  host = jax.device_get(state)
  ckpt.wait()
  return dict(cfg=cfg, mesh=mesh, state=state, shardings=shardings, tx=tx, host=host, ckpt=ckpt,
              directory=directory)


def test_create_train_state_is_sharded_by_the_rules(saved):
  state, mesh = saved["state"], saved["mesh"]
  params = state.params
  assert params["model"]["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["model"]["layers"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert params["model"]["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
  # Each device holds only its shard.
  kernel = params["model"]["layers"]["q_proj"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (2, 16, 16)
  # Adam moments follow their parameter; the frozen vision tower has no Adam state at all.
  leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
  moments = [x for p, x in leaves if jax.tree_util.keystr(p).endswith("['q_proj']['kernel']")]
  assert len(moments) == 2 and all(m.sharding.spec == kernel.sharding.spec for m in moments)
  assert not any("visual" in jax.tree_util.keystr(p) for p, _ in leaves)
  # The reference is a copy, not an alias (the step donates params).
  ref = state.ref_params["model"]["layers"]["q_proj"]["kernel"]
  assert (ref.addressable_shards[0].data.unsafe_buffer_pointer()
          != kernel.addressable_shards[0].data.unsafe_buffer_pointer())
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(kernel))
  assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 1), (1, 2, 2)])
def test_restore_round_trip_and_onto_other_meshes(saved, shape):
  mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
  shardings = state_lib.train_state_shardings(saved["state"], mesh,
                                              state_lib.param_shardings(saved["cfg"], mesh), saved["tx"])
  target = state_lib.abstract_train_state(shardings, saved["cfg"], saved["tx"])
  restored, data_state = saved["ckpt"].restore(target)
  assert data_state == {"next_index": 42, "epoch": 1}
  assert int(restored.step) == 7
  got, want = jax.device_get(restored), saved["host"]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)
  kernel = restored.params["model"]["layers"]["q_proj"]["kernel"]
  assert kernel.sharding.mesh.shape == mesh.shape
  assert len(kernel.sharding.device_set) == int(np.prod(shape))


def test_restore_params_only_onto_one_device(saved):
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        saved["host"].params, state_lib.param_shardings(saved["cfg"], mesh))
  params = saved["ckpt"].restore_params(target)
  for x, y in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(saved["host"].params)):
    np.testing.assert_array_equal(x, y)


def test_interval_retention_and_bytes_state(saved, tmp_path):
  state = saved["state"]
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(str(tmp_path), save_interval_steps=2,
                                                       max_to_keep=2)) as ckpt:
    assert ckpt.latest_step() is None
    started = [ckpt.maybe_save(state, b"\x00grain-state", step=s) for s in range(1, 7)]
    ckpt.wait()
    assert started == [False, True, False, True, False, True]
    assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
    target = state_lib.abstract_train_state(saved["shardings"], state)
    _, data_state = ckpt.restore(target, step=4)
    assert data_state == b"\x00grain-state"


def test_interrupted_save_is_never_the_latest(saved, tmp_path):
  """Orbax commits by renaming a finished temporary directory: a half-written one is ignored."""
  import shutil
  directory = str(tmp_path / "run")
  shutil.copytree(saved["directory"], directory)
  partial = os.path.join(directory, "9.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "garbage"), "wb") as f:
    f.write(b"\x00" * 100)
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(directory)) as ckpt:
    assert ckpt.latest_step() == 7
    restored, _ = ckpt.restore(saved["state"])  # a concrete state works as the target too
    assert int(restored.step) == 7


# ------------------------------------------------------------------------------ kill and resume

def _worker_env(tmp_path):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def _losses(lines):
  out = {}
  for line in lines:
    if line.startswith("{"):
      doc = json.loads(line)
      if "step" in doc:
        out[doc["step"]] = doc["loss"]
  return out


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
  env = _worker_env(tmp_path)
  straight = subprocess.run([sys.executable, WORKER, "resume", "--workdir", str(tmp_path / "a"), "--steps", "6"],
                            env=env, capture_output=True, text=True, timeout=300)
  assert straight.returncode == 0, straight.stderr[-3000:]
  want = _losses(straight.stdout.splitlines())
  assert sorted(want) == [1, 2, 3, 4, 5, 6]

  # A second run is SIGKILLed after step 5 (its step-4 checkpoint may still be being written).
  proc = subprocess.Popen([sys.executable, WORKER, "resume", "--workdir", str(tmp_path / "b"), "--steps", "6",
                           "--pause_after", "5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  lines = []
  deadline = time.time() + 300
  for line in proc.stdout:
    lines.append(line.strip())
    if line.strip() == "PAUSED" or time.time() > deadline:
      break
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert "PAUSED" in lines, lines
  killed = _losses(lines)

  resumed = subprocess.run([sys.executable, WORKER, "resume", "--workdir", str(tmp_path / "b"), "--steps", "6"],
                           env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  out = resumed.stdout.splitlines()
  start = json.loads(out[0])["restored"]
  assert start in (2, 4), out[0]
  got = _losses(out)
  assert sorted(got) == list(range(start + 1, 7))
  for step in range(1, 6):
    assert killed[step] == want[step]
  for step, loss in got.items():  # same state, same data position, same program: identical losses
    assert loss == want[step], (step, loss, want[step])
