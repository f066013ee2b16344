"""Test setup: 8 fake CPU devices, XLA at -O0, float32 matmuls, a shared compile cache.

XLA_FLAGS must be set before jax is imported anywhere, hence module level here.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# Tests compile far more than they compute: XLA's -O0 compiles faster and runs tests/test_qwen3vl.py,
# test_rl_recipe.py and test_train_steps.py in 0.75x the time (numerics are the same code paths).
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
