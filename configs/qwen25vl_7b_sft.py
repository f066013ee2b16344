"""Cold-start SFT of Qwen2.5-VL-7B-Instruct on the released Mini-o3 cold-start trajectories (TPU).

  python -m mini_o3_jax.main --config configs/qwen25vl_7b_sft.py --workdir gs://.../runs/sft \\
      --config.data_dir=/mnt/data --config.model.init_from=/mnt/data/Qwen2.5-VL-7B-Instruct

Data: a local copy of `Mini-o3/Mini-o3-Coldstart-Dataset` (parquet, ~6k trajectories) in
`data_dir/datasets.coldstart`. Model: the HF checkpoint in `model.init_from` (or an Orbax directory
written by `tools/import_hf.py`). Full fine-tune, fp32 master weights and AdamW moments, bf16 compute,
full rematerialisation, the output head in chunks. Mesh and micro-batch follow docs/scaling.md
(`python tools/memory_plan.py --config configs/qwen25vl_7b_sft.py`): the target is v5p-32 (16 chips) as
(1, 4, 4), one row per chip (4 rows per micro-batch, 8 micro-batches per update); attention is splash
(`model.attention`), so activations grow linearly with the row. On v5p-64 use --config.sft.grad_accum_steps=4.

From the paper: the 2M / 40K pixel budget of every image and its 32,768-token cutoff (longer trajectories
are dropped). 32,768 tokens bound a row's images to 131,072 patches (4 patches per image token), the
largest patch bucket. Our choices (the paper does not give them): lr 1e-5 with 3% warmup and cosine
decay, 3 epochs of batch 32.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stages = ("sft", "export")
  c.seed = 0
  c.mesh = (1, -1, 4)  # (data, fsdp, tensor); -1 = the remaining chips
  c.min_pixels = 40_000
  c.max_pixels = 2_000_000

  c.data_dir = "/mnt/data"
  c.datasets = ml_collections.ConfigDict(dict(coldstart="Mini-o3-Coldstart-Dataset"))
  c.tokenizer = ml_collections.ConfigDict(dict(kind="qwen", vocab_size=0))
  c.model = ml_collections.ConfigDict(dict(
      preset="qwen25vl_7b", init_from="/mnt/data/Qwen2.5-VL-7B-Instruct",
      dtype="bfloat16", param_dtype="float32", remat="full"))

  c.data = ml_collections.ConfigDict(dict(
      source="coldstart",  # "synthetic": the demo's scripted trajectories
      limit=0,  # > 0: only the first rows (smoke runs)
      max_tokens=32768))  # the paper's cutoff: longer trajectories are dropped

  c.sft = ml_collections.ConfigDict(dict(
      steps=560, batch_size=32, grad_accum_steps=8, lr=1e-5, warmup_steps=17, end_lr_ratio=0.0,
      weight_decay=0.0, length_buckets=(4096, 8192, 16384, 32768), patch_buckets=(8192, 32768, 65536, 131072),
      logits_chunk=2048, train_vision=True, checkpoint_every=100, log_every=10))
  return c
