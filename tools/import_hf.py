"""Imports a downloaded Hugging Face Qwen2.5-VL directory as an Orbax checkpoint training starts from.

    huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir /data/Qwen2.5-VL-7B-Instruct  # yourself
    python tools/import_hf.py --hf /data/Qwen2.5-VL-7B-Instruct --out /ckpt/qwen25vl_7b_init [--dtype bf16]

Writes, with the train `Checkpointer`, step 0 of a checkpoint holding the params only (an empty
optimizer state). An SFT run starts from it with `--config.model.init_from=/ckpt/qwen25vl_7b_init` (see
configs/qwen25vl_7b_sft.py; the model config is read from its hf_assets/config.json), or in code with

    from mini_o3_jax.train import checkpoint
    config = VLMConfig.from_pretrained("/ckpt/qwen25vl_7b_init/hf_assets")
    params, _ = checkpoint.restore_params("/ckpt/qwen25vl_7b_init", config, mesh=mesh)  # any dtype, any mesh
    state, shardings, tx = state_lib.create_train_state(config, make_tx, mesh, params=params)

`init_from` also takes the HF directory itself; importing once pays off when many runs start from the
same weights or the HF files sit far from the TPU VM (OUT may be gs://). The weights are read tensor
slice by tensor slice into the sharded device arrays (`model.hf.load_pretrained`), so a 7B model never
exists twice in host memory; the mesh spans every local device.

The HF side files (config.json, generation / preprocessor configs, tokenizer files, chat template) are
copied into OUT/hf_assets/, where tools/export_hf.py finds them when exporting OUT itself; a checkpoint
of a run started from OUT is exported from its work directory, or with `--config OUT/hf_assets
--tokenizer OUT/hf_assets`.
`--dtype` is the stored dtype (fp32 by default: the fp32 master weights training keeps; bf16 halves the
size; a restore converts to whatever its target asks for). On gs:// Orbax writes the arrays and the side
files go through etils.epath (untested here: the tests cover local paths).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

try:
  from mini_o3_jax import cli
except ImportError:  # run from a checkout without installing the package
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from mini_o3_jax import cli

DTYPES = cli.DTYPES


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = cli.parser(__doc__)
  p.add_argument("--hf", required=True, help="a local HF Qwen2.5-VL model directory")
  p.add_argument("--out", required=True, help="new checkpoint directory (local or gs://)")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the stored params")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from mini_o3_jax import export  # pylint: disable=g-import-not-at-top  (JAX loads after the flags parse)
  return export.run_cli("import_hf", lambda: export.import_pretrained(args.hf, args.out, dtype=DTYPES[args.dtype]))


if __name__ == "__main__":
  sys.exit(main())
