"""Can data loading keep up with training? Producer rates next to the SFT step's consumption rate.

Everything runs on this machine, one measurement at a time, in samples per second:

  SFT step            the jitted SFT step (`train.sft.make_sft_step`) of the demo-sized model on real
                      batches from the pipeline below, at the same batch size: what training consumes.
  grain SFT pipeline  trajectory -> chat template + tokenize + image preprocessing (`pipeline.
                      trajectory_example`) -> seeded shuffle -> batch + `collate_sft` (padding to the
                      demo's length / patch buckets, M-RoPE positions): the stages of `loader.batches`,
                      plus grain `mp_prefetch` with N worker processes. Two sources: the demo's in-memory
                      trajectories (images already at the view size), and a cold-start JSONL + PNG files
                      on disk at full resolution (what `coldstart.write_jsonl_with_images` / `coldstart_gen`
                      write and SFT would read).
  synthetic tasks     `synthetic.make_task` per tier (scene rendering).
  scripted cold-start `coldstart.scripted_coldstart` per tier (task + crops through the real crop tool).

The last column divides each producer's rate by the step's: >= 1 means that producer alone keeps up
with training on this machine. The step is timed inside the demo's SFT loop (`loader.batches` feeding
`make_sft_step`, as `run_sft` does, data fetched in the main process), which also gives the time the
loop waits for data; the producers are timed alone, best of a few rounds. The step's rate is its
fastest step (most demanding consumer), the producers' their mean over a round's batches (a
conservative ratio). Producers and the step share the cores when they overlap on a small CPU, so the
margin needs to be well above 1 there. On a shared machine wall times measure the neighbours as much
as the code; the CPU-time column (this process, all threads; worker processes not counted) is the
load-independent view: the data side's share of the loop's CPU work.

  JAX_PLATFORMS=cpu python tools/bench/data.py            # ~3 min on 2 cores
  JAX_PLATFORMS=cpu python tools/bench/data.py --quick    # ~1 min
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
  parser.add_argument("--quick", action="store_true", help="fewer trajectories, batches and workers")
  parser.add_argument("--batch_size", type=int, default=None, help="None: the demo's SFT batch (16)")
  parser.add_argument("--workers", default=None, help="comma-separated grain worker counts; None: 0,1,2 (0,2 with --quick)")
  parser.add_argument("--n_per_tier", type=int, default=None, help="trajectories per tier in the data set; None: 48 (16 with --quick)")
  parser.add_argument("--batches", type=int, default=None, help="timed pipeline batches per setting; None: 8 (3 with --quick)")
  parser.add_argument("--steps", type=int, default=None, help="SFT loop steps (new batch shapes compile, untimed); None: 12 (6 with --quick)")
  parser.add_argument("--rounds", type=int, default=None, help="producer measurements repeated, best kept; None: 2")
  parser.add_argument("--tasks", type=int, default=None, help="synthetic tasks timed per tier; None: 16 (4 with --quick)")
  parser.add_argument("--view_pixels", type=int, default=None, help="image budget; None: the demo's")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None):
  args = parse_args(argv)
  # JAX loads after the flags parse, so --help and a bad flag answer at once.
  import _data  # pylint: disable=g-import-not-at-top
  return _data.run(args)


if __name__ == "__main__":
  raise SystemExit(main())
