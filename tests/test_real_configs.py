"""The Qwen2.5-VL-7B configs: they load and hold the paper's settings, and each runs end to end through
`python -m mini_o3_jax.main`, shrunk to the tiny model preset, on fixtures in the releases' on-disk layouts
(cold-start parquet, VisualProbe JSON + images, V* JSON + images, HR-Bench parquet)."""

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import test_benchmarks as tb  # noqa: E402  (fixture writers in the release layouts)
import test_coldstart_release as tc  # noqa: E402

from mini_o3_jax.pipeline import sources  # noqa: E402
from mini_o3_jax import memory_plans, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {name: os.path.join("configs", f"qwen25vl_7b_{name}.py") for name in ("sft", "rl", "eval")}

# Shrinks any of the three configs to CPU size: the tiny preset, tiny images, fp32, no remat.
TINY = ["--config.mesh=(1,-1,1)", "--config.min_pixels=3136", "--config.max_pixels=12544",
        "--config.model.dtype=float32", "--config.model.param_dtype=float32", "--config.model.remat=none"]


def _run(config: str, workdir, *overrides):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "mini_o3_jax.main", "--config", CONFIGS[config], "--workdir",
                         str(workdir), *TINY, *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1200)


# ------------------------------------------------------------------------------ fixtures (release layouts)

def write_coldstart(root, n: int = 4) -> None:
  """`Mini-o3-Coldstart-Dataset/data/train-*.parquet`: ShareGPT turns (as a Python literal) + images."""
  one = tc._turns(("human", tc._QUESTION), ("gpt", tc._ANSWER))
  rows = [(repr(tc._two_image_turns()), [tc._png(2 * i), tc._png(2 * i + 1)]) if i % 2 == 0
          else (json.dumps(one), [tc._png(2 * i)]) for i in range(n)]
  os.makedirs(root / "data")
  pq.write_table(pa.table({
      "conversations": [r[0] for r in rows],
      "images": pa.array([[{"bytes": b, "path": f"{i}_{k}.png"} for k, b in enumerate(r[1])]
                          for i, r in enumerate(rows)], type=tc._IMAGES),
      "data_source": ["minio3"] * n, "sample_index": list(range(n)), "rollout_index": [0] * n,
  }), root / "data" / "train-00000-of-00001.parquet")


def write_visualprobe(root) -> None:
  """`VisualProbe_{train,Easy,Medium,Hard}/{train,val}.json` + `data/*.jpg`, paths relative to `root`."""
  for split, folder, n in (("train", "VisualProbe_train", 4), ("easy", "VisualProbe_Easy", 2),
                           ("medium", "VisualProbe_Medium", 2), ("hard", "VisualProbe_Hard", 3)):
    rows = []
    for i in range(n):
      name = f"visual_probe_{split}_{i}.jpg"
      tb._write(root / folder / "data" / name, tb._image_bytes(100 * len(split) + i))
      rows.append(tb._vp_row(folder, name, i, f"What is written on sign {i}?", f"{i}C7{i}", f"visual_probe_{split}"))
    tb._write_json(root / folder / ("train.json" if split == "train" else "val.json"), rows)


def write_vstar(root) -> None:
  """`direct_attributes/` and `relative_position/`: `sa_X.jpg` + `sa_X.json` (correct option first)."""
  for category, options in (("direct_attributes", ["red", "blue", "green", "white"]),
                            ("relative_position", ["left", "right"])):
    for i in range(2):
      stem = root / category / f"sa_{len(category)}{i}"
      tb._write(f"{stem}.jpg", tb._image_bytes(len(category) + i))
      tb._write_json(f"{stem}.json", {"target_object": ["cup"], "bbox": [[1, 2, 3, 4]],
                                      "question": f"What about the cup {i}?", "options": options})


def write_hrbench(root) -> None:
  """`hr_bench_4k.parquet` / `hr_bench_8k.parquet`: 1 question x 4 option rotations, base64 JPEG."""
  os.makedirs(root, exist_ok=True)
  for size in ("4k", "8k"):
    image = base64.b64encode(tb._image_bytes(7 if size == "4k" else 8)).decode()
    pq.write_table(tb._hr_table([image] * 4, list("ABCD")), root / f"hr_bench_{size}.parquet")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One download folder in the configs' default layout (`config.datasets`)."""
  root = tmp_path_factory.mktemp("data")
  write_coldstart(root / "Mini-o3-Coldstart-Dataset")
  write_visualprobe(root / "VisualProbe")
  write_vstar(root / "vstar_bench")
  write_hrbench(root / "HR-Bench")
  return root


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """A random tiny Qwen2.5-VL with the real Qwen vocabulary and token ids, saved as an HF directory."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mini_o3_jax.model import Qwen25VL, config as config_lib  # pylint: disable=g-import-not-at-top
  from mini_o3_jax.model.hf import save_pretrained  # pylint: disable=g-import-not-at-top
  from mini_o3_jax.processing import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  ids = run_config.special_ids("qwen")
  cfg = config_lib.tiny(len(tok_lib.build_qwen_tokenizer()),
                        **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                               "vision_end_token_id")})
  path = tmp_path_factory.mktemp("tiny_hf")
  save_pretrained(Qwen25VL(cfg, rngs=nnx.Rngs(0)), cfg, str(path))
  return path


# ------------------------------------------------------------------------------ the configs themselves

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_loads_and_validates(name):
  config = memory_plans.load_config(os.path.join(ROOT, CONFIGS[name]))
  assert config.tokenizer.kind == "qwen" and config.model.preset == "qwen25vl_7b" and config.model.init_from
  assert len(config.mesh) == 3 and list(config.mesh).count(-1) == 1 and 16 % np.prod([m for m in config.mesh if m > 0]) == 0
  assert config.min_pixels == 40_000
  mcfg = memory_plans.model_config(config)  # the preset, checked against the real tokenizer's ids
  assert mcfg.text.vocab_size == 152064 and mcfg.image_token_id == 151655 and mcfg.dtype == "bfloat16"
  (phase,) = memory_plans.phases(config, mcfg)
  assert phase.name == name
  if name == "sft":
    assert config.data.source == "coldstart" and config.stages[0] == "sft" and config.max_pixels == 2_000_000
    assert config.sft.batch_size % config.sft.grad_accum_steps == 0
    assert max(config.sft.patch_buckets) >= 4 * config.data.max_tokens  # no row can overflow the buckets
  elif name == "rl":
    c = config.rl
    assert (c.source, c.split, c.max_turns, c.group_size, c.lr, c.clip_low, c.clip_high, c.temperature) == (
        "visualprobe", "train", 6, 16, 1e-6, 0.2, 0.3, 1.0)
    assert c.max_context == 16384 and max(c.length_buckets) >= c.max_context
    assert not c.exclude_masked_from_stats and (c.prompts_per_step * c.group_size) % c.grad_accum_steps == 0
    # Every image of a row fits: at most max_images of max_pixels each, and never more patches than 4 per
    # token of the row's context (7 x 10,204 patches of 2M-pixel images exceed 4 x 16,384).
    assert max(c.patch_buckets) >= min(c.max_images * (config.max_pixels // 196), 4 * c.max_context)
  else:
    c = config.eval
    assert set(c.benchmarks) == {"visualprobe/easy", "visualprobe/medium", "visualprobe/hard", "vstar/test",
                                 "hrbench_4k/test", "hrbench_8k/test"}
    assert max(c.budgets) == 32 and c.max_context == 32768 and c.temperature == 1.0
    assert dict(c.samples_per_task) == {"visualprobe": 32, "vstar": 32, "hrbench_4k": 8, "hrbench_8k": 8}
    assert config.max_pixels == 2_000_000


# ------------------------------------------------------------------------------ end to end, shrunk

@pytest.fixture(scope="module")
def sft_run(data_dir, tmp_path_factory):
  """The SFT config for 2 steps of tiny-preset training on the cold-start fixture, then its export."""
  workdir = tmp_path_factory.mktemp("sft")
  proc = _run("sft", workdir, f"--config.data_dir={data_dir}", "--config.model.preset=tiny",
              "--config.model.init_from=", "--config.sft.steps=2", "--config.sft.batch_size=2",
              "--config.sft.grad_accum_steps=2", "--config.sft.warmup_steps=0", "--config.sft.logits_chunk=64",
              "--config.sft.length_buckets=(128,256)", "--config.sft.patch_buckets=(64,128)",
              "--config.sft.checkpoint_every=1", "--config.sft.log_every=1", "--config.data.max_tokens=256")
  return workdir, proc


@pytest.mark.slow
def test_sft_config_runs_on_the_coldstart_release(sft_run):
  workdir, proc = sft_run
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "cold-start release" in proc.stderr and "4 trajectories" in proc.stderr
  rows = [json.loads(line) for line in open(workdir / "metrics" / "sft.jsonl")]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  assert sorted(os.listdir(workdir / "ckpt" / "sft")) == ["1", "2"]
  assert (workdir / "hf_export" / "config.json").exists() and (workdir / "hf_export" / "tokenizer.json").exists()


@pytest.mark.slow
def test_rl_config_runs_on_visualprobe_train(data_dir, tiny_hf, tmp_path):
  proc = _run("rl", tmp_path, f"--config.data_dir={data_dir}", f"--config.model.init_from={tiny_hf}",
              "--config.rl.steps=1", "--config.rl.prompts_per_step=2", "--config.rl.group_size=2",
              "--config.rl.grad_accum_steps=2", "--config.rl.num_slots=4", "--config.rl.max_context=512",
              "--config.rl.max_turn_tokens=8", "--config.rl.length_buckets=(512,)",
              "--config.rl.patch_buckets=(448,)", "--config.rl.chunk_buckets=(64,256)",
              "--config.rl.patch_buckets_per_image=(64,)", "--config.rl.decode_steps=4",
              "--config.rl.logits_chunk=64", "--config.rl.checkpoint_every=1",
              # The recipe's switches at toy sizes: 2 mini-batches of one group, one extra dynamic draw.
              "--config.rl.mini_batches=2", "--config.rl.dynamic_sampling_max_rounds=1")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"init from the HF checkpoint {tiny_hf}" in proc.stderr
  (row,) = [json.loads(line) for line in open(tmp_path / "metrics" / "rl.jsonl")]
  assert row["step"] == 1 and 0.0 <= row["rollout_accuracy"] <= 1.0 and np.isfinite(row["loss"])
  assert row["updates"] == 2.0 and "first_approx_kl" in row and "sampler_logprob_gap" in row
  assert row["dynamic_rounds"] <= 1 and "dynamic_groups_kept" in row
  assert os.listdir(tmp_path / "ckpt" / "rl") == ["1"]


@pytest.mark.slow
def test_eval_config_runs_on_every_benchmark(data_dir, sft_run, tmp_path):
  sft_workdir, sft_proc = sft_run
  assert sft_proc.returncode == 0, sft_proc.stderr[-4000:]
  ckpt = sft_workdir / "ckpt" / "sft"  # an Orbax Checkpointer directory as init_from
  proc = _run("eval", tmp_path, f"--config.data_dir={data_dir}", f"--config.model.init_from={ckpt}",
              "--config.model.preset=tiny", "--config.model.param_dtype=float32",
              "--config.eval.budgets=(1,2)", "--config.eval.num_slots=4", "--config.eval.max_context=512",
              "--config.eval.max_turn_tokens=8", "--config.eval.chunk=1", "--config.eval.chunk_buckets=(64,256)",
              "--config.eval.patch_buckets_per_image=(64,)", "--config.eval.decode_steps=4",
              "--config.eval.samples_per_task.visualprobe=2", "--config.eval.samples_per_task.vstar=1",
              "--config.eval.samples_per_task.hrbench_4k=1", "--config.eval.samples_per_task.hrbench_8k=1",
              "--config.eval.viewer_examples=1")
  assert proc.returncode == 0, proc.stderr[-4000:]
  metrics = json.load(open(tmp_path / "metrics.json"))
  n = {r["tier"]: r["n"] for r in metrics["eval"] if r["max_turns"] == 2}
  # Avg@K rows: questions x K samples; HR-Bench keeps all 4 option rotations.
  assert n == {"visualprobe/easy": 4, "visualprobe/medium": 4, "visualprobe/hard": 6, "vstar/test": 4,
               "hrbench_4k/test": 4, "hrbench_8k/test": 4}
  assert {r["model"] for r in metrics["eval"]} == {"mini_o3_7b"}
  assert metrics["settings"]["min_pixels"] == 3136 and metrics["settings"]["option_seed"] == 0
  lines = open(tmp_path / "eval" / "mini_o3_7b" / "vstar_test.jsonl").read().splitlines()
  assert len(lines) == 4 and all(json.loads(x)["options"] for x in lines)
