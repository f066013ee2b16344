"""Exports an Orbax train checkpoint as a Hugging Face Qwen2.5-VL directory (transformers, vLLM).

    python tools/export_hf.py --checkpoint WORKDIR/ckpt/rl --out /tmp/mini_o3_hf          # a run's stage
    python tools/export_hf.py --checkpoint WORKDIR/ckpt/sft/400 --out OUT --dtype bf16  # one step
    python tools/export_hf.py --checkpoint CKPT_DIR --config path/to/config.json --tokenizer TOK_DIR --out OUT

`--checkpoint` is a directory the train `Checkpointer` wrote (its latest step is exported) or one of its
step directories. The model config, tokenizer and pixel budget come from, in order: the flags, the
checkpoint's `hf_assets/` (written by tools/import_hf.py), the run config in the work directory around
`WORKDIR/ckpt/<stage>` (demo sizes, a preset or `model.init_from`; its pixel budget) and its tokenizer/;
the tokenizer falls back to the real Qwen2.5 one (built offline).

The output holds safetensors (sharded with an index above --max-shard-size), config.json,
generation_config.json, preprocessor_config.json, the tokenizer and the chat template, and loads with
`Qwen2_5_VLForConditionalGeneration.from_pretrained(OUT)`, `AutoTokenizer`, `AutoImageProcessor`
(`AutoProcessor` as well where torchvision is installed) and `vllm serve OUT`. A gs:// --out is staged
in a local temporary directory, then copied with etils.epath (needs a GCS-capable epath backend).
--out must be new, empty or a previous export (anything else is refused unless --overwrite); the
export is staged beside it and swapped in whole, so a failed export leaves the old one intact.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

try:
  from mini_o3_jax import cli
except ImportError:  # run from a checkout without installing the package
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from mini_o3_jax import cli

DTYPES = cli.DTYPES
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
  """"5GB" -> 5e9 bytes, "500MiB" -> 500 * 2**20, "1000" -> 1000 (transformers' convention)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
  if not m or m.group(2).upper() not in _UNITS:
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = cli.parser(__doc__)
  p.add_argument("--checkpoint", required=True, help="Checkpointer directory or one of its step directories")
  p.add_argument("--out", required=True, help="output directory (local or gs://)")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
  p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest safetensors file")
  p.add_argument("--config", help="HF config.json of the model (file or directory)")
  p.add_argument("--tokenizer", help="tokenizer directory")
  p.add_argument("--min-pixels", type=int, help="image budget for preprocessor_config.json")
  p.add_argument("--max-pixels", type=int, help="image budget for preprocessor_config.json")
  p.add_argument("--overwrite", action="store_true",
                 help="replace --out even when it is not empty and not a previous export")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from mini_o3_jax import export  # pylint: disable=g-import-not-at-top  (JAX loads after the flags parse)
  return export.run_cli("export_hf", lambda: export.export_checkpoint(
      args.checkpoint, args.out, config_path=args.config, tokenizer_path=args.tokenizer,
      dtype=DTYPES[args.dtype], max_shard_bytes=args.max_shard_size, min_pixels=args.min_pixels,
      max_pixels=args.max_pixels, overwrite=args.overwrite))


if __name__ == "__main__":
  sys.exit(main())
