"""tools/export_hf.py and tools/import_hf.py (`mini_o3_jax.export`): a trained checkpoint becomes a
directory transformers loads with the same logits, greedy tokens, image preprocessing and chat ids as
ours; an HF directory becomes a checkpoint with the same logits and back again, bit for bit."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import optax
import PIL.Image
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import (AutoImageProcessor, AutoTokenizer, GenerationConfig, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)

import hf_reference as ref
import train_worker as W
from mini_o3_jax import agent as agent_lib
from mini_o3_jax import export
from mini_o3_jax.model.hf import load_pretrained
from mini_o3_jax.model import Qwen25VLConfig
from mini_o3_jax.pipeline import common, eval_stages
from mini_o3_jax.processing import chat, image as image_lib, tokenizer as tok_lib
from mini_o3_jax import run_config as run_config_lib
from mini_o3_jax.sampler import generate
from mini_o3_jax import sharding
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import sft
from mini_o3_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
VIEW_PIXELS = 112 * 112  # at most 64 patches, 16 image tokens
CORPUS = ["Where is the red key? <think>zoom in</think><answer>3</answer>",
          "The digit on the blue box is 7.", "Question: what is written here?"] * 8
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the red key?"}]},
    {"role": "assistant", "content": "<think>zoom in</think><grounding>[1, 2]</grounding>"},
    {"role": "user", "content": [{"type": "text", "text": "Observation: "}, {"type": "image"}]},
]


def _run_tool(script, *args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", script), *args], env=env,
                        capture_output=True, text=True, timeout=300)


def _json(path):
  with open(path) as f:
    return json.load(f)


def _load(*parts):
  """A script of the repository (tools/, configs/, examples/) as a module: no such folder is a package."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(parts[-1])[0], os.path.join(REPO, *parts))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tool(name):
  """tools/<name>.py, to run its `main` in this process (a subprocess pays ~10 s of imports)."""
  return _load("tools", f"{name}.py")


def _run_config():
  c = _load("configs", "demo.py").get_config()
  c.view_pixels = VIEW_PIXELS
  c.tokenizer.vocab_size = 400
  c.model.update(dict(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      vision_hidden_size=32, vision_intermediate_size=48, vision_depth=2, vision_heads=2))
  return c


def _host_params(config, seed=0):
  """Weights ~ N(0, 0.1), norms ~ 1 (as hf_reference): O(1) logits, so greedy picks have clear margins."""
  rng = np.random.default_rng(seed)

  def one(path, x):
    if "norm" in jax.tree_util.keystr(path) or "ln_q" in jax.tree_util.keystr(path):
      return (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)

  _, abstract = state_lib.abstract_model(config)
  return jax.tree_util.tree_map_with_path(one, nnx.to_pure_dict(abstract))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A demo-shaped work directory (run config.json, tokenizer/) with ckpt/sft after one real SFT step."""
  workdir = tmp_path_factory.mktemp("workdir")
  run_config = _run_config()
  with open(workdir / "config.json", "w") as f:
    f.write(run_config.to_json_best_effort(indent=2))
  tokenizer = tok_lib.build_small_tokenizer(CORPUS, vocab_size=run_config.tokenizer.vocab_size)
  tokenizer.save_pretrained(str(workdir / "tokenizer"))
  tokenizer = tok_lib.load_tokenizer(str(workdir / "tokenizer"))
  mcfg = run_config_lib.model_config(run_config, tokenizer)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  # Text-only SFT (the vision tower frozen): the cheapest real step to compile; which weights moved
  # does not matter to an export, only that the checkpoint holds trained ones.
  opt, sft_config = W.text_only_configs()
  state, shardings, tx = state_lib.create_train_state(mcfg, lambda p: state_lib.make_tx(opt, p), mesh,
                                                      params=_host_params(mcfg))
  step = sft.make_sft_step(sft_config, tx, mesh, shardings, donate=False)
  examples = batch_lib.random_examples(mcfg, 4, seq_len=40, images_per_row=0, seed=1)
  batch = batch_lib.collate_sft(examples, mcfg, batch_lib.BatchConfig(4, length_buckets=(48,), patch_buckets=(16,)))
  new_state, metrics = step(state, batch_lib.shard_batch(batch, mesh))
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params, new_state.params)
  assert all(jax.tree.leaves(changed["model"]))  # the text weights really were trained
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(str(workdir / "ckpt" / "sft"), async_save=False)) as ckpt:
    ckpt.save(new_state)
  model = nnx.merge(state_lib.abstract_model(mcfg)[0], new_state.params)
  return dict(workdir=workdir, run_config=run_config, tokenizer=tokenizer, config=mcfg, model=model,
              params=jax.device_get(new_state.params))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """The CLI's export of the demo work directory's SFT checkpoint (everything found from the workdir)."""
  tmp = tmp_path_factory.mktemp("export")
  out = tmp / "hf"
  proc = _run_tool("export_hf.py", "--checkpoint", str(trained["workdir"] / "ckpt" / "sft"), "--out", str(out),
                   tmp_path=tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout)
  return dict(out=str(out), summary=summary)


def _image(seed=0, size=(150, 97)):
  rng = np.random.default_rng(seed)
  return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _prompt(tokenizer, config):
  """One user turn with an image, tokenised by our chat code: (ids [T], pixel_values, grid [3])."""
  pv, grid = image_lib.preprocess_image(_image(), VIEW_PIXELS, VIEW_PIXELS)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the red key?"}]}]
  ids = chat.tokenize_conversation(tokenizer, messages, [grid], add_generation_prompt=True)["input_ids"]
  assert int(np.sum(ids == config.image_token_id)) == int(np.prod(grid)) // 4 > 0
  return ids.astype(np.int64), pv, grid


def _hf_inputs(ids, pv, grid, image_token_id):
  t = torch.tensor(ids[None])
  return dict(input_ids=t, attention_mask=torch.ones_like(t), mm_token_type_ids=(t == image_token_id).int(),
              pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid[None]))


def _hf_logits(hf, ids, pv, grid, image_token_id):
  """transformers' logits with explicit 3-D M-RoPE positions (as hf_reference.hf_logits)."""
  kw = _hf_inputs(ids, pv, grid, image_token_id)
  with torch.no_grad():
    positions, _ = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"],
                                           image_grid_thw=kw["image_grid_thw"], attention_mask=kw["attention_mask"])
    return hf(**kw, position_ids=positions).logits.float().numpy()


# ------------------------------------------------------------------------------ export


@pytest.mark.slow
def test_cli_export_of_demo_workdir_writes_a_complete_directory(trained, exported):
  out, summary = exported["out"], exported["summary"]
  files = set(os.listdir(out))
  assert {"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
          "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json"} <= files
  assert summary["step"] == 1 and summary["dtype"] == "float32"
  assert summary["sources"]["config"] == str(trained["workdir"] / "config.json")
  assert summary["sources"]["tokenizer"] == str(trained["workdir"] / "tokenizer")
  pre = _json(os.path.join(out, "preprocessor_config.json"))
  assert pre["min_pixels"] == pre["max_pixels"] == VIEW_PIXELS and pre["merge_size"] == 2
  ids = tok_lib.special_token_ids(trained["tokenizer"])
  gen = GenerationConfig.from_pretrained(out)
  assert gen.eos_token_id == [ids["im_end_token_id"], ids["endoftext_token_id"]] and not gen.do_sample
  assert gen.pad_token_id == ids["pad_token_id"]
  # transformers 4.x (vLLM) reads the added special tokens from the old key, not v5's list.
  tok_config = _json(os.path.join(out, "tokenizer_config.json"))
  assert "extra_special_tokens" not in tok_config and tok_config["additional_special_tokens"]
  assert tok_config["chat_template"] == tok_lib.QWEN25VL_CHAT_TEMPLATE
  tok = AutoTokenizer.from_pretrained(out)
  assert tok.all_special_tokens == trained["tokenizer"].all_special_tokens
  assert tok.chat_template == tok_lib.QWEN25VL_CHAT_TEMPLATE
  # The weights are the trained ones, unchanged.
  again, cfg = load_pretrained(out)
  assert cfg.text == trained["config"].text and cfg.vision == trained["config"].vision
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(again, nnx.Param)), trained["params"])


@pytest.mark.slow
def test_exported_logits_match_ours(trained, exported):
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported["out"]).eval()
  cfg = trained["config"]
  ids, pv, grid = _prompt(trained["tokenizer"], cfg)
  got = np.asarray(trained["model"](ids[None], pv, grid[None]))
  want = _hf_logits(hf, ids, pv, grid, cfg.image_token_id)
  assert np.abs(got - want).max() < TOL
  assert np.abs(want).max() > 1.0  # not a degenerate near-zero output


@pytest.mark.slow
def test_exported_greedy_answer_matches_our_sampler(trained, exported):
  out = exported["out"]
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
  gen = GenerationConfig.from_pretrained(out)
  cfg = trained["config"]
  ids, pv, grid = _prompt(trained["tokenizer"], cfg)
  with torch.no_grad():
    want = hf.generate(**_hf_inputs(ids, pv, grid, cfg.image_token_id), generation_config=gen,
                       max_new_tokens=12)[0, len(ids):].numpy()
  got = generate(trained["model"], ids[None], None, pv, grid[None], max_new_tokens=12, temperature=0.0,
                 stop_token_ids=gen.eos_token_id, pad_token_id=gen.pad_token_id)
  np.testing.assert_array_equal(got.tokens[0, :got.lengths[0]], want)


@pytest.mark.slow
def test_exported_image_processor_matches_preprocess_image(exported):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    proc = AutoImageProcessor.from_pretrained(exported["out"])
    for seed, size in [(0, (150, 97)), (1, (40, 300)), (2, (512, 512))]:
      image = _image(seed, size)
      out = proc(images=[image])
      pv, grid = image_lib.preprocess_image(image, VIEW_PIXELS, VIEW_PIXELS)
      np.testing.assert_array_equal(np.asarray(out["image_grid_thw"])[0], grid)
      np.testing.assert_array_equal(np.asarray(out["pixel_values"]), pv)


@pytest.mark.slow
def test_exported_chat_template_matches_tokenize_conversation(trained, exported):
  tok = AutoTokenizer.from_pretrained(exported["out"])
  grids = [np.array([1, 8, 8]), np.array([1, 4, 6])]
  for gen in (False, True):
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert text == chat.render_chat(MESSAGES, add_generation_prompt=gen)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"])
    image_id = trained["config"].image_token_id
    repeats = np.ones(len(ids), np.int64)
    repeats[ids == image_id] = [int(np.prod(g)) // 4 for g in grids]
    want = chat.tokenize_conversation(trained["tokenizer"], MESSAGES, grids, add_generation_prompt=gen)["input_ids"]
    np.testing.assert_array_equal(np.repeat(ids, repeats), want)


@pytest.mark.slow
def test_exported_processor_end_to_end(trained, exported):
  """A Qwen2_5_VLProcessor from the exported files gives our ids and pixels (AutoProcessor itself needs
  torchvision for the video processor; without it the processor is assembled from the same files)."""
  out = exported["out"]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      from transformers import AutoProcessor  # pylint: disable=g-import-not-at-top
      processor = AutoProcessor.from_pretrained(out)
    except ImportError:
      from transformers.models.qwen2_5_vl import processing_qwen2_5_vl  # pylint: disable=g-import-not-at-top

      class Processor(processing_qwen2_5_vl.Qwen2_5_VLProcessor):

        def check_argument_for_proper_class(self, argument_name, argument):
          if argument_name == "video_processor" and argument is None:
            return None
          return super().check_argument_for_proper_class(argument_name, argument)

      template = _json(os.path.join(out, "chat_template.json"))["chat_template"]
      processor = Processor(image_processor=AutoImageProcessor.from_pretrained(out),
                            tokenizer=AutoTokenizer.from_pretrained(out), chat_template=template)
    images = [_image(3, (200, 120)), _image(4, (64, 90))]
    text = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    got = processor(text=[text], images=images, return_tensors="np")
  processed = [image_lib.preprocess_image(im, VIEW_PIXELS, VIEW_PIXELS) for im in images]
  want = chat.tokenize_conversation(trained["tokenizer"], MESSAGES, [g for _, g in processed],
                                    add_generation_prompt=True)
  np.testing.assert_array_equal(got["input_ids"][0], want["input_ids"])
  np.testing.assert_array_equal(got["pixel_values"], np.concatenate([p for p, _ in processed]))
  np.testing.assert_array_equal(got["image_grid_thw"], np.stack([g for _, g in processed]))


@pytest.mark.slow
def test_library_export_of_a_step_dir_with_explicit_config_bf16_sharded(trained, tmp_path):
  """Any Checkpointer directory plus a model config.json: a step directory, bf16, sharded with an index."""
  cfg_dir = tmp_path / "model_config"
  trained["config"].save_pretrained(str(cfg_dir))
  out = tmp_path / "hf_bf16"
  summary = export.export_checkpoint(str(trained["workdir"] / "ckpt" / "sft" / "1"), str(out),
                                     config_path=str(cfg_dir / "config.json"),
                                     tokenizer_path=str(trained["workdir"] / "tokenizer"), dtype="bfloat16",
                                     max_shard_bytes=50_000, min_pixels=3136, max_pixels=200_704)
  assert summary["step"] == 1 and summary["sources"]["pixels"] == "arguments"
  files = os.listdir(out)
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
  assert _json(out / "config.json")["torch_dtype"] == "bfloat16"
  pre = _json(out / "preprocessor_config.json")
  assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 200_704)
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out))
  assert hf.dtype == torch.bfloat16
  again, _ = load_pretrained(str(out), dtype="bfloat16")
  want = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), trained["params"])
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(again, nnx.Param)), want)


def test_export_to_a_gcs_path_stages_locally_and_copies_through_epath(trained, tmp_path):
  """`gs://` outputs go through `etils.epath` (mocked here onto a local folder: no network in tests)."""
  from etils.epath import testing as epath_testing
  bucket = tmp_path / "bucket"
  written = []

  def local(path):
    path = os.fspath(path)
    assert path.startswith("gs://my-bucket/"), path
    return str(bucket / path[len("gs://my-bucket/"):])

  def fake_open(_, path, mode="r", *args, **kwargs):
    if "w" in mode:
      written.append(os.path.basename(os.fspath(path)))
    return open(local(path), mode, *args, **kwargs)

  def fake_makedirs(_, path, *args, exist_ok=False, **kwargs):
    os.makedirs(local(path), exist_ok=exist_ok)

  with epath_testing.mock_epath(open=fake_open, makedirs=fake_makedirs,
                                mkdir=lambda _, path, *a, **k: os.makedirs(local(path), exist_ok=True),
                                exists=lambda _, path: os.path.exists(local(path)),
                                isdir=lambda _, path: os.path.isdir(local(path))):
    out = export.export_model(trained["model"], trained["config"], trained["tokenizer"], "gs://my-bucket/runs/hf",
                              min_pixels=VIEW_PIXELS, max_pixels=VIEW_PIXELS)
  assert out == "gs://my-bucket/runs/hf"
  local_out = tmp_path / "local_hf"
  export.export_model(trained["model"], trained["config"], trained["tokenizer"], str(local_out),
                      min_pixels=VIEW_PIXELS, max_pixels=VIEW_PIXELS)
  remote = bucket / "runs" / "hf"
  assert sorted(os.listdir(remote)) == sorted(os.listdir(local_out))
  for name in os.listdir(local_out):
    assert (remote / name).read_bytes() == (local_out / name).read_bytes(), name
  # Weights before any JSON: a reader that waits for config.json never sees a half-written model.
  assert written.index("model.safetensors") < min(written.index(n) for n in written if n.endswith(".json"))
  again, _ = load_pretrained(str(remote))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(again, nnx.Param)), trained["params"])


@pytest.mark.slow
def test_demo_export_stage_writes_the_complete_directory(trained):
  result = eval_stages.run_export(trained["run_config"], str(trained["workdir"]))
  out = result["path"]
  assert result["exported"] == "sft"
  assert {"model.safetensors", "generation_config.json", "preprocessor_config.json", "chat_template.json",
          "tokenizer.json"} <= set(os.listdir(out))
  assert _json(os.path.join(out, "preprocessor_config.json"))["max_pixels"] == VIEW_PIXELS
  again, _ = load_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(again, nnx.Param)), trained["params"])


# ------------------------------------------------------------------------------ errors


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint path not found"):
    export.export_checkpoint(str(tmp_path / "nope"), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    export.export_checkpoint(str(tmp_path / "empty"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_cli_errors_exit_with_a_message(tmp_path, capsys):
  assert _tool("export_hf").main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
  assert "export_hf: error: checkpoint path not found" in capsys.readouterr().err
  assert _tool("import_hf").main(["--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
  assert "import_hf: error: HF model directory not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lone_checkpoint(tmp_path_factory):
  """A Checkpointer directory outside any work directory and without hf_assets/, of a micro model
  (4-pixel patches) that uses a small tokenizer; its config.json and tokenizer lie elsewhere. No compile."""
  root = tmp_path_factory.mktemp("lone")
  tokenizer = tok_lib.build_small_tokenizer(CORPUS, vocab_size=400)
  tokenizer.save_pretrained(str(root / "tokenizer"))
  ids = tok_lib.special_token_ids(tokenizer)
  micro = W.micro_config()
  cfg = micro.replace(text=dataclasses.replace(micro.text, vocab_size=len(tokenizer)),
                      image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
                      vision_start_token_id=ids["vision_start_token_id"],
                      vision_end_token_id=ids["vision_end_token_id"])
  cfg.save_pretrained(str(root / "model_config"))
  graphdef, _ = state_lib.abstract_model(cfg)
  params = W.host_params(cfg)
  state = state_lib.TrainState(graphdef, jax.tree.map(jax.numpy.asarray, params), optax.EmptyState(),
                               jax.numpy.zeros((), jax.numpy.int32), jax.random.PRNGKey(0))
  directory = str(root / "run")
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(directory, async_save=False)) as ckpt:
    ckpt.save(state, step=5)
  return dict(path=directory, config=cfg, params=params, config_file=str(root / "model_config" / "config.json"),
              tokenizer=str(root / "tokenizer"))


def test_library_export_of_any_checkpoint_given_its_config(lone_checkpoint, tmp_path):
  """The quick path: Checkpointer directory + config.json + tokenizer -> a directory transformers loads."""
  out = tmp_path / "hf"
  summary = export.export_checkpoint(lone_checkpoint["path"], str(out), config_path=lone_checkpoint["config_file"],
                                     tokenizer_path=lone_checkpoint["tokenizer"])
  assert summary["step"] == 5 and summary["sources"]["config"] == lone_checkpoint["config_file"]
  assert (summary["min_pixels"], summary["max_pixels"]) == (image_lib.DEFAULT_MIN_PIXELS, image_lib.DEFAULT_MAX_PIXELS)
  again, cfg = load_pretrained(str(out))
  assert cfg.text == lone_checkpoint["config"].text and cfg.vision == lone_checkpoint["config"].vision
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(again, nnx.Param)), lone_checkpoint["params"])
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out))
  assert hf.config.image_token_id == lone_checkpoint["config"].image_token_id
  eos = AutoTokenizer.from_pretrained(str(out)).eos_token_id
  assert GenerationConfig.from_pretrained(str(out)).eos_token_id[0] == eos
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    image = _image()
    got = AutoImageProcessor.from_pretrained(str(out))(images=[image])
  pv, grid = image_lib.preprocess_image(image, patch_size=4)
  np.testing.assert_array_equal(np.asarray(got["pixel_values"]), pv)
  np.testing.assert_array_equal(np.asarray(got["image_grid_thw"])[0], grid)
  # A second export replaces the first in place.
  export.export_checkpoint(lone_checkpoint["path"], str(out), config_path=lone_checkpoint["config_file"],
                           tokenizer_path=lone_checkpoint["tokenizer"], min_pixels=4096, max_pixels=8192)
  assert _json(out / "preprocessor_config.json")["max_pixels"] == 8192
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_missing_model_config_is_a_clear_error(lone_checkpoint, tmp_path):
  with pytest.raises(FileNotFoundError, match="pass --config"):
    export.export_checkpoint(lone_checkpoint["path"], str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="model config not found"):
    export.export_checkpoint(lone_checkpoint["path"], str(tmp_path / "out"), config_path=str(tmp_path / "missing.json"))
  assert not (tmp_path / "out").exists()


def test_checkpoint_not_matching_the_config_is_a_clear_error(lone_checkpoint, tmp_path):
  cfg = lone_checkpoint["config"]
  bigger = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, intermediate_size=96))
  with pytest.raises(ValueError, match="does not match the model config"):
    ckpt_lib.restore_params(lone_checkpoint["path"], bigger,
                          mesh=sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))


def test_wrong_tokenizer_is_a_clear_error():
  tokenizer = tok_lib.build_small_tokenizer(CORPUS, vocab_size=400)
  ids = tok_lib.special_token_ids(tokenizer)
  cfg = W.micro_config()
  with pytest.raises(ValueError, match="does not belong to this model"):
    export.check_tokenizer(tokenizer, cfg)  # the micro model's image token is 124, the tokenizer's 12
  cfg = cfg.replace(image_token_id=ids["image_token_id"], vision_start_token_id=ids["vision_start_token_id"],
                    vision_end_token_id=ids["vision_end_token_id"])
  with pytest.raises(ValueError, match="only 128"):
    export.check_tokenizer(tokenizer, cfg)


def test_parse_size():
  parse_size = _tool("export_hf").parse_size
  assert parse_size("5GB") == 5 * 10**9
  assert parse_size("500MiB") == 500 * 2**20
  assert parse_size("1000") == 1000
  with pytest.raises(Exception, match="not a size"):
    parse_size("5 lightyears")


# ------------------------------------------------------------------------------ import


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
  """A transformers-saved tiny random Qwen2.5-VL whose ids belong to a small tokenizer, with its side files."""
  tokenizer = tok_lib.build_small_tokenizer(CORPUS, vocab_size=400)
  ids = tok_lib.special_token_ids(tokenizer)
  base = ref.hf_config(tie=False)
  config = Qwen2_5_VLConfig(
      text_config={**base.text_config.to_dict(), "vocab_size": len(tokenizer)},
      vision_config=base.vision_config.to_dict(), image_token_id=ids["image_token_id"],
      vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
      video_token_id=ids["video_token_id"], tie_word_embeddings=False)
  hf = ref.hf_model(config)
  path = tmp_path_factory.mktemp("hf_source")
  hf.save_pretrained(str(path))
  tokenizer.save_pretrained(str(path))
  with open(path / "preprocessor_config.json", "w") as f:
    json.dump({"min_pixels": 3136, "max_pixels": 401_408, "patch_size": 14, "temporal_patch_size": 2,
               "merge_size": 2, "image_mean": list(image_lib.OPENAI_CLIP_MEAN),
               "image_std": list(image_lib.OPENAI_CLIP_STD), "image_processor_type": "Qwen2VLImageProcessor"}, f)
  return dict(path=path, hf=hf, tokenizer=tokenizer, ids=ids)


@pytest.mark.slow
def test_import_round_trip_same_logits_and_same_tensors(hf_source, tmp_path, capsys):
  src = hf_source["path"]
  ckpt = tmp_path / "imported"
  assert _tool("import_hf").main(["--hf", str(src), "--out", str(ckpt)]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["step"] == 0 and "tokenizer.json" in summary["copied"]
  assert {"config.json", "tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(ckpt / export.ASSETS_DIR))

  # Restore (params only) and compare logits with the transformers model on an input with an image.
  config = Qwen25VLConfig.from_pretrained(str(ckpt / export.ASSETS_DIR))
  model, step = ckpt_lib.restore_model(str(ckpt), config)
  assert step == 0
  rng = np.random.default_rng(0)
  grid = np.array([1, 4, 6])
  pv = rng.normal(size=(24, 1176)).astype(np.float32)
  ids = hf_source["ids"]
  input_ids = np.array([[20, 21, ids["vision_start_token_id"]] + [ids["image_token_id"]] * 6
                        + [ids["vision_end_token_id"], 30, 31, 32]])
  got = np.asarray(model(input_ids, pv, grid[None]))
  want = _hf_logits(hf_source["hf"], input_ids[0], pv, grid, ids["image_token_id"])
  assert np.abs(got - want).max() < TOL

  # Export the imported checkpoint with nothing but its hf_assets/: the same tensors, bit for bit.
  out = tmp_path / "reexport"
  summary = export.export_checkpoint(str(ckpt), str(out))
  assert summary["sources"]["config"].endswith(os.path.join(export.ASSETS_DIR, "config.json"))
  a = safetensors.numpy.load_file(str(src / "model.safetensors"))
  b = safetensors.numpy.load_file(str(out / "model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  pre = _json(out / "preprocessor_config.json")
  assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 401_408)
  assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == hf_source["tokenizer"].get_vocab()


def test_import_errors(hf_source, tmp_path):
  with pytest.raises(FileNotFoundError, match="HF model directory not found"):
    export.import_pretrained(str(tmp_path / "nope"), str(tmp_path / "out"))
  (tmp_path / "no_config").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    export.import_pretrained(str(tmp_path / "no_config"), str(tmp_path / "out"))
  (tmp_path / "taken" / "0").mkdir(parents=True)
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    export.import_pretrained(str(hf_source["path"]), str(tmp_path / "taken"))


@pytest.mark.slow
def test_transformers_agent_example_builds_our_prompts_and_runs_the_loop(trained, exported):
  """examples/transformers_agent.py: its inputs for a conversation with a crop are the ids and pixels of
  our chat template and image processing, and its loop ends an episode in transformers."""
  agent = _load("examples", "transformers_agent.py").Agent.load(exported["out"])
  scene = _image(5, (300, 180))
  traj = agent_lib.Trajectory(question="What is the digit on the red key?", images=[scene])
  turn, crop = agent_lib.execute_turn('<think>look</think><grounding>{"bbox_2d": [0.1, 0.2, 0.6, 0.9], '
                                      '"source": "original_image"}</grounding>', traj.images)
  traj.turns.append(turn)
  traj.images.append(crop)
  got = agent.inputs(traj)
  processed = [image_lib.preprocess_image(im, VIEW_PIXELS, VIEW_PIXELS) for im in traj.images]
  want = chat.tokenize_conversation(trained["tokenizer"], traj.to_messages(), [g for _, g in processed],
                                    add_generation_prompt=True)
  np.testing.assert_array_equal(got["input_ids"][0].numpy(), want["input_ids"])
  np.testing.assert_array_equal(got["pixel_values"].numpy(), np.concatenate([p for p, _ in processed]))
  np.testing.assert_array_equal(got["image_grid_thw"].numpy(), np.stack([g for _, g in processed]))
  done = agent.solve(scene, "What is the digit on the red key?", max_turns=1, max_new_tokens=4)
  assert done.num_turns == 1 and done.stop_reason in ("answer", "no_action", "max_turns")
