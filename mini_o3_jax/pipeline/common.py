"""What the demo stages share: resolving the config (quick preset, flags), the mesh, paths, tokenizer, metric logs."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import tensorboardX

from mini_o3_jax import agent, run_config
from mini_o3_jax.agent import prompts
from mini_o3_jax.data import coldstart, synthetic
from mini_o3_jax.processing import chat
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax import sharding as sharding_lib


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, key = dotted.split(".")
  node = config
  for name in parents:
    if name not in node:
      node[name] = ml_collections.ConfigDict()
    node = node[name]
  node[key] = value


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{dotted name: value} of a nested mapping's leaves."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def resolve(config: ml_collections.ConfigDict, explicit: Mapping[str, Any] | None = None
            ) -> ml_collections.ConfigDict:
  """The config that runs: its `quick_preset` applied when `config.quick` is set, `explicit` over it.

  `explicit` maps dotted names to the values given on the command line (`config_flags`'
  `get_override_values`): a flag the user typed wins over the preset. Idempotent (the result is
  marked `quick_applied`), so stages may call it on a config `main` has resolved already.
  """
  if not config.get("quick", False) or config.get("quick_applied", False):
    return config
  preset = config.get("quick_preset")
  if not preset:
    raise ValueError("config.quick=True, but this config has no quick_preset (configs/demo.py has one)")
  c = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in {**_leaves(preset.to_dict()), **(explicit or {})}.items():
    _set(c, dotted, value)
  c.quick_applied = True
  return c


def setup(config, workdir: str):
  """What every model stage starts from: (resolved config, tokenizer, model config, mesh)."""
  config = resolve(config)
  tokenizer = build_tokenizer(config, workdir)
  mesh = sharding_lib.make_mesh(tuple(config.get("mesh") or (1, -1, 1)))
  return config, tokenizer, run_config.model_config(config, tokenizer), mesh


def sampler_mesh(config, mesh):
  """The mesh the sampler shards its slots over: the run's, when the config names one (else one device)."""
  return mesh if config.get("mesh") else None


def path(workdir: str, *parts: str) -> str:
  p = os.path.join(workdir, *parts)
  os.makedirs(os.path.dirname(p), exist_ok=True)
  return p


# Fixed protocol text becomes single tokens of the small tokenizer: a tiny model gains nothing from
# spelling out the instructions, and the short context lets many turns fit. Each phrase is read from where
# the text is written (the prompts, the chat template's system prompt, the scripted explorer, the no-tools
# policy); the number fragments are the boxes' "0.xx" / "1.00".
PHRASES = (*prompts.fixed_phrases(), chat.DEFAULT_SYSTEM_PROMPT, *coldstart.fixed_phrases(),
           prompts.DIRECT_ANSWER_THOUGHT, ", 0.", "0.", ", 1.00", "1.00")


def _message_text(message: dict) -> str:
  content = message["content"]
  if isinstance(content, str):
    return content
  return "".join(c.get("text", "") for c in content)


def build_tokenizer(config, workdir: str):
  """The demo's small BPE (special tokens first, protocol phrases as single tokens), saved in workdir.

  With `config.tokenizer.kind = "qwen"`, the real Qwen2.5 tokenizer instead (built offline, not saved).
  A `model.init_from` HF directory with a tokenizer (the pretrained base) brings its own: its ids are
  the ones its weights were trained on.
  """
  if config.tokenizer.get("kind", "small") == "qwen":
    return tok_lib.build_qwen_tokenizer()
  out = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(out, "tokenizer.json")):
    return tok_lib.load_tokenizer(out)
  init_from = config.model.get("init_from") or ""
  if init_from and os.path.isfile(os.path.join(init_from, "tokenizer.json")):
    tok_lib.load_tokenizer(init_from).save_pretrained(out)
    return tok_lib.load_tokenizer(out)  # read back: the same object a resumed stage reads
  corpus = []
  for tier in synthetic.TIERS:
    for traj in coldstart.scripted_coldstart(tier, 40, split="train", task_config=run_config.task_config(config)):
      corpus += [_message_text(m) for m in traj.to_messages()]
  corpus += [f"<answer>{d}</answer>" for d in "0123456789"] * 20
  tokenizer = tok_lib.build_small_tokenizer(corpus, vocab_size=config.tokenizer.vocab_size,
                                            protocol_tokens=tok_lib.PROTOCOL_TOKENS + PHRASES)
  tokenizer.save_pretrained(out)
  return tok_lib.load_tokenizer(out)


def tensorboard_writer(directory: str, purge_step: int | None = None) -> tensorboardX.SummaryWriter | None:
  """A TensorBoard event writer in `directory` on process 0 (None elsewhere: one writer per run).

  purge_step: a resumed stage re-runs the steps after its checkpoint; TensorBoard drops the earlier
  run's events from this step on, so each step is shown once.
  """
  if jax.process_index() != 0:
    return None
  # The suffix keeps a file of its own per writer: the default name has 1-second resolution, and a run
  # resumed within that second would truncate its predecessor's events.
  return tensorboardX.SummaryWriter(directory, purge_step=purge_step, flush_secs=30,
                                    filename_suffix=f".{time.time_ns()}")


class MetricLog:
  """Appends one JSON line per logged step (a person can `tail -f` it; plots read it), and writes the
  numeric metrics as TensorBoard scalars in `WORKDIR/tensorboard/<stage>` (`tensorboard --logdir WORKDIR`)."""

  def __init__(self, file: str, start_step: int):
    """Appends to `file` (`WORKDIR/metrics/<stage>.jsonl`); rows past `start_step` (the step a stage
    resumes from) are dropped first.

    Those rows were logged by a run that died before its next checkpoint: the steps run again, and
    without the cut the log would hold them twice.
    """
    self.file = file
    self.start = time.time()
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(file)))
    stage = os.path.splitext(os.path.basename(file))[0]
    self.events = tensorboard_writer(os.path.join(workdir, "tensorboard", stage), purge_step=start_step + 1)
    rows = read_jsonl(file) if os.path.exists(file) else []
    kept = [row for row in rows if row.get("step", 0) <= start_step]
    if len(kept) < len(rows):
      tmp = file + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
      os.replace(tmp, file)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": int(step), "time_s": round(time.time() - self.start, 2)}
    row.update({k: (float(v) if isinstance(v, (np.floating, np.integer, float, int)) else v)
                for k, v in metrics.items()})
    with open(self.file, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.events is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self.events.add_scalar(key, value, global_step=step)
      self.events.flush()

  def close(self) -> None:
    if self.events is not None:
      self.events.close()


def read_jsonl(file: str) -> list[dict[str, Any]]:
  """The rows a MetricLog wrote ([] when the file does not exist)."""
  if not os.path.exists(file):
    return []
  with open(file) as f:
    return [json.loads(line) for line in f if line.strip()]


def check_resume(stage: str, start: int, steps: int, directory: str) -> None:
  """Raises ValueError when a resumed stage's checkpoint is past its configured `steps`."""
  if start > steps:
    raise ValueError(f"{stage}: the run in {directory} is already at step {start}, past the configured "
                     f"{steps} steps; raise the steps to continue it, or use a new work directory")


def last_metrics(file: str, metrics: dict[str, Any]) -> dict[str, Any]:
  """`metrics` of this process's last step, or (a finished stage resumed) the last row of its log."""
  if metrics:
    return metrics
  rows = read_jsonl(file)
  return rows[-1] if rows else {}


def fmt_metrics(metrics: dict[str, Any], keys) -> str:
  return " ".join(f"{k}={metrics[k]:.3g}" for k in keys if k in metrics)


def preprocess(image, config) -> tuple[np.ndarray, np.ndarray]:
  return image_lib.preprocess_image(image, config.view_pixels, config.view_pixels)


def judge():
  return agent.RuleJudge()
