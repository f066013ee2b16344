"""The demo started from a pretrained base (`model.init_from`): which model each stage starts from and
evaluates, and the base's own tokenizer."""

import json
import logging
import os
import shutil

import pytest

from configs import demo
from mini_o3_jax import run_config
from mini_o3_jax.pipeline import common, eval_stages, rl_stages, sources
from mini_o3_jax.processing import tokenizer as tok_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _saved_step(workdir, stage, step=2):
  (workdir / "ckpt" / stage / str(step)).mkdir(parents=True)


def test_rl_starts_from_this_runs_sft_else_init_from(tmp_path):
  base = str(tmp_path / "base")
  start = lambda name, from_sft=True, init_from=base: rl_stages.start_from(str(tmp_path), name, from_sft, init_from)
  # no SFT here: an SFT model trained elsewhere (init_from); without one, this run's (missing) SFT is asked for
  assert start("rl") == "init_from" and start("rl", init_from="") == "sft"
  _saved_step(tmp_path, "sft")
  # the demo from the base: SFT started from init_from, RL from that SFT, the ablation from the base itself
  assert start("rl") == "sft" and start("rl_no_mask") == "sft"
  assert start("rl_no_coldstart", from_sft=False) == "init_from"
  with pytest.raises(ValueError, match="rl_no_coldstart.*model.init_from, which is not set"):
    start("rl_no_coldstart", from_sft=False, init_from="")
  _saved_step(tmp_path, "rl")
  assert start("rl") == "resume"


def test_eval_models_are_the_runs_own_else_init_from(tmp_path):
  config = demo.get_config()
  names = lambda: [(name, stage) for name, stage, _ in eval_stages._eval_models(config, str(tmp_path))]
  assert [n for n, _ in names()] == list(eval_stages.MODELS)  # nothing trained, no init_from: each warned about
  config.model.init_from = str(tmp_path / "elsewhere")
  assert names() == [("model", None)]  # an evaluation of a model trained elsewhere
  _saved_step(tmp_path, "sft")
  _saved_step(tmp_path, "rl_no_coldstart")
  assert names() == [("no_tools", "sft"), ("sft", "sft"), ("rl_no_coldstart", "rl_no_coldstart")]


def test_a_base_brings_its_tokenizer(tmp_path):
  """The base's ids are the ones its weights learnt: a run from it uses its tokenizer, not one built from this
  run's seed (which draws another corpus)."""
  config = common.resolve(demo.get_config())
  config.seed = 0
  base = common.build_tokenizer(config, str(tmp_path / "base"))
  config.seed = 1
  assert common.build_tokenizer(config, str(tmp_path / "fresh")).get_vocab() != base.get_vocab()
  config.model.init_from = str(tmp_path / "base" / "tokenizer")
  run = common.build_tokenizer(config, str(tmp_path / "run"))
  assert run.get_vocab() == base.get_vocab()
  text = "<think>I need the digit on the red circle. There is a red circle in cell 5.</think>"
  resumed = tok_lib.load_tokenizer(tmp_path / "run" / "tokenizer")  # kept in the run: a resume reads it
  assert resumed.get_vocab() == base.get_vocab() and resumed.encode(text) == base.encode(text) == run.encode(text)


def test_report_names_the_bases_family(tmp_path):
  """A demo started from the shipped base (a Qwen3-VL) says so, whatever the config's own family."""
  config = demo.get_config()
  config.model.init_from = os.path.join(REPO, "assets", "tiny_base")
  assert config.model.family == "qwen2_5_vl"
  row = {"model": "sft", "tier": "medium", "max_turns": 4, "n": 2, "accuracy": 0.5, "accuracy_low": 0.1,
         "accuracy_high": 0.9, "mean_turns": 3.0, "mean_turns_correct": 3.0, "overturn_rate": 0.0, "answer_rate": 1.0,
         "tool_error_rate": 0.0}
  (tmp_path / "metrics.json").write_text(json.dumps({"eval": [row]}))
  eval_stages.run_report(config, str(tmp_path))
  assert "a tiny qwen3_vl started from the pretrained base" in (tmp_path / "report.md").read_text()


def test_a_run_on_another_world_than_its_base_is_warned(tmp_path, caplog):
  """A base records the label shade it was trained on; a run started from it on another world says so in its log."""
  base = os.path.join(REPO, "assets", "tiny_base")
  assert sources.trained_label_shade(base) == 0.0 and sources.trained_label_shade(str(tmp_path)) is None
  shaded = tmp_path / "shaded"
  shutil.copytree(base, shaded)
  summary = json.load(open(shaded / "training_summary.json"))
  json.dump({**summary, "label_shade": 0.5}, open(shaded / "training_summary.json", "w"))
  assert sources.trained_label_shade(str(shaded)) == 0.5
  config = demo.get_config()
  mcfg = run_config.model_config(config, tok_lib.load_tokenizer(base))
  for path, world, warned in ((base, 0.0, False), (str(shaded), 0.0, True), (str(shaded), 0.5, False)):
    config.model.init_from, config.label_shade = path, world
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      sources.init_params(config, mcfg, None)
    assert ("trained on labels 0.5 darker" in caplog.text) == warned, (path, world)
