"""Qwen3-VL, the second backbone: logits, save / load, generation, processing, rollouts and training steps
against `transformers`' `Qwen3VLForConditionalGeneration` on tiny random configs.

The reference configs put DeepStack after vision blocks 0 and 2 of 3, use a 4 x 4 learned position
table (so every image grid resamples it) and head_dim 16 with interleaved M-RoPE.
"""

import dataclasses
import os
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

import hf_reference as ref
from configs import demo
from mini_o3_jax import run_config
from mini_o3_jax.agent import prompts
from mini_o3_jax.agent.task import Task
from mini_o3_jax import export as export_lib
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model.hf import load_pretrained, save_pretrained
from mini_o3_jax.model import prepare_inputs, rope, vlm
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.rl import step as rl
from mini_o3_jax.sampler.rollout import RolloutConfig, Sampler, vision_token_ids
from mini_o3_jax.sampler import SamplingParams, generate
from mini_o3_jax import sharding
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import sft
from mini_o3_jax.train import state as state_lib

sys.path.insert(0, os.path.dirname(__file__))
import train_worker as W  # noqa: E402

GRIDS = [[1, 4, 6], [1, 6, 4], [1, 8, 8]]


@pytest.fixture(scope="module", params=["untied", "tied"])
def pair(request, tmp_path_factory):
  """(transformers model, ours loaded from its save_pretrained directory)."""
  hf = ref.hf_model(ref.hf_qwen3_config(tie=request.param == "tied"))
  path = str(tmp_path_factory.mktemp("qwen3"))
  hf.save_pretrained(path)
  ours, cfg = load_pretrained(path)
  assert cfg.model_type == "qwen3_vl" and cfg.embed_levels == 3
  return hf, ours


def _batch(rows, grids, pad_side, seed=0):
  rng = np.random.default_rng(seed)
  ids, mask = ref.build_batch(rows, grids, rng, pad_side=pad_side)
  pv = ref.pixel_values(grids, rng, patch=16) if grids else None
  return ids, mask, pv, (np.array(grids) if grids else None)


def test_position_table_taps_match_torch_interpolate():
  side = 4
  table = torch.randn(side * side, 5, dtype=torch.float64)
  grids = np.array([[1, 4, 6], [1, 2, 8], [2, 6, 4]])
  index, weight = rope.position_table_taps(grids, side, merge=2)
  got = (table.numpy()[index] * weight[..., None]).sum(1)
  want = []
  for t, h, w in grids:
    grid = torch.nn.functional.interpolate(table.T.reshape(1, 5, side, side), size=(int(h), int(w)),
                                           mode="bilinear", align_corners=True)[0]  # [5, h, w]
    rows_cols = rope.vision_patch_positions(np.array([[1, h, w]]), 2)
    want.append(np.tile(grid.numpy()[:, rows_cols[:, 0], rows_cols[:, 1]].T, (t, 1)))
  np.testing.assert_allclose(got, np.concatenate(want), atol=1e-6)


def test_interleaved_mrope_axes_match_transformers():
  from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
  hf_cfg = ref.hf_qwen3_config(head_dim=32, mrope=(6, 5, 5)).text_config
  rotary = Qwen3VLTextRotaryEmbedding(hf_cfg)
  positions = np.stack([np.arange(7) * 3, np.arange(7) * 5 + 1, np.arange(7) * 7 + 2])[:, None]  # [3, 1, 7]
  cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
  ours_cos, ours_sin = rope.mrope_cos_sin(positions, 32, 10000.0, (6, 5, 5), interleaved=True)
  np.testing.assert_allclose(np.asarray(ours_cos), cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours_sin), sin.numpy(), atol=1e-6)


@pytest.mark.parametrize("case", ["text_left_pad", "images_left_pad", "images_right_pad"])
def test_logits_match_transformers(pair, case):
  hf, ours = pair
  if case == "text_left_pad":
    ids, mask, pv, g = _batch([[9], [4]], [], "left")
  else:
    rows = [[3, ("img", 0), 4, ("img", 1), 2], [5, ("img", 2), 6]]
    ids, mask, pv, g = _batch(rows, GRIDS, case.rsplit("_", 2)[1])
  want = ref.hf_logits(hf, ids, mask, pv, g)
  got = np.asarray(ours(ids, pixel_values=pv, image_grid_thw=g, attention_mask=mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4)


def test_deepstack_features_change_the_logits(pair):
  """A check that the DeepStack path is live: zeroing the features moves the logits at image tokens."""
  _, ours = pair
  ids, mask, pv, g = _batch([[3, ("img", 0), 4]], GRIDS[:1], "left")
  inputs, _ = prepare_inputs(ours.config, ids, mask, pv, g)
  embeds = ours.encode_images(inputs.pixel_values, inputs.vision)
  hidden = ours.config.text.hidden_size
  assert embeds.shape == (6, 3 * hidden)
  x = ours.embed(inputs.input_ids, embeds)
  plain = ours.embed(inputs.input_ids, embeds.at[:, hidden:].set(0.0))
  full = ours.logits(ours.model(x, inputs.positions, inputs.attention_mask))
  cut = ours.logits(ours.model(plain, inputs.positions, inputs.attention_mask))
  assert float(np.abs(np.asarray(full - cut)).max()) > 1e-2


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
  hf, ours = pair
  out = str(tmp_path / "export")
  save_pretrained(ours, ours.config, out)
  back = type(hf).from_pretrained(out).eval()
  ids, mask, pv, g = _batch([[3, ("img", 0), 4], [5, ("img", 1)]], GRIDS[:2], "left", seed=2)
  np.testing.assert_allclose(ref.hf_logits(back, ids, mask, pv, g), ref.hf_logits(hf, ids, mask, pv, g), atol=1e-5)
  again, cfg = load_pretrained(out)
  assert cfg == ours.config.replace(dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def test_greedy_matches_transformers_generate(pair):
  hf, ours = pair
  ids, mask, pv, g = _batch([[3, ("img", 0), 4], [("img", 1), 2], [5]], GRIDS[:2], "left", seed=3)
  t = torch.tensor(ids)
  with torch.no_grad():
    want = hf.generate(input_ids=t, attention_mask=torch.tensor(mask), mm_token_type_ids=(t == ref.IMAGE).int(),
                       pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(g), max_new_tokens=8,
                       do_sample=False)[:, ids.shape[1]:].numpy()
  got = generate(ours, ids, mask, pv, g, max_new_tokens=8, temperature=0.0)
  np.testing.assert_array_equal(got.tokens, want)


@pytest.mark.parametrize("size", [(640, 480), (333, 1000), (1280, 720), (97, 211)])
def test_image_processing_matches_transformers(size):
  from transformers import Qwen2VLImageProcessorPil
  rng = np.random.default_rng(size[0])
  image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  budget = dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 256)
  hf = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3, size={"shortest_edge": budget["min_pixels"],
                                                           "longest_edge": budget["max_pixels"]})
  want = hf(images=[image], return_tensors="np")
  mean, std = image_lib.normalization("qwen3_vl")
  pv, grid = image_lib.preprocess_image(image, patch_size=16, mean=mean, std=std, **budget)
  np.testing.assert_array_equal(grid, want["image_grid_thw"][0])
  np.testing.assert_allclose(pv, want["pixel_values"], atol=1e-5)


# ------------------------------------------------------------------------------ the tiny model


@pytest.fixture(scope="module")
def tokenizer():
  corpus = [prompts.question_prompt("What colour is the cup?"), prompts.observation_turn(0, 1),
            '<think>zoom</think><grounding>{"bbox_2d": [0.1, 0.2, 0.5, 0.6], "source": "original_image"}</grounding>',
            "<think>found</think><answer>red</answer>", '"observation_1"'] * 4
  return tok_lib.build_small_tokenizer(corpus, vocab_size=512)


@pytest.fixture(scope="module")
def tiny(tokenizer):
  ids = tok_lib.special_token_ids(tokenizer)
  cfg = config_lib.tiny_qwen3(512, **{k: ids[k] for k in ("image_token_id", "vision_start_token_id",
                                                          "vision_end_token_id", "video_token_id")})
  return vlm.random_model(cfg, seed=0)


def test_multi_turn_rollout_equals_a_full_forward(tiny, tokenizer):
  """Every observation appended to the cache (with its DeepStack features) scores its tokens as a
  from-scratch forward of the whole conversation does."""
  config = RolloutConfig(num_slots=2, max_turns=4, max_context=1024, max_turn_tokens=40, max_images=3,
                         min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16, sampling=SamplingParams(temperature=1.0),
                         decode_steps=8, chunk_buckets=(128,), patch_buckets=(64,), image_row_buckets=(2,),
                         window_min=0, max_forced_tokens=64)
  sampler = Sampler(tiny, tokenizer, config)
  x, y = np.meshgrid(np.arange(256), np.arange(192))
  image = Image.fromarray(np.stack([x, y, (3 * x + 5 * y) % 256], -1).astype(np.uint8))
  crop = lambda box, source="original_image": (
      '<think>zoom</think><grounding>{"bbox_2d": ' + str(box) + ', "source": "' + source + '"}</grounding>')
  turns = [crop([0.5, 0.0, 1.0, 0.5]), crop([0.0, 0.5, 0.6, 1.0], "observation_1"), None]
  res, = sampler.rollout([Task(image, "What colour is the cup?")], seed=1,
                         policy=lambda i, traj: turns[min(traj.num_turns, 2)])
  assert len(res.images) == 3
  n = len(res.token_ids)
  inputs, _ = prepare_inputs(tiny.config, res.token_ids[None], np.ones((1, n), np.int32),
                             np.concatenate(res.pixel_values), res.image_grid_thw)
  logits = np.asarray(nnx.jit(lambda m, x: m.forward(x))(tiny, inputs), np.float64)[0]
  logits[:, list(vision_token_ids(tiny.config))] = -1e9  # never sampled (RolloutConfig.suppress_vision_tokens)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  pos = np.flatnonzero(res.response_mask)
  np.testing.assert_allclose(res.logprobs[pos], logp[pos - 1, res.token_ids[pos]], atol=2e-4)


def _steps(cfg, params, mesh, rl_step: bool = True):
  opt = W.optimizer_config(lr=1e-2)
  state, shardings, tx = state_lib.create_train_state(cfg, lambda p: state_lib.make_tx(opt, p), mesh, params=params)
  return (state, sft.make_sft_step(sft.SFTConfig(), tx, mesh, shardings),
          rl.make_rl_step(rl.RLConfig(), tx, mesh, shardings) if rl_step else None)


def test_sharded_sft_step_matches_one_device_and_grpo_runs_sharded(tiny):
  """An SFT step with images (vision tower, DeepStack, position table all trained) on a (2, 2, 2) mesh
  equals one device; a GRPO step with images runs on the same mesh and moves the params."""
  cfg = tiny.config
  params = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
  bcfg = batch_lib.BatchConfig(8, length_buckets=(48,), patch_buckets=(16,))
  sft_batch = batch_lib.collate_sft(batch_lib.random_examples(cfg, 8, seq_len=40, images_per_row=1, grid=(1, 4, 4),
                                                              seed=1), cfg, bcfg)
  rl_batch = batch_lib.collate_rl(batch_lib.random_examples(cfg, 8, seq_len=40, images_per_row=1, grid=(1, 4, 4),
                                                            rl=True, group_size=4, seed=2), cfg, bcfg)
  out = {}
  for shape in [(1, 1, 1), (2, 2, 2)]:
    mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    state, sft_step, rl_step = _steps(cfg, params, mesh, rl_step=shape == (2, 2, 2))
    state, metrics = sft_step(state, batch_lib.shard_batch(sft_batch, mesh))
    out[shape] = jax.device_get((metrics, state.params))
  (want, a_params), (got, b_params) = out[(1, 1, 1)], out[(2, 2, 2)]
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
  assert np.isfinite(want["loss"]) and want["loss"] > 0
  for x, y in zip(jax.tree.leaves(a_params), jax.tree.leaves(b_params)):
    np.testing.assert_allclose(x, y, atol=2e-5)
  state, metrics = rl_step(state, batch_lib.shard_batch(rl_batch, mesh))
  moved = jax.device_get(state.params)
  assert np.isfinite(float(metrics["loss"]))
  assert max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(moved), jax.tree.leaves(b_params))) > 0


def test_checkpoint_resume_and_export_round_trip(tiny, tokenizer, tmp_path):
  """Orbax save -> restore onto a sharded mesh -> HF export -> transformers logits equal ours."""
  cfg = tiny.config
  mesh = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
  state, _, _ = _steps(cfg, nnx.to_pure_dict(nnx.state(tiny, nnx.Param)), mesh, rl_step=False)
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(str(tmp_path / "ckpt"), async_save=False)) as ckpt:
    ckpt.save(state, {"step": 3}, step=3)
  model, step = ckpt_lib.restore_model(str(tmp_path / "ckpt"), cfg)
  assert step == 3
  out = str(tmp_path / "hf")
  export_lib.export_model(model, cfg, tokenizer, out, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16)
  from transformers import AutoImageProcessor, AutoModelForImageTextToText
  hf = AutoModelForImageTextToText.from_pretrained(out).eval()
  processor = AutoImageProcessor.from_pretrained(out)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
  mean, std = image_lib.normalization("qwen3_vl")
  pv, grid = image_lib.preprocess_image(image, 32 * 32 * 4, 32 * 32 * 16, patch_size=16, mean=mean, std=std)
  np.testing.assert_allclose(processor(images=[image], return_tensors="np")["pixel_values"], pv, atol=1e-5)
  n = int(np.prod(grid)) // 4
  ids = np.array([[5, cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id, 7, 9]])
  mask = np.ones_like(ids)
  t = torch.tensor(ids)
  with torch.no_grad():
    want = hf(input_ids=t, attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
              image_grid_thw=torch.tensor(grid[None]), mm_token_type_ids=(t == cfg.image_token_id).int()).logits
  got = np.asarray(model(ids, pixel_values=pv, image_grid_thw=grid[None], attention_mask=mask))
  np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_config_presets_and_refusals():
  big = config_lib.qwen3vl_8b()
  assert big.model_type == "qwen3_vl" and big.text.head_dim == 128 and big.embed_levels == 4
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nnx.state(nnx.eval_shape(lambda: vlm.VLM(big, rngs=nnx.Rngs(0))), nnx.Param)))
  assert 8.6e9 < params < 8.9e9, params  # Qwen3-VL-8B-Instruct: 8.77B
  assert config_lib.VLMConfig.from_hf_dict(big.to_hf_dict()) == big
  vision = config_lib.tiny_qwen3().vision
  with pytest.raises(ValueError, match="increasing"):
    config_lib.tiny_qwen3().replace(vision=dataclasses.replace(vision, deepstack_visual_indexes=(1, 0)))
  with pytest.raises(ValueError, match="square"):
    config_lib.tiny_qwen3().replace(vision=dataclasses.replace(vision, num_position_embeddings=60))


def test_import_hf_tool_accepts_qwen3vl(pair, tmp_path):
  """tools/import_hf.py: a transformers-saved Qwen3-VL -> an Orbax checkpoint whose params give HF's logits."""
  import importlib.util
  hf, ours = pair
  src = tmp_path / "hf"
  hf.save_pretrained(str(src))
  spec = importlib.util.spec_from_file_location(
      "import_hf", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "import_hf.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  assert tool.main(["--hf", str(src), "--out", str(tmp_path / "ckpt")]) == 0
  config = config_lib.VLMConfig.from_pretrained(str(tmp_path / "ckpt" / export_lib.ASSETS_DIR))
  assert config.model_type == "qwen3_vl"
  model, step = ckpt_lib.restore_model(str(tmp_path / "ckpt"), config)
  ids, mask, pv, g = _batch([[3, ("img", 0), 4]], GRIDS[1:2], "left", seed=4)
  np.testing.assert_allclose(np.asarray(model(ids, pixel_values=pv, image_grid_thw=g, attention_mask=mask)),
                             ref.hf_logits(hf, ids, mask, pv, g), atol=1e-4)


def test_the_demos_sized_qwen3vl_matches_transformers(tmp_path):
  """`model.family="qwen3_vl"` in the demo's model section (its sizes, 14-pixel patches, an 8 x 8 position
  table, no DeepStack: the tiny base's form) -> a model whose transformers reload gives the same logits."""
  config = demo.get_config()
  config.model.family = "qwen3_vl"
  ids = dict(image_token_id=ref.IMAGE, video_token_id=ref.VIDEO, vision_start_token_id=ref.VISION_START,
             vision_end_token_id=ref.VISION_END, eos_token_id=1, pad_token_id=0)
  cfg = run_config.model_config_for_vocabulary(config, ref.VOCAB, ids)
  assert cfg.model_type == "qwen3_vl" and cfg.embed_levels == 1 and cfg.text.qk_norm
  assert (cfg.vision.patch_size, cfg.vision.grid_per_side, cfg.vision.depth) == (14, 8, config.model.vision_depth)
  ours = vlm.random_model(cfg, seed=5)
  save_pretrained(ours, cfg, str(tmp_path))
  hf = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path)).eval()
  rng = np.random.default_rng(5)
  grids = [[1, 8, 8], [1, 6, 10]]
  ids_, mask = ref.build_batch([[3, ("img", 0), 4], [("img", 1), 2]], grids, rng)
  pv = ref.pixel_values(grids, rng, patch=14)
  got = np.asarray(ours(ids_, pixel_values=pv, image_grid_thw=np.array(grids), attention_mask=mask))
  np.testing.assert_allclose(got[mask.astype(bool)], ref.hf_logits(hf, ids_, mask, pv, grids)[mask.astype(bool)],
                             atol=1e-4)
  config.model.vision_position_sincos = 1.0  # the Qwen2.5-VL tower's option: no meaning here
  with pytest.raises(ValueError, match="vision_position_sincos"):
    run_config.model_config_for_vocabulary(config, ref.VOCAB, ids)
  config.model.family = "qwen4_vl"
  with pytest.raises(ValueError, match="model.family"):
    run_config.model_config_for_vocabulary(config, ref.VOCAB, ids)
