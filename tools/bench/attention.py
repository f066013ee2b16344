"""Attention benchmark: dense vs blockwise, compiled memory and step time from 1k to 16k tokens / patches.

Two workloads, each compiled for one CPU device in this process, dense and blockwise side by side:

  text    one causal self-attention layer call of a 7B-like head layout cut to fit a CPU (8 query heads,
          2 KV heads, head_dim 128; one row of T tokens, half of it padding-free, left-padded),
          forward alone and forward + backward (an SFT step's attention);
  vision  one full-attention call over the patches of ONE image (16 heads, head_dim 80, Qwen2.5-VL's
          vision layout), forward and forward + backward.

and a whole SFT-like step of the tiny VLM (`config.tiny`: 4 decoder layers, a 2-block vision tower with one
full-attention block; gradient of the token log-likelihood w.r.t. every parameter) over T text tokens
with a small image, and over one image of P patches (P / 4 image tokens), compiled only.

Temporary memory is XLA's `compiled.memory_analysis().temp_size_in_bytes` (deterministic: it does not
depend on the machine's load); times are the median of `--repeats` runs after one warm-up, skipped where
the dense score matrix would not fit this machine (`--time_limit_gib`).

Usage:
  python tools/bench/attention.py [--lengths 1024,4096,16384] [--block 512] [--repeats 3] [--time_max_length 4096]
      [--write docs/benchmarks.md]
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
  parser = cli.parser(__doc__)
  parser.add_argument("--lengths", default="1024,4096,16384", help="comma-separated lengths")
  parser.add_argument("--block", type=int, default=512, help="blockwise tile")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--time_limit_gib", type=float, default=6.0,
                      help="time only programs whose XLA temporaries are below this")
  parser.add_argument("--time_max_length", type=int, default=4096,
                      help="time only lengths up to this (a 16k blockwise step is minutes on one CPU core)")
  parser.add_argument("--write", help="append the tables to this markdown file")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None):
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # JAX loads after the flags parse, so --help and a bad flag answer at once.
  import _attention  # pylint: disable=g-import-not-at-top
  return _attention.run(args)


if __name__ == "__main__":
  raise SystemExit(main())
