"""Sampler benchmark: our JAX sampler vs `transformers` generate, prefix reuse vs recompute, compiles.

One run, one tiny model (`--family qwen2_5_vl`: the `tiny` preset, D=128, 4 layers, a 2-block vision
tower; `--family qwen3_vl`: `tiny_qwen3`, the same sizes with Qwen3-VL's structure and DeepStack) with the
same random weights in both frameworks (saved by us, loaded by transformers), the same prompts:

  1. single turn, batch B, greedy, every row has one image: prefill tokens/s and decode tokens/s of
     `mini_o3_jax.sampler.generate` (and its engine) vs `Qwen2_5_VLForConditionalGeneration.generate`;
  2. multi-turn cost: time of turn k (append observation k with its image, then decode a turn) with
     prefix reuse (our cache) vs recomputing the whole conversation from scratch each turn;
  3. compiled programs of a 32-turn crop rollout batch (continuous batching, scripted tool calls).

Usage:
  python tools/bench/sampler.py [--family qwen2_5_vl|qwen3_vl] [--batch 16] [--new_tokens 128] [--turns 16]
      [--threads 1] [--write docs/benchmarks.md]

--threads sets torch's thread count and, when 1, single-threaded XLA CPU. The default is 1: on a
shared 2-core machine torch's 2-thread pool spin-waits badly under load (measured: 1.0 s vs 7-15 s
for the same generate), so one thread each is the fair and stable comparison.
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
  parser.add_argument("--family", choices=("qwen2_5_vl", "qwen3_vl"), default="qwen2_5_vl")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--prompt_text", type=int, default=48)
  parser.add_argument("--turns", type=int, default=16)
  parser.add_argument("--multi_batch", type=int, default=8, help="slots in the multi-turn measurement")
  parser.add_argument("--turn_tokens", type=int, default=32)
  parser.add_argument("--rollout_turns", type=int, default=32)
  parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 also makes XLA single-threaded")
  parser.add_argument("--write", default=None, help="append the results to this markdown file")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None):
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.threads == 1:  # before JAX creates its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
  # JAX loads after the flags parse, so --help and a bad flag answer at once.
  import _sampler  # pylint: disable=g-import-not-at-top
  return _sampler.run(args)


if __name__ == "__main__":
  raise SystemExit(main())
