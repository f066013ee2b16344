"""Static shapes for dynamic sizes: a size is padded up to a bucket, so `jax.jit` compiles once per bucket.

A leaf: training batches (`train.batch`), the sampler (`sampler.engine`) and the memory planner use it.
"""

from __future__ import annotations

from typing import Sequence


def bucket(n: int, buckets: Sequence[int] | None, *, what: str = "size", minimum: int = 1) -> int:
  """The smallest bucket >= n; with `buckets` None, the next power of two >= max(n, minimum).

  Raises:
    ValueError: n exceeds the largest bucket (`what` names the size in the message).
  """
  if buckets is None:
    b = minimum
    while b < n:
      b *= 2
    return b
  for b in sorted(buckets):
    if b >= n:
      return b
  raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)}")
