"""Data: benchmark readers, TFDS/grain pipelines, cold-start data.

Names are resolved lazily so that importing the package pulls in neither TFDS nor pyarrow, and
each submodule stays independent of the others.
"""

import importlib
from typing import Any

_EXPORTS = {
    "load_benchmark": "benchmarks",
    "Benchmark": "benchmarks",
    "BenchmarkRecord": "benchmarks",
    "BenchmarkDataError": "benchmarks",
    "BENCHMARK_SPLITS": "benchmarks",
    "grain_source": "tfds_builders",
    "build_benchmark": "tfds_builders",
    "ColdStartRelease": "coldstart_release",
    "ColdStartTrajectory": "coldstart_release",
    "load_coldstart_release": "coldstart_release",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
