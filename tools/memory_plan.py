"""Per-device memory of a config (or a model preset) on TPU slices: what fits, on which mesh, with which micro-batch.

    python tools/memory_plan.py --config configs/qwen25vl_7b_sft.py                 # every default TPU shape
    python tools/memory_plan.py --config configs/qwen25vl_7b_rl.py --tpu v5p-32 --mesh 1,4,4
    python tools/memory_plan.py --config configs/qwen25vl_7b_rl.py --tpu v5p-8 --set rl.num_slots=16
    python tools/memory_plan.py --preset qwen25vl_7b --phase sft --seq_len 8192 --batch 32 --remat full
    python tools/memory_plan.py --config configs/qwen25vl_7b_sft.py --config configs/qwen25vl_7b_rl.py \\
        --config configs/qwen25vl_7b_eval.py --markdown            # the tables of docs/scaling.md

For each TPU shape the tool tries meshes in the order of `memory.candidate_meshes` (FSDP over every chip,
then fsdp x tensor, then a data axis) and micro-batches of 8, 4, 2, 1 rows per device, and reports the
first mesh on which one fits, with its largest micro-batch (`--mesh` evaluates one mesh instead). Sizes
are GiB per device; parameters, optimizer state and gradients are exact (see `mini_o3_jax.train.memory`),
activations, logits, vision tower and KV cache are estimates. Nothing is allocated and no TPU is needed.
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

DEFAULT_TPUS = ("v4-8", "v5e-8", "v5e-16", "v5e-32", "v5p-8", "v5p-32", "v5p-64")


def _mesh(text: str) -> tuple[int, int, int]:
  parts = text.split(",")
  if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
    raise argparse.ArgumentTypeError(f"--mesh wants data,fsdp,tensor, got {text!r}")
  return tuple(int(p) for p in parts)


def parse_args(argv: Sequence[str] | None = None):
  parser = cli.parser(__doc__)
  parser.add_argument("--config", action="append", default=[], help="a configs/*.py file (repeatable)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. rl.num_slots=16 (repeatable)")
  parser.add_argument("--preset", help="a model preset instead of a config (qwen25vl_7b, qwen25vl_3b, qwen3vl_8b, "
                                       "tiny, tiny_qwen3: run_config's presets)")
  parser.add_argument("--tpu", action="append", default=[], help=f"TPU type(s); default {', '.join(DEFAULT_TPUS)}")
  parser.add_argument("--mesh", type=_mesh, help="data,fsdp,tensor: evaluate this mesh only")
  parser.add_argument("--headroom", type=float, default=0.9, help="fraction of HBM a plan may use")
  parser.add_argument("--markdown", action="store_true", help="markdown tables (docs/scaling.md)")
  g = parser.add_argument_group("with --preset")
  g.add_argument("--phase", choices=("sft", "rl", "eval"), default="sft")
  g.add_argument("--dtype", default="bfloat16")
  g.add_argument("--param_dtype", default="float32")
  g.add_argument("--remat", choices=("none", "full", "dots"), default="full")
  g.add_argument("--batch", type=int, default=32, help="rows per optimizer update")
  g.add_argument("--grad_accum", type=int, default=1)
  g.add_argument("--seq_len", type=int, default=8192)
  g.add_argument("--patches", type=int, default=16384, help="padded vision patches per training row")
  g.add_argument("--logits_chunk", type=int, default=2048)
  g.add_argument("--slots", type=int, default=0, help="sampler slots (rl / eval)")
  g.add_argument("--context", type=int, default=16384, help="sampler max_context (rl / eval)")
  args = parser.parse_args(argv)
  if not args.config and not args.preset:
    parser.error("give --config or --preset")
  return parser, args


def main(argv: Sequence[str] | None = None) -> int:
  parser, args = parse_args(argv)
  # JAX loads after the flags parse, so --help and a bad flag answer at once.
  from mini_o3_jax import memory_plans  # pylint: disable=g-import-not-at-top
  from mini_o3_jax.train import memory  # pylint: disable=g-import-not-at-top
  if args.preset and args.preset not in memory_plans.PRESETS:
    parser.error(f"--preset {args.preset!r}: expected one of {sorted(memory_plans.PRESETS)}")
  tpus = args.tpu or list(DEFAULT_TPUS)
  mesh = memory.MeshShape(*args.mesh) if args.mesh else None
  runs = []
  for path in args.config:
    config = memory_plans.load_config(path, args.set)
    mcfg = memory_plans.model_config(config)
    runs += [(os.path.basename(path), mcfg, ph) for ph in memory_plans.phases(config, mcfg, mcfg.vision.patch_size**2)]
  if args.preset:
    mcfg = memory_plans.PRESETS[args.preset](dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat)
    phase = memory_plans.preset_phase(
        mcfg, args.phase, batch=args.batch, grad_accum=args.grad_accum, seq_len=args.seq_len, patches=args.patches,
        logits_chunk=args.logits_chunk, slots=args.slots or (0 if args.phase == "sft" else 64), context=args.context)
    runs.append((args.preset, mcfg, phase))
  for name, mcfg, phase in runs:
    rows = memory_plans.plans_for(mcfg, phase, tpus, mesh, args.headroom)
    print(memory_plans.render(name, mcfg, phase, rows, markdown=args.markdown))
  return 0


if __name__ == "__main__":
  sys.exit(main())
