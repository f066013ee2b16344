"""Two `jax.distributed` processes on 127.0.0.1 (4 CPU devices each) train like one process with 8."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import train_worker as W  # noqa: E402

from mini_o3_jax import sharding  # noqa: E402
from mini_o3_jax.train import distributed  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  port = portpicker.pick_unused_port()
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, "multiprocess", "--process_id", str(i), "--num_processes", "2",
                             "--port", str(port), "--out", str(tmp_path), "--steps", str(STEPS)],
                            env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]

  # Meanwhile, the same run in this process on one 8-device mesh.
  mesh = sharding.make_mesh((2, 2, 2))
  want_losses, state, _ = W.run_sft_steps(mesh, distributed.host_rows(mesh, 8), STEPS)
  want_sums = W.param_checksums(state.params)

  for p in procs:
    try:
      p.wait(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for f in logs:
    f.close()
  for i, p in enumerate(procs):
    assert p.returncode == 0, (tmp_path / f"worker{i}.log").read_text()[-4000:]
  result = json.loads((tmp_path / "result.json").read_text())
  assert result["process_count"] == 2
  assert result["rows"] == [0, 1, 2, 3]  # process 0 fed the first half of the global batch
  np.testing.assert_allclose(result["losses"], want_losses, rtol=1e-5)
  assert result["losses"][-1] < result["losses"][0]
  assert result["checksums"].keys() == want_sums.keys()
  for k, v in want_sums.items():
    np.testing.assert_allclose(result["checksums"][k], v, rtol=1e-4, atol=1e-4, err_msg=k)
  assert jax.process_count() == 1  # this process never joined the distributed run
