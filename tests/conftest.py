"""Test setup: 8 fake CPU devices, XLA at -O0, float32 matmuls, a shared compile cache.

XLA_FLAGS must be set before jax is imported anywhere, hence module level here.
"""
import collections
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


# ------------------------------------------------------------------------------------- scheduling
# pyproject.toml runs the files on two workers, each file whole on one of them (`--dist loadfile`), in the
# order collected here (`--no-loadscope-reorder`; xdist's own order puts the files with the fewest tests last,
# and those were the two ~100 s quick demos, with the other worker idle). Longest first: the queue ends with
# short files, so the two workers finish together. Estimates from one-worker durations of full runs (longest
# first); the files not named are shorter and follow in xdist's order (most tests first). Only the order of
# whole files changes: the tests of a file run in their written order, as before.
LONG_FILES = (
    "test_demo.py", "test_rl_recipe.py", "test_qwen3vl.py", "test_real_configs.py", "test_coldstart_gen.py",
    "test_grounding.py", "test_bad_input.py", "test_export_tools.py", "test_train_steps.py", "test_synthetic.py",
    "test_train_multiprocess.py", "test_train_checkpoint.py", "test_sampler_rollout.py", "test_data_loader.py",
    "test_model_parity.py", "test_tiny_base.py", "test_objectness.py", "test_from_base.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  count = collections.Counter(item.path.name for item in items)
  # A stable sort on a key that is the same for every test of a file keeps each file's tests together.
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -count[item.path.name]))
