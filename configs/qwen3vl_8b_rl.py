"""The Qwen2.5-VL-7B rl recipe (configs/qwen25vl_7b_rl.py) on Qwen3-VL-8B-Instruct (TPU).

  python -m mini_o3_jax.main --config configs/qwen3vl_8b_rl.py --workdir gs://.../runs/rl \\
      --config.data_dir=/mnt/data --config.model.init_from=/mnt/data/Qwen3-VL-8B-Instruct

Everything but the backbone and the mesh is the 7B config's: data, pixel budget, schedule. Qwen3-VL's images are
cut into 16-pixel patches (a 2M-pixel image is 7,812 patches instead of 10,204), normalised with its
processor's mean = std = 0.5; the pipeline takes both from the model config. The memory plan for these
settings is in docs/scaling.md (`python tools/memory_plan.py --config configs/qwen3vl_8b_rl.py`): on v5p-32
the 7B config's (1, 4, 4) is tight here (88 GiB per chip, the update's fp32 pixels of 1,536 values per
patch), FSDP over all 16 chips fits (69 GiB).
"""

import ml_collections

from configs import qwen25vl_7b_rl


def get_config() -> ml_collections.ConfigDict:
  c = qwen25vl_7b_rl.get_config()
  c.model.preset = "qwen3vl_8b"
  c.model.init_from = "/mnt/data/Qwen3-VL-8B-Instruct"
  c.mesh = (1, -1, 1)
  c.rl.grad_accum_steps = 32  # 512 rows per update: one row per chip per micro-batch
  return c
