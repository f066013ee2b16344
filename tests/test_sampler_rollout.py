"""Multi-turn rollouts: cache continuation, the crop tool loop, error turns, limits, sharding.

One tiny random model, the small demo tokenizer and one rollout config are shared by every test, so
the whole module compiles a handful of programs (the compiled-program test checks that bound).
A scripted `policy` forces the assistant turns through the real loop: the model's cache, the vision
tower, the crops and the bookkeeping all run; only the choice of tokens is scripted.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mini_o3_jax.agent import prompts
from mini_o3_jax.agent.task import Task
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model import prepare_inputs
from mini_o3_jax.model import vlm
from mini_o3_jax.processing import chat
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.sampler import engine as engine_lib
from mini_o3_jax.sampler import programs as programs_lib
from mini_o3_jax.sampler.rollout import RolloutConfig, Sampler, vision_token_ids
from mini_o3_jax.sampler import SamplingParams

CONFIG = RolloutConfig(num_slots=4, max_turns=6, max_context=1024, max_turn_tokens=48, max_images=4,
                       min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, sampling=SamplingParams(temperature=1.0),
                       decode_steps=8, chunk_buckets=(128,), patch_buckets=(64,), image_row_buckets=(4,),
                       window_min=0, max_forced_tokens=64)


def call(bbox, source="original_image"):
  return ('<think>zoom</think><grounding>' + json.dumps({"bbox_2d": bbox, "source": source}) + '</grounding>')


ANSWER = "<think>found</think><answer>red</answer>"


@pytest.fixture(scope="module")
def tokenizer():
  corpus = [prompts.question_prompt("What colour is the cup?"), prompts.observation_turn(0, 1),
            prompts.error_turn("bad box"), call([0.1, 0.2, 0.5, 0.6]), ANSWER, '"observation_1"'] * 4
  return tok_lib.build_small_tokenizer(corpus, vocab_size=512)


@pytest.fixture(scope="module")
def model(tokenizer):
  ids = tok_lib.special_token_ids(tokenizer)
  cfg = config_lib.tiny(vocab_size=512, image_token_id=ids["image_token_id"],
                        vision_start_token_id=ids["vision_start_token_id"],
                        vision_end_token_id=ids["vision_end_token_id"], video_token_id=ids["video_token_id"])
  return vlm.random_model(cfg, seed=0)  # host-side init: eager init runs hundreds of tiny ops


@pytest.fixture(scope="module")
def sampler(model, tokenizer):
  return Sampler(model, tokenizer, CONFIG)


def coord_image(w=112, h=84):
  """Every pixel distinct: R = x, G = y, B = (3x + 5y) mod 256."""
  x, y = np.meshgrid(np.arange(w), np.arange(h))
  return Image.fromarray(np.stack([x * 2, y * 3, (3 * x + 5 * y) % 256], -1).astype(np.uint8))


def scripted(turns_by_task):
  """policy forcing turn k of task i to turns_by_task[i][k] (None / past the end: the model samples)."""
  def policy(i, traj):
    turns = turns_by_task.get(i, [])
    return turns[traj.num_turns] if traj.num_turns < len(turns) else None
  return policy


def user_turn_texts(result, tokenizer):
  """Decoded user turns after the prompt (maximal runs of response_mask 0)."""
  mask = result.response_mask
  out, start = [], None
  for i in range(result.prompt_length, len(mask) + 1):
    if i < len(mask) and mask[i] == 0:
      start = i if start is None else start
    elif start is not None:
      out.append(tokenizer.decode(result.token_ids[start:i].tolist(), skip_special_tokens=False))
      start = None
  return out


# ----------------------------------------------------------------------------- cache continuation


def _full_logits(model, results, length):
  """From-scratch forward over whole trajectories (right-padded to `length`): logits [n, length, V]."""
  n = len(results)
  ids = np.zeros((n, length), np.int32)
  mask = np.zeros((n, length), np.int32)
  for r, res in enumerate(results):
    ids[r, :len(res.token_ids)] = res.token_ids
    mask[r, :len(res.token_ids)] = 1
  pv = np.concatenate([p for res in results for p in res.pixel_values])
  grids = np.concatenate([res.image_grid_thw for res in results])
  inputs, _ = prepare_inputs(model.config, ids, mask, pv, grids)
  logits = np.asarray(nnx.jit(lambda m, x: m.forward(x))(model, inputs), np.float64)
  # The sampler never samples the vision placeholders: its policy is the one with those logits masked.
  logits[..., list(vision_token_ids(model.config))] = -1e9
  return logits


def test_multi_turn_cache_equals_full_forward(sampler, model, tokenizer):
  image = coord_image()
  script = {0: [call([0.5, 0.0, 1.0, 0.5]), call([0.0, 0.5, 0.6, 1.0], "observation_1"), "<think>",
                ANSWER],
            1: [call([0.2, 0.2, 0.7, 0.9]), '<grounding>{"bbox_2d": [1, 1]}</grounding>']}
  results = sampler.rollout([Task(image, "Which colour?"), Task(image, "Where?")], seed=3, policy=scripted(script))
  r0, r1 = results
  assert r0.num_turns >= 3 and len(r0.images) == 3 and len(r1.images) == 2
  logits = _full_logits(model, results, 1024)
  for r, res in enumerate(results):
    # Every sampled (or forced) token's behaviour log-prob equals the full forward's at temperature 1:
    # positions, image embeddings and cached keys after each appended observation are all right.
    logp = logits[r] - np.log(np.exp(logits[r] - logits[r].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits[r].max(-1, keepdims=True)
    pos = np.flatnonzero(res.response_mask)
    want = logp[pos - 1, res.token_ids[pos]]
    np.testing.assert_allclose(res.logprobs[pos], want, atol=2e-4)
    assert (res.logprobs[res.response_mask == 0] == 0).all()

  # The engine's own logits at the end of each appended chunk (prompt, then turn + observation
  # chunks holding images) equal the from-scratch logits at the same positions.
  eng, cfg = sampler.engine, model.config
  ends = [r0.prompt_length] + [i + 1 for i in range(r0.prompt_length, len(r0.token_ids) - 1)
                               if r0.response_mask[i] == 0 and r0.response_mask[i + 1] == 1]
  image_of = np.cumsum(r0.token_ids == cfg.image_token_id)
  per_image = [int(np.prod(g)) // 4 for g in r0.image_grid_thw]
  start, offset, used = 0, 0, 0
  eng.reset()
  for k, end in enumerate(ends[:3]):
    ids = r0.token_ids[start:end]
    n_img = 0
    while used + n_img < len(per_image) and sum(per_image[:used + n_img + 1]) <= image_of[end - 1]:
      n_img += 1
    grids = r0.image_grid_thw[used:used + n_img]
    pv = np.concatenate(r0.pixel_values[used:used + n_img]) if n_img else None
    pos, next_pos = engine_lib.chunk_positions(ids, grids, offset, image_token_id=cfg.image_token_id, merge=2)
    chunk = engine_lib.Chunk(ids=ids, positions=pos, next_pos=next_pos, turn_limit=1, pixel_values=pv,
                             grids=grids if n_img else None, reset=k == 0, key=np.zeros(2, np.uint32))
    _, got = eng.append({1: chunk})
    np.testing.assert_allclose(np.asarray(got)[1], logits[0, end - 1], atol=2e-4)
    start, offset, used = end, next_pos, used + n_img
  assert used == 3  # the chunks held the original, observation 1 and observation 2
  assert not np.isin(np.concatenate([r.token_ids[r.response_mask > 0] for r in results]),
                     vision_token_ids(cfg)).any()


# ----------------------------------------------------------------------------- the crop tool loop


def test_crops_land_on_the_right_pixels(sampler, tokenizer):
  image = coord_image()
  original = np.asarray(image)
  script = {0: [call([0.5, 0.0, 1.0, 0.5]),                    # 56x42 region, no upscale
                call([0.25, 0.5, 0.75, 1.0], "observation_1"),  # 28x21 of observation 1 -> upscaled
                call([0.0, 0.25, 0.5, 1.0]),                     # back to the original
                ANSWER]}
  (res,) = sampler.rollout([Task(image, "Find it.", gold="red")], policy=scripted(script))
  assert res.stop_reason == "answer" and not res.overturn and res.final_answer == "red"
  assert res.num_turns == 4 and len(res.images) == 4
  obs1, obs2, obs3 = (np.asarray(im) for im in res.images[1:])
  np.testing.assert_array_equal(obs1, original[0:42, 56:112])
  np.testing.assert_array_equal(obs3, original[21:84, 0:56])
  region = Image.fromarray(obs1[21:42, 14:42])  # from observation 1, not the original
  np.testing.assert_array_equal(obs2, np.asarray(region.resize((37, 28), Image.Resampling.LANCZOS)))
  assert [t.observation_index for t in res.trajectory.turns] == [1, 2, 3, None]
  # What the model saw: each image preprocessed at the configured budget, its tokens in the stream.
  for im, pv, grid in zip(res.images, res.pixel_values, res.image_grid_thw):
    want_pv, want_grid = image_lib.preprocess_image(im, CONFIG.min_pixels, CONFIG.max_pixels)
    np.testing.assert_array_equal(pv, want_pv)
    np.testing.assert_array_equal(grid, want_grid)
    assert np.prod(grid) <= CONFIG.max_pixels // 196
  image_id = tok_lib.special_token_ids(tokenizer)["image_token_id"]
  assert (res.token_ids == image_id).sum() == sum(np.prod(g) // 4 for g in res.image_grid_thw)
  users = user_turn_texts(res, tokenizer)
  assert len(users) == 3
  for k, text in enumerate(users):
    head, tail = prompts.observation_turn(k, k + 1).split(prompts.IMAGE_PLACEHOLDER)
    assert text.startswith("<|im_end|>\n<|im_start|>user\n" + head + "<|vision_start|><|image_pad|>")
    assert text.endswith("<|vision_end|>" + tail + "<|im_end|>\n<|im_start|>assistant\n")
  # The token stream is exactly the chat template of the trajectory's messages (model turns kept as sampled).
  msgs = res.trajectory.to_messages()
  want = chat.tokenize_conversation(tokenizer, msgs, list(res.image_grid_thw), add_generation_prompt=False)
  assert res.token_ids.tolist() == want["input_ids"].tolist()[:-2]  # no closing "<|im_end|>\n" after the answer
  assert res.response_mask.sum() == sum(len(tokenizer.encode(t.text)) for t in res.trajectory.turns)


def test_stop_string_split_across_tokens(sampler, tokenizer):
  """`</grounding>` spelled by several byte-level tokens (and ending inside one) still stops the turn."""
  enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
  head = enc('<think>a</think><grounding>{"bbox_2d": [0, 0, 0.5, 0.5], "source": "original_image"}')
  tail = enc("</gro") + enc("unding>!?") + enc("junk")
  assert tokenizer.convert_tokens_to_ids("</grounding>") not in tail
  (res,) = sampler.rollout([Task(coord_image(), "q")], policy=scripted({0: [head + tail, ANSWER]}))
  first = res.trajectory.turns[0]
  assert first.text.endswith("</grounding>") and first.observation_index == 1
  sampled = res.token_ids[res.response_mask == 1][:len(head) + len(tail)].tolist()
  stop_at = next(i for i in range(len(tail)) if "</grounding>" in tokenizer.decode(head + tail[:i + 1]))
  assert sampled[:len(head) + stop_at + 1] == head + tail[:stop_at + 1]
  # The next sampled token belongs to the second turn (the user turn follows the stop).
  assert res.response_mask[res.prompt_length + len(head) + stop_at + 1] == 0
  assert res.stop_reason == "answer"


BAD = [('<grounding>{"bbox_2d": [0.1, 0.2, 0.3</grounding>', "not valid JSON"),
       ('<grounding>{"box": [0.1, 0.2, 0.3, 0.4], "source": "original_image"}</grounding>', "missing key"),
       (call([1.2, 0.1, 1.5, 0.3]), "entirely outside the image"),
       (call([0.4, 0.2, 0.4, 0.6]), "degenerate"),
       (call([0.1, 0.2, 0.3, 0.4], "observation_3"), "does not exist"),
       (call([0.1, 0.2, 0.3, 0.4], "image_1"), "unknown source")]


def test_bad_calls_get_error_turns(sampler, tokenizer):
  image = coord_image()
  script = {0: [b for b, _ in BAD[:3]] + [ANSWER], 1: [b for b, _ in BAD[3:]] + [ANSWER]}
  results = sampler.rollout([Task(image, "a?"), Task(image, "b?")], policy=scripted(script))
  for res, bad in zip(results, (BAD[:3], BAD[3:])):
    assert res.stop_reason == "answer" and len(res.images) == 1
    users = user_turn_texts(res, tokenizer)
    assert len(users) == 3
    for turn, user, (_, fragment) in zip(res.trajectory.turns, users, bad):
      assert turn.observation_index is None and fragment in turn.error, turn.error
      assert prompts.ERROR_PREFIX in user and turn.error in user and "<|image_pad|>" not in user


# ----------------------------------------------------------------------------- limits and over-turn


def test_stop_reasons_and_overturn_flags(sampler, tokenizer):
  image = coord_image()
  cfg = CONFIG
  grid = image_lib.preprocess_image(image, cfg.min_pixels, cfg.max_pixels)[1]

  def prompt_len(question):
    msg = prompts.prompt_message(prompts.question_prompt(question))
    return len(chat.tokenize_conversation(tokenizer, [msg], [grid], add_generation_prompt=True)["input_ids"])

  # A question long enough that a few error turns exhaust the context before the turn limit.
  filler = "Where is it? "
  n = 1
  while prompt_len(filler * (n + 1)) < cfg.max_context - 200:
    n += 1
  word = tokenizer.encode("a", add_special_tokens=False)
  script = {
      0: [ANSWER],                                                                   # answer
      1: ["<think>nothing</think><|im_end|>"],                                       # no_action
      2: ["<grounding>{}</grounding>"] * 6,                                          # max_turns, malformed
      3: [call([0.0, 0.0, 0.5, 0.5])] * 2 + ["<grounding>{}</grounding>"] * 3 + [call([0.5, 0.5, 1, 1])],
      4: [call([0.0, 0.0, 0.5, 0.5])] * 4,                                           # image_limit
      5: [word * 60],                                                                # max_response
      6: ["<grounding>{}</grounding>"] * 6,                                          # max_context
      7: [ANSWER],                                                                   # prompt does not fit
  }
  questions = ["q"] * 6 + [filler * n, filler * 400]
  results = sampler.rollout([Task(image, q) for q in questions], policy=scripted(script))
  reasons = [r.stop_reason for r in results]
  assert reasons == ["answer", "no_action", "max_turns", "max_turns", "image_limit", "max_response",
                     "max_context", "max_context"], reasons
  assert [r.overturn for r in results] == [False, False, True, True, True, True, True, True]
  assert [r.num_turns for r in results[:6]] == [1, 1, 6, 6, 4, 1]
  assert results[3].trajectory.turns[-1].action.source == "original_image"  # a valid call pending
  assert len(results[3].images) == 3 and len(results[4].images) == 4
  assert results[5].response_mask.sum() == cfg.max_turn_tokens
  # max_context: the trajectory stopped exactly when the next error turn no longer fit.
  ctx = results[6]
  assert 1 <= ctx.num_turns < cfg.max_turns
  err = chat.tokenize_conversation(tokenizer, [ctx.trajectory.turns[0].followup_message(0)], [],
                                   add_generation_prompt=True, add_default_system=False)["input_ids"]
  user_len = len(tokenizer.encode("<|im_end|>\n")) + len(err)
  assert len(ctx.token_ids) + user_len + 1 > cfg.max_context
  assert results[7].num_turns == 0 and results[7].prompt_length + 1 > cfg.max_context
  for r in results:
    assert len(r.token_ids) == len(r.response_mask) == len(r.logprobs)
    assert r.num_turns == 0 or len(r.token_ids) <= cfg.max_context
    r.trajectory.validate()


def test_sampling_is_per_task_not_per_slot(sampler):
  """Task i's randomness is its own key: reordering tasks (other slots, other refill timing) changes nothing."""
  image = coord_image()
  tasks = [Task(image, f"question {i}") for i in range(5)]
  script = {1: [call([0.0, 0.0, 0.5, 0.5])], 4: [call([0.5, 0.0, 1.0, 1.0]), "<think>"]}
  a = sampler.rollout(tasks, seed=7, policy=scripted(script))
  order = [4, 2, 0, 3, 1]
  b = sampler.rollout([tasks[i] for i in order], seed=7, key_ids=order,
                      policy=scripted({k: script[i] for k, i in enumerate(order) if i in script}))
  for k, i in enumerate(order):
    np.testing.assert_array_equal(b[k].token_ids, a[i].token_ids)
    np.testing.assert_allclose(b[k].logprobs, a[i].logprobs, atol=1e-5)
    assert b[k].stop_reason == a[i].stop_reason
  assert len({tuple(r.token_ids[r.prompt_length:]) for r in a}) == 5
  c = sampler.rollout(tasks[:1], seed=8)
  assert not np.array_equal(c[0].token_ids, a[0].token_ids)


def test_compiled_programs_are_bounded(sampler):
  """Everything above (prompts, crops, error turns, chunks split into pieces) ran on three model
  programs (vision tower, prefill, decode loop) and one tiny gather."""
  assert sampler.engine.programs == {("encode", 4, 64), ("slice", 16, 128), ("append", 128, 1152),
                                    ("decode", 8, 1152)}
  # jax's own caches agree (they also hold other engines' programs, e.g. the sharded test's).
  assert all(n >= 1 for n in programs_lib.jit_cache_sizes().values())


@pytest.mark.slow  # ~20 s: four more programs, partitioned over 8 fake devices
def test_sharded_rollouts_equal_unsharded(model, tokenizer, sampler):
  from mini_o3_jax import sharding as shard_lib
  mesh = shard_lib.make_mesh((2, 2, 2))
  image = coord_image()
  tasks = [Task(image, f"q{i}") for i in range(5)]
  script = {0: [call([0.5, 0.0, 1.0, 0.5]), ANSWER], 2: [call([0.0, 0.0, 0.5, 0.5]), "<think>"],
            3: ['<grounding>{"a": 1}</grounding>']}
  want = sampler.rollout(tasks, seed=11, policy=scripted(script))
  sharded = Sampler(model, tokenizer, CONFIG, mesh=mesh)
  cache_k = sharded.engine.state.cache.k
  assert len(cache_k.sharding.device_set) == 8 and cache_k.sharding.spec[1] == ("data", "fsdp")
  got = sharded.rollout(tasks, seed=11, policy=scripted(script))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g.token_ids, w.token_ids)
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
    assert g.stop_reason == w.stop_reason and g.num_turns == w.num_turns


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tokenizer):
  ids = tok_lib.special_token_ids(tokenizer)
  assert max(ids.values()) < 300 < len(tokenizer)
  small = vlm.random_model(config_lib.tiny(vocab_size=300, image_token_id=ids["image_token_id"],
                                           vision_start_token_id=ids["vision_start_token_id"],
                                           vision_end_token_id=ids["vision_end_token_id"],
                                           video_token_id=ids["video_token_id"]), seed=0)
  with pytest.raises(ValueError, match=f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary only 300"):
    Sampler(small, tokenizer, CONFIG)
