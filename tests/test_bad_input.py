"""Careless-user inputs (issue 18): nothing of the user's is lost, errors name what is wrong."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from mini_o3_jax.data import image_sources
from mini_o3_jax.model.hf import is_previous_export, load_pretrained, save_pretrained
from mini_o3_jax.model import Qwen25VL, config as config_lib, hf
from mini_o3_jax import sharding
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    # Every array data file (OCDBT's `d/` directories), not just the biggest file: how the arrays are
    # split over files varies from run to run, and a cut in a file the restore does not need (e.g.
    # `_sharding`, which a target with shardings overrides) is no damage.
    data_files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
                  if os.path.basename(r) == "d" for f in fs]
    assert data_files, f"no array data files under {step_dir}"
    for path in data_files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
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


# ------------------------------------------------------------------------------------------------
# Re-runs in a work directory (items 4, 6, 10): a real, tiny pretrain stage through the command line.

_TINY_PRETRAIN = [
    "--config.xla_flags=--xla_backend_optimization_level=0",
    "--config.pretrain.batch_size=2", "--config.pretrain.curriculum=0:single=1",
    "--config.pretrain.questions.locate=1", "--config.pretrain.questions.name=0",
    "--config.pretrain.questions.read=0", "--config.pretrain.length_buckets=(128,)",
    "--config.pretrain.probe_levels=('single',)", "--config.pretrain.probe_scenes=2",
    "--config.pretrain.log_every=1", "--config.pretrain.checkpoint_every=1", "--config.pretrain.eval_every=100",
    "--config.pretrain.from_stage=",  # the pretrain stage alone, from a fresh init (not the tower stage's)
    "--config.model.vision_depth=1", "--config.model.vision_hidden_size=64",  # the demo's tower compiles faster
    "--config.model.vision_intermediate_size=128",
]


def _main(workdir, *flags, stages="pretrain"):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "mini_o3_jax.main", "--config", "configs/pretrain_tiny.py",
                         "--workdir", str(workdir), f"--config.stages={stages}", *_TINY_PRETRAIN, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_reruns_refuse_incompatible_settings_and_resume_cleanly(tmp_path):
  first = _main(tmp_path, "--config.pretrain.steps=2")
  assert first.returncode == 0, first.stderr[-3000:]
  record = (tmp_path / "config.json").read_bytes()
  steps = lambda: [r["step"] for r in map(json.loads, open(tmp_path / "metrics" / "pretrain.jsonl"))]
  assert steps() == [1, 2]

  # Item 4: another model size cannot use these checkpoints: refused before config.json is touched.
  bigger = _main(tmp_path, "--config.pretrain.steps=2", "--config.model.hidden_size=64")
  assert bigger.returncode != 0
  assert "holds checkpoints of a run with other model" in bigger.stderr and "hidden_size" in bigger.stderr
  assert (tmp_path / "config.json").read_bytes() == record

  # Item 6: fewer steps than the run already took: said so, not an Orbax traceback.
  fewer = _main(tmp_path, "--config.pretrain.steps=1")
  assert fewer.returncode != 0
  assert "already at step 2, past the configured 1 steps" in fewer.stderr
  assert "StepAlreadyExists" not in fewer.stderr

  # Item 10: `--config.stages=` names nothing: an error, not a silent exit 0.
  empty = _main(tmp_path, stages="")
  assert empty.returncode != 0 and "names no stage" in empty.stderr

  # Item 10: a run killed after logging step 2 but before saving it repeats step 2 once, not twice;
  # a finished stage resumed reports its last loss instead of null.
  shutil.rmtree(tmp_path / "ckpt" / "pretrain" / "2")
  again = _main(tmp_path, "--config.pretrain.steps=2")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step 1" in again.stderr
  assert steps() == [1, 2]
  done = _main(tmp_path, "--config.pretrain.steps=2")
  assert done.returncode == 0, done.stderr[-3000:]
  line = next(l for l in done.stderr.splitlines() if "stage pretrain: {" in l)
  result = json.loads(line.split("stage pretrain: ", 1)[1])
  assert isinstance(result["final_loss"], float)


# ------------------------------------------------------------------------------------------------
# Token ids outside the vocabulary (item 5): refused where they enter, not NaN or wrapped logits.

@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_out_of_range_token_ids_are_refused_where_they_enter(model, bad):
  from mini_o3_jax.sampler import generate
  from mini_o3_jax.train import batch as batch_lib
  vocab = model.config.text.vocab_size
  bad = vocab if bad == "vocab" else bad
  ids = np.array([[5, 6, bad, 7]], np.int32)
  message = rf"outside the vocabulary \[0, {vocab}\): {bad} at position \(0, 2\)"
  first_message = message.replace(r"\(0, 2\)", r"\(0, 0\)")
  with pytest.raises(ValueError, match=message):
    model(ids)
  with pytest.raises(ValueError, match=message):
    generate(model, ids, max_new_tokens=2)
  with pytest.raises(ValueError, match=rf"example 0's input_ids .* {bad} at position \(2,\)"):
    batch_lib.collate_sft([{"input_ids": ids[0], "loss_mask": np.ones(4, np.int32)}], model.config,
                          batch_lib.BatchConfig(batch_size=1))
  # Padding too: one id past the end under a zero mask still turns the whole row to NaN.
  with pytest.raises(ValueError, match=first_message):
    model(np.array([[bad, 5, 6, 7]], np.int32), attention_mask=np.array([[0, 1, 1, 1]]))


# ------------------------------------------------------------------------------------------------
# Images (item 8): 16-bit and float pixels scaled, not clipped; EXIF orientation applied everywhere.

def test_16_bit_and_float_images_keep_their_contrast(tmp_path):
  from PIL import Image
  from mini_o3_jax.processing import image as image_lib
  ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
  Image.fromarray(ramp).save(tmp_path / "scan16.png")  # a 16-bit greyscale PNG
  got = np.asarray(image_lib.load_image(tmp_path / "scan16.png"))
  want = np.rint(ramp / 257.0).astype(np.uint8)
  assert got.shape == (48, 64, 3) and np.abs(got[..., 0].astype(int) - want).max() <= 1
  assert got.min() == 0 and got.max() == 255  # not all white
  unit = (ramp / 65535.0).astype(np.float32)
  Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")  # a float image in [0, 1]
  got = np.asarray(image_lib.load_image(tmp_path / "unit.tif"))
  assert np.abs(got[..., 1].astype(int) - want).max() <= 1  # not all black
  Image.fromarray(unit * 1000.0, mode="F").save(tmp_path / "hdr.tif")
  with pytest.raises(ValueError, match=r"hdr.tif.*float image must hold finite values in \[0, 1\] or \[0, 255\]"):
    image_lib.load_image(tmp_path / "hdr.tif")


def test_exif_orientation_is_applied_by_every_loader(tmp_path):
  from PIL import Image
  from mini_o3_jax.agent.trajectory import Trajectory
  from mini_o3_jax.processing import image as image_lib
  stored = np.zeros((40, 80, 3), np.uint8)
  stored[:, :40] = (255, 0, 0)  # left half red as stored; orientation 6 shows it turned 90 degrees clockwise
  exif = Image.Exif()
  exif[Image.ExifTags.Base.Orientation] = 6
  path = tmp_path / "phone.jpg"
  Image.fromarray(stored).save(path, exif=exif, quality=95)
  upright = image_lib.load_image(path)
  assert upright.size == (40, 80)  # width, height as a viewer shows it
  top, bottom = np.asarray(upright)[:30].mean((0, 1)), np.asarray(upright)[-30:].mean((0, 1))
  assert top[0] > 200 and top[1] < 60 and bottom.min() < 40  # the red half is on top
  assert np.array_equal(np.asarray(image_sources.decode_image(path.read_bytes())), np.asarray(upright))
  traj = Trajectory(question="q", images=[str(path)], turns=[])
  assert np.array_equal(np.asarray(traj.load_images().images[0]), np.asarray(upright))
  with Image.open(path) as f:
    assert image_lib.displayed_size(f) == (40, 80)


# ------------------------------------------------------------------------------------------------
# Errors that name the file (item 7).

def test_broken_hf_directories_are_named(model, tmp_path):
  good = tmp_path / "good"
  save_pretrained(model, model.config, str(good))
  # A truncated single file.
  cut = tmp_path / "cut"
  shutil.copytree(good, cut)
  data = (cut / "model.safetensors").read_bytes()
  (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"cannot read safetensors file .*cut/model.safetensors"):
    load_pretrained(str(cut))
  # A sharded index without its weight_map.
  sharded = tmp_path / "sharded"
  shutil.copytree(good, sharded)
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
  with pytest.raises(ValueError, match=r"model.safetensors.index.json has no \"weight_map\""):
    load_pretrained(str(sharded))
  # config.json values of the wrong type.
  typed = tmp_path / "typed"
  shutil.copytree(good, typed)
  cfg = json.loads((typed / "config.json").read_text())
  cfg["text_config"]["hidden_size"] = str(cfg["text_config"]["hidden_size"])
  (typed / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"typed/config.json: text_config.hidden_size must be an integer, got '\d+' \(str\)"):
    load_pretrained(str(typed))


def test_a_shape_mismatch_lists_only_what_is_wrong(model, tmp_path):
  from safetensors.numpy import load_file, save_file
  out = tmp_path / "export"
  save_pretrained(model, model.config, str(out))
  tensors = load_file(out / "model.safetensors")
  name = "model.language_model.layers.1.mlp.up_proj.weight"
  name = name if name in tensors else next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight"))
  tensors[name] = tensors[name][:-1]
  save_file(tensors, out / "model.safetensors")
  with pytest.raises(ValueError) as info:
    load_pretrained(str(out))
  message = str(info.value)
  assert f"tensor {name} has shape" in message and "unexpected" not in message  # present tensors are not "unexpected"


def test_a_torn_trajectory_line_names_file_and_line(tmp_path):
  from mini_o3_jax.agent import trajectory
  path = tmp_path / "t.jsonl"
  good = trajectory.Trajectory(question="q", images=["a.png"], turns=[]).to_json()
  path.write_text(good + "\n" + good[:len(good) // 2] + "\n")
  with pytest.raises(ValueError, match=r"t.jsonl:2: not a trajectory"):
    trajectory.read_jsonl(path)
