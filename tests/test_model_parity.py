"""Logits parity of the Flax port with transformers' PyTorch Qwen2.5-VL on small random configs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from flax import nnx
from transformers import AutoImageProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

import hf_reference as ref
from mini_o3_jax.model.hf import load_pretrained, resolve_checkpoint, save_pretrained
from mini_o3_jax.model import Qwen25VL, Qwen25VLConfig, VisionInputs, config as config_lib, rope
from mini_o3_jax.processing import image as image_lib

TOL = 1e-4

CONFIGS = {
    "untied_gqa": dict(tie=False, kv_heads=2),
    "tied_mha": dict(tie=True, kv_heads=4),
    "deep_window": dict(tie=False, kv_heads=1, layers=3, vision_depth=4, fullatt=(0, 3), window_size=28,
                        mrope=(4, 2, 2)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
  """(transformers model, our model loaded from its save_pretrained directory, directory)."""
  hf = ref.hf_model(ref.hf_config(**CONFIGS[request.param]))
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path)
  ours, _ = load_pretrained(path)
  return hf, ours, path


def _valid(mask):
  return np.asarray(mask).astype(bool)


def test_text_only_batch_with_padding(pair):
  hf, ours, _ = pair
  rng = np.random.default_rng(1)
  ids, mask = ref.build_batch([[17], [9], [12]], [], rng, pad_side="left")
  got = np.asarray(ours(ids, attention_mask=mask))
  want = ref.hf_logits(hf, ids, mask)
  assert np.abs(got - want)[_valid(mask)].max() < TOL


def test_one_image(pair):
  hf, ours, _ = pair
  rng = np.random.default_rng(2)
  grids = [[1, 8, 12]]
  ids, mask = ref.build_batch([[5, ("img", 0), 9]], grids, rng)
  pv = ref.pixel_values(grids, rng)
  got = np.asarray(ours(ids, pv, np.array(grids), mask))
  want = ref.hf_logits(hf, ids, mask, pv, grids)
  assert np.abs(got - want).max() < TOL


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_two_images_of_different_sizes_and_padding(pair, pad_side):
  hf, ours, _ = pair
  rng = np.random.default_rng(3)
  # Row 0 holds two images of different sizes (odd merged grids -> partial windows); row 1 a third image.
  grids = [[1, 10, 14], [1, 6, 4], [1, 4, 8]]
  ids, mask = ref.build_batch([[4, ("img", 0), 6, ("img", 1), 3], [2, ("img", 2), 5]], grids, rng, pad_side)
  pv = ref.pixel_values(grids, rng)
  got = np.asarray(ours(ids, pv, np.array(grids), mask))
  want = ref.hf_logits(hf, ids, mask, pv, grids)
  assert np.abs(got - want)[_valid(mask)].max() < TOL


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
  hf, ours, _ = pair
  out = str(tmp_path / "export")
  save_pretrained(ours, ours.config, out)
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
  rng = np.random.default_rng(4)
  grids = [[1, 4, 4]]
  ids, mask = ref.build_batch([[3, ("img", 0), 7]], grids, rng)
  pv = ref.pixel_values(grids, rng)
  np.testing.assert_array_equal(ref.hf_logits(back, ids, mask, pv, grids), ref.hf_logits(hf, ids, mask, pv, grids))
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["model_type"] == "qwen2_5_vl" and cfg["text_config"]["rope_parameters"]["mrope_section"]
  # Every field transformers writes for this config, and the generation / image-processor files its
  # classes read (save_pretrained alone gives a directory `generate` can use).
  want = hf.config.to_dict()
  for key in ("layer_types", "max_window_layers", "use_cache"):
    assert cfg["text_config"][key] == want["text_config"][key], key
  generation = GenerationConfig.from_pretrained(out)
  assert generation.eos_token_id == ours.config.text.eos_token_id and generation.do_sample is False
  processor = AutoImageProcessor.from_pretrained(out)
  img = PIL.Image.fromarray(rng.integers(0, 255, (90, 130, 3), np.uint8))
  got = processor(images=[img], return_tensors="np")
  mine, grid = image_lib.preprocess_image(img)
  np.testing.assert_allclose(got["pixel_values"], mine, atol=1e-5)
  np.testing.assert_array_equal(got["image_grid_thw"][0], grid)


def test_load_pretrained_finds_a_hub_id_in_the_local_cache(pair, tmp_path):
  _, ours, path = pair
  # The hub cache layout: models--org--name/{refs/main, snapshots/<revision>/files}; nothing is downloaded.
  snapshot = tmp_path / "models--acme--tiny-vl" / "snapshots" / "0123abc"
  snapshot.mkdir(parents=True)
  for name in os.listdir(path):
    os.symlink(os.path.join(path, name), snapshot / name)
  (tmp_path / "models--acme--tiny-vl" / "refs").mkdir()
  (tmp_path / "models--acme--tiny-vl" / "refs" / "main").write_text("0123abc")
  assert resolve_checkpoint("acme/tiny-vl", cache_dir=str(tmp_path)) == str(snapshot)
  with pytest.raises(FileNotFoundError, match="never downloads"):
    resolve_checkpoint("acme/absent", cache_dir=str(tmp_path))


def test_sharded_checkpoint_round_trip(pair, tmp_path):
  hf, ours, _ = pair
  out = str(tmp_path / "sharded")
  save_pretrained(ours, ours.config, out, max_shard_bytes=20_000)
  files = os.listdir(out)
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
  again, _ = load_pretrained(out)
  a, b = nnx.state(ours, nnx.Param), nnx.state(again, nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
  rng = np.random.default_rng(5)
  ids, mask = ref.build_batch([[11]], [], rng)
  np.testing.assert_allclose(ref.hf_logits(back, ids, mask), ref.hf_logits(hf, ids, mask), atol=0, rtol=0)


def test_rope_index_matches_transformers():
  hf = ref.hf_model(ref.hf_config())
  rng = np.random.default_rng(6)
  grids = [[1, 6, 10], [1, 4, 4], [1, 8, 2], [1, 2, 2]]
  for pad_side in ("left", "right"):
    ids, mask = ref.build_batch([[3, ("img", 0), 2, ("img", 1)], [("img", 2), 4, ("img", 3), 6], [9]],
                                grids, rng, pad_side)
    want, want_delta = hf.model.get_rope_index(torch.tensor(ids), (torch.tensor(ids) == ref.IMAGE).int(),
                                               image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    got, delta = rope.get_rope_index(ids, np.array(grids), mask, image_token_id=ref.IMAGE, spatial_merge_size=2)
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])


def test_rope_index_errors():
  ids = np.array([[1, ref.IMAGE, ref.IMAGE, 2]])
  with pytest.raises(ValueError, match="more image tokens"):
    rope.get_rope_index(ids, None, None, image_token_id=ref.IMAGE, spatial_merge_size=2)
  with pytest.raises(ValueError, match="consecutive"):
    rope.get_rope_index(ids, np.array([[1, 4, 4]]), None, image_token_id=ref.IMAGE, spatial_merge_size=2)


@pytest.mark.parametrize("grids,window", [([[1, 8, 12]], 56), ([[1, 10, 14], [1, 6, 4]], 56),
                                          ([[1, 22, 30], [1, 2, 2]], 112), ([[2, 8, 8]], 56)])
def test_window_layout_matches_transformers(grids, window):
  cfg = config_lib.VisionConfig(window_size=window)
  got = VisionInputs.build(np.array(grids), cfg)
  index, cu = get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=window, patch_size=14)
  np.testing.assert_array_equal(got.window_index, index.numpy())
  # Windows are contiguous runs of equal segment ids whose boundaries are the reference's cu_seqlens.
  seg = np.asarray(got.window_segments)
  bounds = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1, [len(seg)]])
  np.testing.assert_array_equal(bounds, cu.numpy())


@nnx.jit
def _encode(model, pv, vision):
  return model.encode_images(pv, vision)


def test_padded_patches_do_not_change_image_tokens(pair):
  _, ours, _ = pair
  rng = np.random.default_rng(7)
  grids = np.array([[1, 6, 8], [1, 4, 4]])
  pv = ref.pixel_values(grids, rng)
  plain = _encode(ours, jnp.asarray(pv), jax.tree.map(jnp.asarray, VisionInputs.build(grids, ours.config.vision)))
  padded_inputs = VisionInputs.build(grids, ours.config.vision, pad_to=pv.shape[0] + 24)
  padded_pv = np.concatenate([pv, rng.normal(size=(24, pv.shape[1])).astype(np.float32)])
  padded = _encode(ours, jnp.asarray(padded_pv), jax.tree.map(jnp.asarray, padded_inputs))
  np.testing.assert_allclose(np.asarray(padded)[: plain.shape[0]], np.asarray(plain), atol=1e-5)


def test_load_errors_are_clear(pair, tmp_path):
  hf, _, path = pair
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(path, "model.safetensors"))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(open(os.path.join(path, "config.json")).read())

  def write(ts):
    save_file(ts, str(bad / "model.safetensors"), metadata={"format": "pt"})

  key = "model.layers.1.mlp.up_proj.weight"
  write({k: v for k, v in tensors.items() if k != key})
  with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
    load_pretrained(str(bad))
  write({**tensors, "model.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="unexpected tensors: \\['model.extra.weight'\\]"):
    load_pretrained(str(bad))
  write({**tensors, key: tensors[key][:, :-1]})
  with pytest.raises(ValueError, match="has shape"):
    load_pretrained(str(bad))
  with pytest.raises(FileNotFoundError):
    load_pretrained(str(tmp_path / "nowhere"))


def test_config_round_trip_and_hub_layout(tmp_path):
  # The flat v4 hub layout of Qwen2.5-VL-7B-Instruct's config.json.
  hub = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
         "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
         "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
         "max_position_embeddings": 128000, "tie_word_embeddings": False, "image_token_id": 151655,
         "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
         "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                           "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                           "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                           "tokens_per_second": 2, "hidden_act": "silu"}}
  cfg = Qwen25VLConfig.from_hf_dict(hub)
  assert cfg == config_lib.qwen25vl_7b()
  cfg.save_pretrained(str(tmp_path))
  assert Qwen25VLConfig.from_pretrained(str(tmp_path)) == cfg
  with pytest.raises(ValueError, match="mrope_section"):
    Qwen25VLConfig.from_hf_dict({**hub, "rope_scaling": {"mrope_section": [16, 24, 23]}})
  with pytest.raises(ValueError, match="model_type"):
    Qwen25VLConfig.from_hf_dict({**hub, "model_type": "llama"})


def test_7b_abstract_parameter_count():
  model = nnx.eval_shape(lambda: Qwen25VL(config_lib.qwen25vl_7b(), rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert 8.28e9 < n < 8.30e9, n  # Qwen2.5-VL-7B-Instruct has 8,292,166,656 parameters


def test_bf16_runs_close_to_fp32(pair, tmp_path):
  _, ours, path = pair
  if ours.config.tie_word_embeddings:
    pytest.skip("one bf16 check per dtype path is enough; the untied configs cover it")
  ours16, cfg16 = load_pretrained(path, dtype=jnp.bfloat16)
  assert cfg16.dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(ours16, nnx.Param)))
  rng = np.random.default_rng(8)
  grids = [[1, 4, 6]]
  ids, mask = ref.build_batch([[5, ("img", 0), 5]], grids, rng)
  pv = ref.pixel_values(grids, rng)
  a = np.asarray(ours(ids, pv, np.array(grids), mask))
  b = np.asarray(ours16(ids, pv, np.array(grids), mask)).astype(np.float32)
  assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
