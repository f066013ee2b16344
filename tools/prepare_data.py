"""Builds the TFDS (ArrayRecord) copy of a benchmark from a local download and reports on it.

    python tools/prepare_data.py --dataset visualprobe --download_dir D --out_dir O

Prints, per split found in D: rows kept, rows skipped (missing image, unreadable image, malformed
row, with the first few named) and the category counts; then builds O/mini_o3_benchmarks/<dataset>/
unless --scan_only. Nothing is downloaded. Read the result with
``mini_o3_jax.data.grain_source(dataset, split, O)``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Sequence

try:
  from mini_o3_jax.data import benchmarks
except ImportError:  # run from a checkout without installing the package
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from mini_o3_jax.data import benchmarks

_SHOW_SKIPPED = 5


def scan(dataset: str, download_dir: str) -> dict[str, benchmarks.Benchmark]:
  """Reads every available split with skip_bad=True and prints what was found."""
  splits = benchmarks.available_splits(dataset, download_dir)
  missing = [s for s in benchmarks.BENCHMARK_SPLITS[dataset] if s not in splits]
  print(f"{dataset}: splits found {list(splits)}" + (f", not found {missing}" if missing else ""))
  found = {}
  for split in splits:
    bench = benchmarks.load_benchmark(dataset, split, download_dir, skip_bad=True)
    kinds = collections.Counter(s.kind for s in bench.skipped)
    print(f"  {split}: {len(bench)} rows kept, {bench.num_skipped} skipped "
          f"(missing image {kinds['missing']}, unreadable image {kinds['unreadable']}, "
          f"malformed {kinds['malformed']})")
    for skipped in bench.skipped[:_SHOW_SKIPPED]:
      print(f"    skipped {skipped.row}: {skipped.reason} [{skipped.file}]")
    if bench.num_skipped > _SHOW_SKIPPED:
      print(f"    ... and {bench.num_skipped - _SHOW_SKIPPED} more")
    categories = ", ".join(f"{c} {n}" for c, n in sorted(bench.category_counts().items()))
    print(f"    categories: {categories}")
    found[split] = bench
  return found


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--dataset", required=True, choices=sorted(benchmarks.BENCHMARK_SPLITS))
  parser.add_argument("--download_dir", required=True, help="the local download (manual dir)")
  parser.add_argument("--out_dir", required=True, help="TFDS data_dir to write into")
  parser.add_argument("--scan_only", action="store_true", help="report only; build nothing")
  parser.add_argument("--overwrite", action="store_true", help="rebuild an existing TFDS copy")
  args = parser.parse_args(argv)

  found = scan(args.dataset, args.download_dir)
  if not found:
    print(f"nothing to build: no {args.dataset} files in {args.download_dir}", file=sys.stderr)
    return 1
  if args.scan_only:
    return 0
  from mini_o3_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  builder = tfds_builders.build_benchmark(args.dataset, args.download_dir, args.out_dir,
                                          overwrite=args.overwrite)
  print(f"wrote {builder.data_dir}")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} examples")
  return 0


if __name__ == "__main__":
  sys.exit(main())
