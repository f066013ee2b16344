"""Careless-user inputs (issue 18): nothing of the user's is lost, errors name what is wrong."""

import logging
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from mini_o3_jax.model import Qwen25VL, config as config_lib, hf
from mini_o3_jax.model.hf import is_previous_export, load_pretrained, save_pretrained
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import sharding
from mini_o3_jax.train import state as state_lib

sys.path.insert(0, os.path.dirname(__file__))
import train_worker as W  # noqa: E402


@pytest.fixture(scope="module")
def model():
  return Qwen25VL(config_lib.tiny(), rngs=nnx.Rngs(0))


def _tree(path):
  """{relative path: bytes} of everything under `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      full = os.path.join(root, f)
      out[os.path.relpath(full, path)] = open(full, "rb").read()
  return out


@pytest.mark.parametrize("kind", ["notes", "workdir", "file"])
def test_save_pretrained_refuses_a_directory_it_did_not_write(model, tmp_path, kind):
  target = tmp_path / "target"
  if kind == "file":
    target.write_text("my thesis")
  else:
    (target / "sub").mkdir(parents=True)
    (target / ("notes.txt" if kind == "notes" else "config.json")).write_text("keep me")
    (target / "sub" / ("draft.md" if kind == "notes" else "ckpt_7")).write_text("and me")
  before = _tree(target) if kind != "file" else target.read_bytes()
  with pytest.raises(FileExistsError, match=str(target)):
    save_pretrained(model, model.config, str(target))
  assert (_tree(target) if kind != "file" else target.read_bytes()) == before
  assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []  # no staging debris left


def test_save_pretrained_replaces_a_previous_export_and_overwrite_replaces_anything(model, tmp_path):
  out = tmp_path / "export"
  out.mkdir()  # empty: fine
  save_pretrained(model, model.config, str(out))
  assert is_previous_export(os.listdir(out))
  other = Qwen25VL(model.config, rngs=nnx.Rngs(1))
  save_pretrained(other, other.config, str(out))  # over our own export: fine
  again, _ = load_pretrained(str(out))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(again, nnx.Param)),
               nnx.to_pure_dict(nnx.state(other, nnx.Param)))
  (out / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="notes.txt"):
    save_pretrained(model, model.config, str(out))
  save_pretrained(model, model.config, str(out), overwrite=True)
  assert not (out / "notes.txt").exists() and is_previous_export(os.listdir(out))


def test_failed_save_leaves_the_old_export_intact(model, tmp_path, monkeypatch):
  out = tmp_path / "export"
  save_pretrained(model, model.config, str(out))
  before = _tree(out)
  def broken(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(hf, "save_file", broken)
  with pytest.raises(OSError, match="disk full"):
    save_pretrained(model, model.config, str(out))
  assert _tree(out) == before
  assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


# ------------------------------------------------------------------------------ damaged checkpoints

def _damage(step_dir, how):
  if how == "truncated":
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 3)
  elif how == "no_manifest":
    for r, _, fs in os.walk(step_dir):
      for f in fs:
        if f.startswith("manifest") or f == "_METADATA":
          os.remove(os.path.join(r, f))
  elif how == "empty":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


@pytest.fixture(scope="module")
def train_state():
  cfg = W.micro_config()
  mesh = sharding.make_mesh((1, -1, 1))
  state, shardings, _ = state_lib.create_train_state(
      cfg, lambda p: state_lib.make_tx(W.optimizer_config(), p), mesh, seed=0)
  return state, shardings


@pytest.mark.parametrize("how", ["truncated", "no_manifest", "empty"])
def test_resume_skips_a_damaged_newest_checkpoint(train_state, tmp_path, how, caplog):
  state, shardings = train_state
  directory = str(tmp_path / "ckpt")
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(directory, max_to_keep=3)) as ckpt:
    for step in (1, 2):
      later = state.replace(step=state.step + step,
                            params=jax.tree.map(lambda x, s=step: x + s, state.params))
      ckpt.save(later, {"index": step})
  _damage(os.path.join(directory, "2"), how)
  target = state_lib.abstract_train_state(shardings, state)
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(directory, max_to_keep=3)) as ckpt:
    with caplog.at_level(logging.WARNING):
      restored, data = ckpt.restore(target)
    assert int(restored.step) == 1 and data == {"index": 1}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b) + 1),
                 restored.params, state.params)
    assert ckpt.latest_step() == 1
    # The next save of step 2 goes through; the damaged one is kept aside.
    ckpt.save(restored.replace(step=restored.step + 1), {"index": 2})
  assert "step 2" in caplog.text and "resumed from step 1" in caplog.text
  assert os.path.isdir(os.path.join(directory, ckpt_lib.DAMAGED_PREFIX + "2"))
  assert os.path.isdir(os.path.join(directory, "2"))


def test_no_restorable_checkpoint_is_a_clear_error_and_moves_nothing(train_state, tmp_path):
  state, shardings = train_state
  directory = str(tmp_path / "ckpt")
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(directory)) as ckpt:
    ckpt.save(state, None)
  _damage(os.path.join(directory, "0"), "truncated")
  before = sorted(os.listdir(directory))
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(directory)) as ckpt:
    with pytest.raises(ValueError, match=f"no checkpoint in {directory} restores"):
      ckpt.restore(state_lib.abstract_train_state(shardings, state))
  assert sorted(os.listdir(directory)) == before
