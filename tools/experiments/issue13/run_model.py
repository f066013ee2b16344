"""A pretraining run's model and a ridge read-out, as the issue-13 probes beside this file use them."""
import json
import os
import sys

import numpy as np

from configs import pretrain_tiny
from mini_o3_jax import run_config
from mini_o3_jax.model import hf
from mini_o3_jax.pipeline import common, phases, sources
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.train import checkpoint as ckpt_lib


def cli_args(*defaults):
  """RUN_DIR (the first argument), then the script's optional positional arguments, each given one converted to its
  default's type."""
  given = sys.argv[2:]
  return (sys.argv[1], *(type(d)(given[k]) if k < len(given) else d for k, d in enumerate(defaults)))


def load_run(run: str, stage: str, phase: str = ""):
  """(config, tokenizer, model config, model, step) of RUN's checkpoint of STAGE: `configs/pretrain_tiny.py` with the
  run's recorded model sizes and world (and PHASE's settings, e.g. "pretrain_vision/search"). RUN may also be an
  exported base (an HF directory; STAGE is then ignored and the step is -1). The environment's LABEL_SHADE, when set,
  replaces the recorded world's label shade (to ask a tower about a world it was not trained on)."""
  config = pretrain_tiny.get_config()
  hf_export = sources.is_hf_dir(run)
  if hf_export:
    config.model.init_from = run
  else:
    recorded = json.load(open(os.path.join(run, "config.json")))
    config.model.update({k: v for k, v in recorded["model"].items() if k in config.model})
    config.label_shade = recorded.get("label_shade", 0.0)
  config.label_shade = float(os.environ.get("LABEL_SHADE", config.label_shade))
  config = common.resolve(config)
  if phase:
    config = phases.configure(config, phases.runs_of([phase])[0])
  if hf_export:
    tokenizer = tok_lib.load_tokenizer(run)
    model, mcfg = hf.load_pretrained(run)
    return config, tokenizer, mcfg, model, -1
  tokenizer = common.build_tokenizer(config, run)
  mcfg = run_config.model_config(config, tokenizer)
  model, step = ckpt_lib.restore_model(os.path.join(run, "ckpt", stage), mcfg)
  return config, tokenizer, mcfg, model, step


def with_bias(x: np.ndarray) -> np.ndarray:
  return np.concatenate([x, np.ones((len(x), 1))], 1)


def ridge(x: np.ndarray, y: np.ndarray, lam: float = 1e-2) -> np.ndarray:
  """Weights (with a bias row) of the ridge regression of y on x; score new rows with `with_bias(x) @ w`."""
  xa = with_bias(x)
  return np.linalg.solve(xa.T @ xa + lam * np.eye(xa.shape[1]), xa.T @ y)
