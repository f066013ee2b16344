"""Command line entry point.

  python -m mini_o3_jax.main --config configs/<name>.py --workdir DIR [--config.key=value ...]

The config (an `ml_collections` file) names the stages to run, in order; each stage reads and writes
the work directory, so a re-run resumes from what is already there.
"""

from __future__ import annotations

import json
import logging
import os
import time

from absl import app, flags
from ml_collections import config_flags

from mini_o3_jax.pipeline import STAGES, common, phases
from mini_o3_jax.train import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, reports and exports.")
flags.mark_flags_as_required(["config", "workdir"])


def _setup_logging(workdir: str, process_index: int = 0) -> None:
  """absl already logs to stderr; add a plain-text copy in the work directory.

  Library chatter (Orbax's per-save INFO lines go through absl, JAX's backend probing) is kept to
  warnings so the stage logs stay readable.
  """
  # One file per process: on a multi-host slice the work directory is shared.
  handler = logging.FileHandler(os.path.join(workdir, "log.txt" if process_index == 0 else f"log.{process_index}.txt"))
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  root.addHandler(handler)
  _quiet_library_loggers()


def _quiet_library_loggers() -> None:
  """Library chatter to warnings: Orbax's per-save INFO lines (through absl), and JAX's backend probing
  ("Unable to initialize backend 'tpu'" on a CPU machine), which runs when a backend is first touched."""
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)


def _apply_xla_flags(config) -> None:
  """Adds `config.xla_flags` to XLA_FLAGS; XLA reads them once, when the first backend starts."""
  extra = common.resolve(config).get("xla_flags") or ""
  if extra:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()


def _setup_compile_cache() -> None:
  """A persistent XLA compile cache: re-runs skip compilation (minutes on a small CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("MINI_O3_COMPILE_CACHE", os.path.expanduser("~/.cache/mini_o3_jax/xla"))
  if cache and cache != "0":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Settings a run's checkpoints depend on: a re-run in the same work directory must keep them.
CHECKPOINT_KEYS = ("model", "tokenizer", "view_pixels")


def changed_settings(old: dict, new: dict) -> list[str]:
  """The `CHECKPOINT_KEYS` whose settings differ between a recorded config and a new one.

  A section's key that the record lacks is not compared: it was added to the config after that run, and
  new keys default to the behaviour from before them, so an upgrade alone never strands a work directory.
  """
  def differs(a, b) -> bool:
    if isinstance(a, dict):
      return not isinstance(b, dict) or any(differs(v, b.get(k)) for k, v in a.items())
    return a != b
  return [k for k in CHECKPOINT_KEYS if differs(old.get(k), new.get(k))]


def record_config(config, workdir: str) -> None:
  """Writes WORKDIR/config.json, after checking that it does not contradict the run already there.

  When WORKDIR holds checkpoints and its config.json differs in `CHECKPOINT_KEYS`, the new settings
  could not resume (or export) them: refuse before anything is written, so the record of the run
  that made those checkpoints survives. The file is replaced atomically.
  """
  file = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2)
  new = json.loads(text)
  ckpt_dir = os.path.join(workdir, "ckpt")
  if os.path.exists(file) and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    with open(file) as f:
      old = json.load(f)
    changed = changed_settings(old, new)
    if changed:
      details = "; ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in changed)
      raise app.UsageError(f"{workdir} holds checkpoints of a run with other {', '.join(changed)} ({details}); "
                           "use a new --workdir, or the settings recorded in its config.json")
  tmp = file + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, file)


def main(argv) -> None:
  del argv
  # Resolved once, here: the quick preset under the flags the user typed, so config.json holds what ran.
  config = common.resolve(_CONFIG.value, config_flags.get_override_values(flags.FLAGS[_CONFIG.name]))
  if "://" in _WORKDIR.value:
    raise app.UsageError(f"--workdir {_WORKDIR.value}: the stages write through the file system; mount the "
                         "bucket (gcsfuse, as tpu/tpu.sh does) and pass the mounted path")
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  _apply_xla_flags(config)
  _quiet_library_loggers()
  # Before anything touches a backend: joins the other workers on a multi-host TPU slice (or the
  # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID env settings); a no-op on one host.
  distributed.maybe_initialize()
  _setup_logging(workdir, distributed.process_index())
  _setup_compile_cache()
  log = logging.getLogger("mini_o3_jax")
  # `--config.stages=sft,rl` arrives as the one-element tuple ('sft,rl',).
  runs = phases.runs_of(config.stages)
  try:
    phases.check(runs, STAGES, config.get("phases"))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if not runs:
    raise app.UsageError(f"--config.stages names no stage; known: {sorted(STAGES)}")
  record_config(config, workdir)
  for run in runs:
    log.info("stage %s: start", run.name)
    start = time.time()
    if run.phase:
      result = STAGES[run.stage](phases.configure(config, run), workdir, name=run.name)
    else:
      result = STAGES[run.stage](config, workdir)
    log.info("stage %s: done in %.1f s", run.name, time.time() - start)
    if result is not None:
      log.info("stage %s: %s", run.name, json.dumps(result, default=str))


if __name__ == "__main__":
  app.run(main)
