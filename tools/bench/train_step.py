"""Benchmark of the sharded SFT and GRPO steps: step time, tokens/s and model FLOPs utilisation.

MFU = model FLOPs per step / step time / (peak FLOP/s per device x devices). The peak is measured in
the same run with a large matmul in the compute dtype (--peak_tflops overrides it, e.g. the data-sheet
number of a TPU). Model FLOPs are counted analytically (6 x matmul params x tokens for forward +
backward, plus causal attention, plus the vision tower, plus the reference forward when the KL term is
on); rematerialisation is not counted, as is usual for MFU. (XLA's `cost_analysis` is not used: it
counts a `lax.scan` body once, not once per layer.)

CPU (the small default):
  JAX_PLATFORMS=cpu python tools/bench/train_step.py
TPU, Qwen2.5-VL-7B SFT at 8k tokens per sequence, FSDP over all chips:
  python tools/bench/train_step.py --config 7b --batch_per_device 1 --seq_len 8192 --dtype bfloat16 \\
      --remat full --logits_chunk 2048 --mesh 1,-1,1 --modes sft,rl --steps 5
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

try:
  from mini_o3_jax import cli
except ImportError:  # run from a checkout without installing the package
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from mini_o3_jax import cli


def parse_args(argv: Sequence[str] | None = None):
  parser = cli.parser(__doc__, whole_doc=True)
  parser.add_argument("--config", default="small", choices=["small", "3b", "7b"])
  parser.add_argument("--modes", default="sft,rl")
  parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (one -1 = the rest)")
  parser.add_argument("--batch_per_device", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--images_per_row", type=int, default=1)
  parser.add_argument("--grid", default="1,8,8", help="t,h,w patches of each image")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  parser.add_argument("--logits_chunk", type=int, default=None)
  parser.add_argument("--grad_accum", type=int, default=1)
  parser.add_argument("--kl_coef", type=float, default=0.0, help="RL: > 0 adds the reference forward")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (the fastest is reported)")
  parser.add_argument("--warmup", type=int, default=1, help="steps after the compiling one, untimed")
  parser.add_argument("--peak_matmul", type=int, default=1024, help="matmul size for the peak measurement")
  parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak, instead of measuring")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None):
  args = parse_args(argv)
  # JAX loads after the flags parse, so --help and a bad flag answer at once.
  import _train_step  # pylint: disable=g-import-not-at-top
  return _train_step.run(args)


if __name__ == "__main__":
  raise SystemExit(main())
