"""Model-driven cold-start collection: filter / dedupe / cap / summary counts, few-shot prompts, resume.

One tiny random model, the small test tokenizer and one rollout config are shared by every test (a few
compiled programs). The scripted tests force turns through the Sampler's `policy` hook: the model, the
crops and the bookkeeping all run; only the choice of tokens is scripted.
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import demo
from mini_o3_jax.agent import RuleJudge, prompts
from mini_o3_jax.agent.task import Task
from mini_o3_jax.agent.trajectory import Trajectory, Turn
from mini_o3_jax.data import coldstart, coldstart_gen, coldstart_store, loader
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model import vlm
from mini_o3_jax.pipeline import sources
from mini_o3_jax.processing import chat
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.sampler.rollout import RolloutConfig, Sampler
from mini_o3_jax.sampler import SamplingParams

CONFIG = RolloutConfig(num_slots=8, max_turns=4, max_context=1024, max_turn_tokens=48, max_images=5,
                       min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, sampling=SamplingParams(temperature=1.0),
                       decode_steps=8, chunk_buckets=(128,), image_row_buckets=(8,), window_min=0,
                       max_forced_tokens=64)
JUDGE = RuleJudge()


def call(bbox, source="original_image"):
  return '<think>zoom</think><grounding>' + json.dumps({"bbox_2d": bbox, "source": source}) + '</grounding>'


def answer(text):
  return f"<think>found</think><answer>{text}</answer>"


Z1, Z2, Z3 = call([0.5, 0.0, 1.0, 0.5]), call([0.0, 0.5, 0.5, 1.0]), call([0.25, 0.25, 0.75, 0.75])
ERR = call([0.4, 0.2, 0.4, 0.6])  # degenerate box: an error turn


@pytest.fixture(scope="module")
def tokenizer():
  # The scripted explorer's wording too, so few-shot prompts stay short.
  explorer = [prompts.render_content(m["content"]) for t in coldstart.scripted_coldstart("easy", 2)
              for m in t.to_messages()]
  corpus = [prompts.question_prompt("What colour is the cup?"), prompts.observation_turn(0, 1),
            prompts.error_turn("bad box"), Z1, answer("red"), '"observation_1"', *explorer] * 4
  # The long fixed instructions as one token (as the demo tokenizer does).
  return tok_lib.build_small_tokenizer(corpus, vocab_size=512,
                                       protocol_tokens=tok_lib.PROTOCOL_TOKENS + (prompts.INSTRUCTIONS,))


@pytest.fixture(scope="module")
def model(tokenizer):
  ids = tok_lib.special_token_ids(tokenizer)
  cfg = config_lib.tiny(vocab_size=512, image_token_id=ids["image_token_id"],
                        vision_start_token_id=ids["vision_start_token_id"],
                        vision_end_token_id=ids["vision_end_token_id"], video_token_id=ids["video_token_id"])
  return vlm.random_model(cfg, seed=0)  # host-side init: eager init runs hundreds of tiny ops


class Recorder:
  """A Sampler whose rollout results are kept (to look at prompt tokens and compare with the files)."""

  def __init__(self, sampler):
    self.sampler, self.config, self.results = sampler, sampler.config, []

  def rollout(self, tasks, **kwargs):
    out = self.sampler.rollout(tasks, **kwargs)
    self.results += out
    return out


@pytest.fixture(scope="module")
def sampler(model, tokenizer):
  return Sampler(model, tokenizer, CONFIG)


def coord_image(w=112, h=84):
  x, y = np.meshgrid(np.arange(w), np.arange(h))
  return Image.fromarray(np.stack([x * 2, y * 3, (3 * x + 5 * y) % 256], -1).astype(np.uint8))


def make_questions(golds):
  image = coord_image()
  return [coldstart_gen.Question(f"q{i}", lambda i=i, g=g: Task(image, f"What is item {i}?", gold=g))
          for i, g in enumerate(golds)]


def scripted(script, tokenizer):
  """policy: turn t of sample k of question q is script[(q, k)][t]; a list of ints is forced as token ids."""
  def policy(qid, k, traj):
    turns = script.get((qid, k), [])
    return turns[traj.num_turns] if traj.num_turns < len(turns) else None
  return policy


def example_config():
  return loader.ExampleConfig(min_pixels=CONFIG.min_pixels, max_pixels=CONFIG.max_pixels)


# ----------------------------------------------------------------------------- (1) the filter, exactly


def test_filter_dedupe_cap_and_summary_counts(sampler, tokenizer, tmp_path):
  im_end = tok_lib.special_token_ids(tokenizer)["im_end_token_id"]
  no_answer = tokenizer.encode("<think>no idea</think>", add_special_tokens=False) + [im_end]
  script = {
      # q0 (red): right, a duplicate of it, right another way, then one over the cap M=2.
      ("q0", 0): [Z1, answer("red")], ("q0", 1): [Z1, answer("red")],
      ("q0", 2): [Z2, answer("red")], ("q0", 3): [Z3, answer("red")],
      # q1 (red): wrong; right after a tool error; right without zooming; right via observation_1 ("Red.").
      ("q1", 0): [Z1, answer("blue")], ("q1", 1): [ERR, Z1, answer("red")], ("q1", 2): [answer("red")],
      ("q1", 3): [Z2, call([0.0, 0.0, 0.5, 0.5], "observation_1"), answer("Red.")],
      # q2 (blue): over the turn limit with a call pending; no answer; two wrong answers.
      ("q2", 0): [Z1, Z1, Z1, Z1], ("q2", 1): [Z1, no_answer], ("q2", 2): [Z1, answer("red")],
      ("q2", 3): [Z2, answer("green")],
      # q3 (red): two right; a duplicate once the cap is reached (duplicate wins); wrong.
      ("q3", 0): [Z1, answer("red")], ("q3", 1): [Z2, answer("red")], ("q3", 2): [Z1, answer("red")],
      ("q3", 3): [Z1, answer("blue")],
  }
  outcomes = []
  rec = Recorder(sampler)
  cfg = coldstart_gen.CollectConfig(samples_per_question=4, max_kept_per_question=2, questions_per_batch=2)
  summary = coldstart_gen.collect(rec, make_questions(["red", "red", "blue", "red"]), str(tmp_path), judge=JUDGE,
                                  config=cfg, policy=scripted(script, tokenizer), on_question=outcomes.append,
                                  progress=False)
  reasons = {o.id: o.reasons for o in outcomes}
  assert reasons == {"q0": [None, "duplicate", None, "over_cap"],
                     "q1": ["wrong", "tool_error", "too_few_crops", None],
                     "q2": ["overturn", "no_answer", "wrong", "wrong"],
                     "q3": [None, None, "duplicate", "wrong"]}
  assert {o.id: o.correct for o in outcomes} == {
      "q0": [True] * 4, "q1": [False, True, True, True], "q2": [False] * 4, "q3": [True, True, True, False]}
  assert summary["questions"] == 4 and summary["samples"] == 16 and summary["samples_per_question"] == 4
  assert summary["kept"] == 5 and summary["questions_with_kept"] == 3
  assert summary["accuracy"] == 10 / 16 and summary["pass_at_k"] == 0.75
  assert summary["mean_turns"] == 35 / 16 and summary["mean_turns_kept"] == 11 / 5
  assert summary["drops"] == {"overturn": 1, "no_answer": 1, "tool_error": 1, "too_few_crops": 1, "wrong": 4,
                              "duplicate": 2, "over_cap": 1}
  assert summary["stop_reasons"] == {"answer": 14, "max_turns": 1, "no_action": 1}
  assert summary["kept_per_question"] == {"0": 1, "1": 1, "2": 2}
  assert sum(summary["kept_turns"].values()) == summary["kept"]
  assert sum(int(k) * v for k, v in summary["kept_turns"].items()) == round(summary["mean_turns_kept"] * summary["kept"])
  with open(tmp_path / "summary.json") as f:
    assert json.load(f) == json.loads(json.dumps(summary))

  # The JSONL holds exactly the kept samples, in order, and reads back into SFT examples unchanged.
  back = coldstart_store.load_collected(str(tmp_path))
  assert [(t.id, t.metadata["sample"]) for t in back] == [("q0", 0), ("q0", 2), ("q1", 3), ("q3", 0), ("q3", 1)]
  kept = [t for o in outcomes for t in o.kept]
  results = {(r.trajectory.id, k % 4): r for batch in (rec.results[:8], rec.results[8:])
             for k, r in enumerate(batch)}
  for b, t in zip(back, kept):
    assert [u.text for u in b.turns] == [u.text for u in t.turns] and b.gold == t.gold
    assert JUDGE(b.question, b.final_answer, b.gold) and b.stop_reason == "answer"
    assert all(os.path.isfile(p) for p in b.images)
    for p, im in zip(b.images, t.images):
      np.testing.assert_array_equal(np.asarray(Image.open(p).convert("RGB")), np.asarray(im))
    ex = loader.trajectory_example(b, tokenizer, example_config())
    want = loader.trajectory_example(t, tokenizer, example_config())
    np.testing.assert_array_equal(ex["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(ex["loss_mask"], want["loss_mask"])
    np.testing.assert_array_equal(ex["pixel_values"], want["pixel_values"])
    # SFT trains on exactly the tokens the model produced in the rollout, plus the `<|im_end|>` that
    # closes each turn stopped by a stop string (not sampled in the rollout; SFT teaches it).
    r = results[(b.id, b.metadata["sample"])]
    np.testing.assert_array_equal(ex["input_ids"][:len(r.token_ids)], r.token_ids)
    extra = ex["loss_mask"][:len(r.token_ids)].astype(int) - r.response_mask
    assert extra.min() == 0 and (r.token_ids[extra == 1] == im_end).all()
    assert extra.sum() == len(b.turns) - 1
  # The SFT stage reads the same records with data.source = "collected".
  cfg = ml_collections.ConfigDict(dict(data=dict(source="collected", collected_dir=str(tmp_path), limit=0)))
  assert [(t.id, t.metadata["sample"]) for t in sources.sft_trajectories(cfg)] == [
      (t.id, t.metadata["sample"]) for t in back]
  cfg.data.collected_dir = ""
  with pytest.raises(ValueError, match="collected_dir"):
    sources.sft_trajectories(cfg)
  # The shared original is written once per question; crops once per kept sample.
  names = sorted(os.listdir(tmp_path / "images"))
  assert names.count("q0_0.png") == 1 and "q0_s2_1.png" in names and "q1_s3_2.png" in names
  assert not any(n.startswith("q2") for n in names)


def test_select_and_reason_are_pure():
  img = coord_image()
  t = lambda *texts, stop="answer": Trajectory("q", [img], [Turn(x) for x in texts], stop_reason=stop, gold="a")  # noqa
  cfg = coldstart_gen.CollectConfig(min_crops=0)
  assert coldstart_gen.sample_reason(t(answer("a")), True, cfg) is None
  assert coldstart_gen.sample_reason(t(answer("a")), True, dataclasses.replace(cfg, min_crops=1)) == "too_few_crops"
  assert coldstart_gen.sample_reason(t(Z1, stop="max_turns"), False, cfg) == "overturn"
  assert coldstart_gen.sample_reason(t("<think>x</think>", stop="no_action"), False, cfg) == "no_answer"
  err = Trajectory("q", [img], [Turn(ERR, error="degenerate"), Turn(answer("a"))], stop_reason="answer")
  assert coldstart_gen.sample_reason(err, True, cfg) == "tool_error"
  assert coldstart_gen.sample_reason(err, True, dataclasses.replace(cfg, drop_tool_errors=False)) is None
  trajs = [t(answer("a")), t(answer("a")), t(answer("b")), t(answer("c"))]
  assert coldstart_gen.select(trajs, [None, None, "wrong", None], 1) == [None, "duplicate", "wrong", "over_cap"]
  assert coldstart_gen.sample_key("q", 0) != coldstart_gen.sample_key("q", 1)


# ----------------------------------------------------------------------------- (2) real model, few-shot


def test_few_shot_end_to_end_with_the_model(sampler, tokenizer, tmp_path):
  shots_file = tmp_path / "shots" / "exemplars.jsonl"
  os.makedirs(shots_file.parent)
  coldstart.write_jsonl_with_images(str(shots_file), str(tmp_path / "shots" / "images"),
                                    list(coldstart.scripted_coldstart("easy", 2, split="train")))
  shots = coldstart_gen.load_exemplars(str(shots_file))
  assert [len(s.images) for s in shots] == [2, 2]
  # Items 0 and 1 are the exemplars' own scenes: skipped (the answer would be in the prompt).
  qs = coldstart_gen.synthetic_questions(["easy"], "train", 4)
  rec = Recorder(sampler)
  cfg = coldstart_gen.CollectConfig(samples_per_question=2, max_kept_per_question=2, min_crops=0,
                                    drop_tool_errors=False, questions_per_batch=2)
  # Sample 0 is nudged to answer at once (the model samples the answer text itself).
  policy = lambda qid, k, traj: "<think>I see it.</think><answer>" if k == 0 and traj.num_turns == 0 else None  # noqa
  summary = coldstart_gen.collect(rec, qs, str(tmp_path / "out"), judge=JUDGE, config=cfg, exemplars=shots,
                                  policy=policy, progress=False)
  assert summary["questions"] == 2 and summary["samples"] == 4 and len(rec.results) == 4
  assert summary["settings"]["exemplars"] == [s.id for s in shots]

  # The exemplars really are in the prompt: the prompt tokens are the chat template of the exemplar
  # conversation (all their images) followed by the question, and nothing of them is in the trajectory.
  context = coldstart_gen.exemplar_context(shots)
  for r in rec.results:
    images = [s.images[i] for s in shots for i in range(len(s.images))] + [r.trajectory.images[0]]
    grids = [image_lib.preprocess_image(im, CONFIG.min_pixels, CONFIG.max_pixels)[1] for im in images]
    want = chat.tokenize_conversation(tokenizer, context + [prompts.prompt_message(r.trajectory.prompt_text)],
                                      grids, add_generation_prompt=True)["input_ids"]
    assert r.token_ids[:r.prompt_length].tolist() == want.tolist()
    assert r.num_context_images == 4 and len(r.pixel_values) == 4 + len(r.trajectory.images)
    text = tokenizer.decode(r.token_ids[:r.prompt_length].tolist(), skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)
    pos = [text.index(u.text) for s in shots for u in s.turns]
    assert pos == sorted(pos) and pos[-1] < text.rindex(r.trajectory.question)
    assert r.trajectory.id in {"synthetic-easy-train-0000002", "synthetic-easy-train-0000003"}

  # What is kept is what the judge and the filter say, sample by sample.
  with open(tmp_path / "out" / "progress.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["id"] for r in records] == [q.id for q in qs[2:]]
  for i, record in enumerate(records):
    trajs = [r.trajectory for r in rec.results[2 * i:2 * i + 2]]
    correct = [coldstart_gen.is_correct(t, JUDGE) for t in trajs]
    assert record["correct"] == correct
    assert record["reasons"] == coldstart_gen.select(
        trajs, [coldstart_gen.sample_reason(t, c, cfg) for t, c in zip(trajs, correct)], 2)
  back = coldstart_store.load_collected(str(tmp_path / "out"))
  assert len(back) == summary["kept"] == sum(r["reasons"].count(None) for r in records)
  for t in back:
    assert JUDGE(t.question, t.final_answer, t.gold) and len(t.images) == 1 + coldstart_gen.num_crops(t)


# ----------------------------------------------------------------------------- (3) resume


def _run(sampler, out, tokenizer, on_question=None):
  qs = make_questions(["red", "blue", "red", "green", "red"])
  # Sample 0 zooms then answers right; sample 1 zooms, then the model samples the rest.
  script = {(q.id, 0): [Z1, answer(g)] for q, g in zip(qs, ["red", "blue", "red", "green", "red"])}
  script.update({(q.id, 1): [Z2] for q in qs})
  cfg = coldstart_gen.CollectConfig(samples_per_question=3, max_kept_per_question=1, questions_per_batch=2,
                                    seed=5)
  return coldstart_gen.collect(sampler, qs, str(out), judge=JUDGE, config=cfg, policy=scripted(script, tokenizer),
                               on_question=on_question, progress=False)


def _files(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for n in names:
      p = os.path.join(root, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, directory)] = f.read()
  return out


class Killed(Exception):
  pass


def test_resume_equals_an_uninterrupted_run(sampler, tokenizer, tmp_path):
  full = _run(sampler, tmp_path / "a", tokenizer)

  def kill_after_q2(outcome):
    if outcome.id == "q2":  # the first question of the second batch: q3 was rolled out, never written
      raise Killed()

  with pytest.raises(Killed):
    _run(sampler, tmp_path / "b", tokenizer, on_question=kill_after_q2)
  b = tmp_path / "b"
  with open(b / "progress.jsonl") as f:
    assert [json.loads(line)["id"] for line in f] == ["q0", "q1", "q2"]
  # A crash between the two writes of q3, then mid-line: a q3 trajectory line without its progress line,
  # then torn lines in both files.
  with open(tmp_path / "a" / "trajectories.jsonl") as f:
    q3_line = next(line for line in f if json.loads(line)["id"] == "q3")
  with open(b / "trajectories.jsonl", "a") as f:
    f.write(q3_line + '{"id": "q4", "ques')
  with open(b / "progress.jsonl", "a") as f:
    f.write('{"id": "q3", "kept"')

  resumed = _run(sampler, b, tokenizer)
  assert resumed == full
  assert _files(b) == _files(tmp_path / "a")  # every file byte for byte, images included
  lines = [json.loads(line) for line in open(b / "trajectories.jsonl")]
  keys = [(d["id"], d["metadata"]["sample"]) for d in lines]
  assert len(keys) == len(set(keys)) == full["kept"] >= 5
  # A third run has nothing left to do and changes nothing.
  assert _run(sampler, b, tokenizer, on_question=lambda o: pytest.fail("redid a question")) == full


# ----------------------------------------------------------------------------- (4) errors


def test_clear_errors(tmp_path, sampler):
  with pytest.raises(FileNotFoundError, match="exemplar file not found"):
    coldstart_gen.load_exemplars(str(tmp_path / "missing.jsonl"))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="holds no trajectories"):
    coldstart_gen.load_exemplars(str(tmp_path / "empty.jsonl"))
  (tmp_path / "junk.jsonl").write_text('{"hello": 1}\n')
  with pytest.raises(ValueError, match=r"junk.jsonl:1: not a trajectory"):
    coldstart_gen.load_exemplars(str(tmp_path / "junk.jsonl"))
  unfinished = Trajectory("q", ["x.png"], [Turn(Z1, observation_index=None)], stop_reason="max_turns", id="e")
  (tmp_path / "unfinished.jsonl").write_text(json.dumps({**unfinished.to_json_dict()}) + "\n")
  with pytest.raises(ValueError, match="does not end in an <answer>"):
    coldstart_gen.load_exemplars(str(tmp_path / "unfinished.jsonl"))
  done = Trajectory("q", ["nope.png"], [Turn(answer("a"))], stop_reason="answer", id="e")
  (tmp_path / "noimage.jsonl").write_text(done.to_json() + "\n")
  with pytest.raises(FileNotFoundError, match="image missing"):
    coldstart_gen.load_exemplars(str(tmp_path / "noimage.jsonl"))

  with pytest.raises(ValueError, match="no questions"):
    coldstart_gen.collect(sampler, [], str(tmp_path / "o"), judge=JUDGE)
  with pytest.raises(ValueError, match="unique"):
    coldstart_gen.collect(sampler, make_questions(["a"]) * 2, str(tmp_path / "o"), judge=JUDGE)
  no_gold = [coldstart_gen.Question("q0", lambda: Task(coord_image(), "what?"))]
  with pytest.raises(ValueError, match="no gold answer"):
    coldstart_gen.collect(sampler, no_gold, str(tmp_path / "o1"), judge=JUDGE, progress=False)
  for bad in (dict(samples_per_question=0), dict(max_kept_per_question=0), dict(min_crops=-1),
              dict(questions_per_batch=0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      coldstart_gen.CollectConfig(**bad)
  # Resuming into a directory written with other settings.
  out = coldstart_store.OutputDir(str(tmp_path / "o2"))
  out.check_settings({"samples_per_question": 4})
  with pytest.raises(ValueError, match="other settings"):
    out.check_settings({"samples_per_question": 8})


def test_stage_config_errors():
  from mini_o3_jax.pipeline import coldstart_stage
  base = ml_collections.ConfigDict({"quick": False})
  c = coldstart_stage.section(base)
  assert c.model == "stage:sft" and c.samples_per_question == 4
  from mini_o3_jax.pipeline import common
  cfg = ml_collections.ConfigDict({"quick": True, "coldstart": {"samples_per_question": 9, "num_slots": 8},
                                   "quick_preset": demo.quick_preset()})
  quick = coldstart_stage.section(common.resolve(cfg, {"coldstart.num_slots": 8}))
  assert quick.samples_per_question == 2  # the quick preset replaces the config file's value...
  assert quick.num_slots == 8  # ...but not a value given on the command line
  for bad, msg in ((dict(sample_per_question=3), "unknown coldstart setting"),
                   (dict(model="sft"), "stage:<name>' or 'hf:<dir>"),
                   (dict(source="web"), "'synthetic' or 'benchmark'"),
                   (dict(source="benchmark"), "needs coldstart.data_dir"),
                   (dict(num_exemplars=-1), "num_exemplars")):
    with pytest.raises(ValueError, match=msg):
      coldstart_stage.section(ml_collections.ConfigDict({"coldstart": bad}))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    coldstart_stage.load_model(base, "/nonexistent", "hf:/nonexistent")


@pytest.mark.slow  # ~15 s: the stage's own sampler shapes compile
def test_stage_runs_from_an_hf_directory(model, tokenizer, tmp_path):
  from mini_o3_jax.model.hf import save_pretrained
  from mini_o3_jax.pipeline import coldstart_stage
  hf = tmp_path / "hf"
  save_pretrained(model, model.config, str(hf))
  tokenizer.save_pretrained(str(hf))
  config = ml_collections.ConfigDict({"quick": False, "seed": 0, "coldstart": dict(
      model=f"hf:{hf}", tiers=("easy",), n_per_tier=2, num_exemplars=1, exemplar_tier="easy",
      samples_per_question=2, max_turn_tokens=16, max_turns=2, max_context=1024, num_slots=4,
      min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)})
  result = coldstart_stage.run_coldstart(config, str(tmp_path / "work"))
  assert result["questions"] == 2 and result["samples"] == 4
  out = tmp_path / "work" / "coldstart"
  assert (out / "exemplars.jsonl").exists() and (out / "summary.json").exists()
  assert len(open(out / "progress.jsonl").readlines()) == 2
  # Rerun: resumes, nothing redone, same summary.
  assert coldstart_stage.run_coldstart(config, str(tmp_path / "work")) == result
