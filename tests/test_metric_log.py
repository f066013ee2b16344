"""The run's metric log: JSON lines a person can tail, TensorBoard scalars beside them, both resume-safe."""

import glob
import json
import os
import struct

from tensorboardX.proto import event_pb2

from mini_o3_jax.pipeline import common


def _scalars(directory: str) -> list[tuple[str, int, float]]:
  """(tag, step, value) of every scalar in the event files of `directory`, in file order (TFRecord
  framing: length u64, its crc u32, the Event proto, its crc u32)."""
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_metric_log_writes_jsonl_and_tensorboard_and_cuts_rerun_steps(tmp_path):
  file = str(tmp_path / "metrics" / "sft.jsonl")
  os.makedirs(os.path.dirname(file))
  log = common.MetricLog(file, 0)
  for step in (1, 2, 3):
    log.write(step, {"loss": 1.0 / step, "note": "text is not a scalar"})
  log.close()
  # A run resumed from step 2 re-runs step 3: the log keeps one row per step.
  log = common.MetricLog(file, 2)
  log.write(3, {"loss": 0.25})
  log.close()
  rows = [json.loads(line) for line in open(file)]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  scalars = _scalars(str(tmp_path / "tensorboard" / "sft"))
  assert [(t, s) for t, s, _ in scalars if t == "loss"] == [("loss", 1), ("loss", 2), ("loss", 3), ("loss", 3)]
  assert [v for t, s, v in scalars if t == "loss"][-1] == 0.25  # TensorBoard keeps this one (purge_step=3)
  assert {t for t, _, _ in scalars} == {"loss", "time_s"}
