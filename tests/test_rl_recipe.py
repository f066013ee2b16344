"""GRPO as the original ran it (issue 15): length stops, loss aggregation, dynamic sampling, old log-probs,
several updates per rollout batch, and a real rollout -> update loop that learns a toy reward.

One tiny random Qwen2.5-VL and the real sampler serve every test. The toy reward: the first sampled
token of the answer is even (about 1/2 under the random model), a target a few GRPO updates can move.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mini_o3_jax.agent import prompts
from mini_o3_jax.agent.task import Task
from mini_o3_jax.agent import trajectory as trajectory_lib
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model import vlm
from mini_o3_jax.pipeline import rl_stages
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.rl import objective, rollouts
from mini_o3_jax.rl import step as rl
from mini_o3_jax import run_config
from mini_o3_jax.sampler.rollout import RolloutConfig, Sampler, vision_token_ids
from mini_o3_jax.sampler import SamplingParams
from mini_o3_jax import sharding
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import optimizer as opt_lib
from mini_o3_jax.train import state as state_lib

GROUP = 4
PROMPTS = 4
ROLLOUT = RolloutConfig(num_slots=PROMPTS * GROUP, max_turns=2, max_context=512, max_turn_tokens=4, max_images=2,
                        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4, sampling=SamplingParams(temperature=1.0),
                        decode_steps=4, chunk_buckets=(128,), patch_buckets=(16,), image_row_buckets=(16,),
                        window_min=0, max_forced_tokens=8)
BATCH = batch_lib.BatchConfig(PROMPTS * GROUP, length_buckets=(512,), patch_buckets=(32,))


@pytest.fixture(scope="module")
def tokenizer():
  corpus = [prompts.question_prompt("What colour is the cup?"), "<think>zoom</think><answer>red</answer>"] * 4
  return tok_lib.build_small_tokenizer(corpus, vocab_size=512)


@pytest.fixture(scope="module")
def model(tokenizer):
  ids = tok_lib.special_token_ids(tokenizer)
  cfg = config_lib.tiny(512, **{k: ids[k] for k in ("image_token_id", "vision_start_token_id",
                                                     "vision_end_token_id", "video_token_id")})
  return vlm.random_model(cfg, seed=0)


@pytest.fixture(scope="module")
def sampler(model, tokenizer):
  return Sampler(model, tokenizer, ROLLOUT)


def tasks(step, n=PROMPTS):
  image = Image.fromarray(np.full((56, 56, 3), 40 * (step % 5), np.uint8))
  return [t for j in range(n) for t in [Task(image, "What colour is the cup?", gold="red", id=f"s{step}p{j}")] * GROUP]


def even_first_token(result) -> float:
  """The toy reward: 1 if the first sampled token is even."""
  first = result.token_ids[np.flatnonzero(result.response_mask)[0]]
  return float(first % 2 == 0)


# ------------------------------------------------------------------------------------- length stops


def test_length_stop_decides_only_the_token_cap():
  for reason in trajectory_lib.STOP_REASONS:
    masked = reason in trajectory_lib.OVERTURN_STOP_REASONS
    assert trajectory_lib.overturn_from_stop_reason(reason, "overturn") == masked
    assert trajectory_lib.overturn_from_stop_reason(reason, "wrong") == (masked and reason != "max_response")
  with pytest.raises(ValueError, match="length_stop"):
    trajectory_lib.overturn_from_stop_reason("answer", "ignore")


def test_length_stop_wrong_keeps_capped_turns_in_the_loss(sampler):
  """4-token turns rarely finish: most trajectories stop at the cap. "overturn" masks exactly those;
  "wrong" keeps them in the loss with their reward."""
  results = sampler.rollout(tasks(0), seed=1)
  capped = [r.stop_reason == "max_response" for r in results]
  assert sum(capped) > len(results) // 2 and set(r.stop_reason for r in results) <= {"max_response", "no_action"}
  wrong, stats = rollouts.rl_examples(results, even_first_token, "wrong")
  masked, _ = rollouts.rl_examples(results, even_first_token, "overturn")
  assert not any(e["overturn"] for e in wrong) and [e["overturn"] for e in masked] == capped
  assert stats["rollout_length_stop"] == np.mean(capped)
  np.testing.assert_array_equal([e["reward"] for e in wrong], [even_first_token(r) for r in results])


# -------------------------------------------------------------------------------- loss aggregation


def _grpo_inputs(seed=0, b=6, t=9):
  rng = np.random.default_rng(seed)
  resp = (rng.random((b, t)) < 0.6).astype(np.float32)
  resp[2] = 0.0  # a row without response tokens (padding)
  logp = rng.normal(-1.0, 0.3, (b, t)).astype(np.float32)
  old = (logp + rng.normal(0, 0.2, (b, t))).astype(np.float32)
  adv = rng.normal(size=b).astype(np.float32)
  overturn = np.array([0, 1, 0, 0, 1, 0], bool)
  return logp, old, adv, resp, overturn


def _numpy_pg(logp, old, adv, clip_low=0.2, clip_high=0.3):
  ratio = np.exp(logp - old)
  return np.maximum(-adv[:, None] * ratio, -adv[:, None] * np.clip(ratio, 1 - clip_low, 1 + clip_high))


def test_loss_aggregation_seq_mean_token_mean_matches_numpy():
  logp, old, adv, resp, overturn = _grpo_inputs()
  pg = _numpy_pg(logp, old, adv)
  mask = resp * (1 - overturn[:, None])
  per_row = (pg * mask).sum(1) / np.maximum(mask.sum(1), 1)  # each trajectory's token mean (0 when masked)
  n_traj = (resp.sum(1) > 0).sum()  # masked trajectories stay in the count, the empty row does not
  want = per_row.sum() / n_traj
  got, _ = objective.grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(resp),
                            jnp.asarray(overturn), aggregation="seq_mean_token_mean")
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  token, _ = objective.grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(resp),
                              jnp.asarray(overturn), aggregation="token_mean")
  np.testing.assert_allclose(float(token), (pg * mask).sum() / mask.sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="aggregation"):
    objective.grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(resp),
                     jnp.asarray(overturn), aggregation="sum")


def test_loss_aggregation_a_mostly_masked_batch_takes_a_smaller_step():
  """seq_mean_token_mean: masking half the trajectories halves the loss of the rest; token_mean does not."""
  logp, old, adv, resp, _ = _grpo_inputs(seed=1)
  resp[2] = 1.0
  none = np.zeros(6, bool)
  half = np.array([1, 1, 1, 0, 0, 0], bool)
  adv[:3] = 0.0  # the masked rows would contribute nothing anyway: isolate the normaliser
  args = lambda ot: (jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(resp), jnp.asarray(ot))
  seq_all, _ = objective.grpo_loss(*args(none), aggregation="seq_mean_token_mean")
  seq_half, _ = objective.grpo_loss(*args(half), aggregation="seq_mean_token_mean")
  np.testing.assert_allclose(float(seq_half), float(seq_all), rtol=1e-5)  # same sum over the same 6 rows
  tok_all, _ = objective.grpo_loss(*args(none))
  tok_half, _ = objective.grpo_loss(*args(half))
  kept = resp[3:].sum() / resp.sum()
  np.testing.assert_allclose(float(tok_half) * kept, float(tok_all), rtol=1e-5)  # renormalised over fewer tokens


def _rl_batch(model, seed=3, **overrides):
  examples = batch_lib.random_examples(model.config, 8, seq_len=40, images_per_row=0, rl=True, group_size=4,
                                       seed=seed)
  for key, values in overrides.items():
    for e, v in zip(examples, values):
      e[key] = v
  return batch_lib.collate_rl(examples, model.config, batch_lib.BatchConfig(8, length_buckets=(48,),
                                                                              patch_buckets=(16,)))


def test_loss_aggregation_is_global_across_micro_batches(model):
  """Two micro-batches give the loss and gradients of one (the trajectory count is global)."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  graphdef = nnx.split(model)[0]
  batch = _rl_batch(model, overturn=[True, False] * 4)
  out = []
  for k in (1, 2):
    cfg = rl.RLConfig(loss_aggregation="seq_mean_token_mean", grad_accum_steps=k, train_vision=False)
    loss, _, grads = jax.jit(lambda p, b, cfg=cfg: rl.rl_loss_and_grads(cfg, graphdef, p, b))(params, batch)
    out.append((float(loss), grads))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------------------------ old log-probs


class Env:
  """One GRPO step (the original's aggregation, the sampler's suppressed tokens) compiled once per batch
  shape, and fresh copies of the initial train state for every run."""

  def __init__(self, model, lr=1e-2):
    self.mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    opt = opt_lib.OptimizerConfig(lr=lr, warmup_steps=0, total_steps=1000, end_lr_ratio=1.0, weight_decay=0.0,
                                  grad_clip_norm=1.0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state, shardings, tx = state_lib.create_train_state(model.config, lambda p: state_lib.make_tx(opt, p),
                                                        self.mesh, params=params)
    self.model_config, self.shardings, self.initial = model.config, shardings, jax.device_get(state)
    self.config = rl.RLConfig(suppressed_token_ids=vision_token_ids(model.config),
                              loss_aggregation="seq_mean_token_mean")
    self.step = rl.make_rl_step(self.config, tx, self.mesh, shardings)
    self.logprobs = rl.make_logprob_fn(self.config, state.graphdef, self.mesh)

  def fresh_state(self):
    return jax.device_put(self.initial, self.shardings)

  def batch(self, examples, batch_config=BATCH):
    return batch_lib.shard_batch(batch_lib.collate_rl(examples, self.model_config, batch_config), self.mesh)


@pytest.fixture(scope="module")
def env(model):
  return Env(model)


def test_old_logprobs_from_the_sampler_give_ratio_one(env, sampler):
  """The sampler's recorded log-probs, through example_from_rollout and collate_rl, equal the training
  forward's (fp32): the first update's ratio is 1 and nothing is clipped."""
  results = sampler.rollout(tasks(1), seed=2)
  examples, _ = rollouts.rl_examples(results, even_first_token, "wrong")
  batch = env.batch(examples)
  state = env.fresh_state()
  recomputed = np.asarray(env.logprobs(state.params, batch))
  resp = np.asarray(batch.response_mask) > 0
  assert resp.sum() == sum(int(r.response_mask.sum()) for r in results) > 0
  np.testing.assert_allclose(np.exp(recomputed - np.asarray(batch.old_logprobs))[resp], 1.0, atol=1e-5)
  _, metrics = env.step(state, batch)
  assert abs(float(metrics["approx_kl"])) < 1e-6 and float(metrics["clip_fraction"]) == 0.0


def test_old_logprobs_recompute_equals_numpy_log_softmax(model, env):
  """make_logprob_fn: log_softmax(logits / T) of the next token on response positions (suppressed
  tokens masked), 0 elsewhere."""
  batch = _rl_batch(model)
  logprob_fn = rl.make_logprob_fn(dataclasses.replace(env.config, temperature=0.7), nnx.split(model)[0])
  got = np.asarray(logprob_fn(nnx.to_pure_dict(nnx.state(model, nnx.Param)), batch))
  logits = np.asarray(jax.jit(lambda m, x: m.forward(x))(model, batch.inputs), np.float64)
  logits[..., list(vision_token_ids(model.config))] = -1e9  # the sampler's suppressed tokens
  logits /= 0.7
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ids = np.asarray(batch.inputs.input_ids)
  want = np.zeros(ids.shape)
  want[:, 1:] = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
  want *= np.asarray(batch.response_mask) > 0
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_old_logprobs_recomputed_in_the_update_loop_and_ppo_epochs(env, sampler):
  """run_updates with recomputation and 2 epochs x 2 mini-batches of whole groups: 4 updates; the first
  one's ratio is 1; the last one (mini-batch 1, from the params after three updates) has the approx_kl
  numpy computes from the log-probs before and after those updates."""
  results = sampler.rollout(tasks(2), seed=3)
  examples, _ = rollouts.rl_examples(results, even_first_token, "wrong")
  half = dataclasses.replace(BATCH, batch_size=PROMPTS * GROUP // 2)
  minis = rollouts.mini_batches(examples, 2)
  assert [len({e["group_id"] for e in mb}) for mb in minis] == [2, 2]
  batches = [env.batch(mb, half) for mb in minis]
  _, metrics = rl.run_updates(env.fresh_state(), env.step, batches, epochs=2, logprob_fn=env.logprobs)
  assert metrics["updates"] == 4.0
  assert abs(metrics["first_approx_kl"]) < 1e-6 and metrics["first_clip_fraction"] == 0.0
  assert abs(metrics["sampler_logprob_gap"]) < 1e-5
  replay = env.fresh_state()
  old = [env.logprobs(replay.params, b) for b in batches]
  for i in (0, 1, 0):
    replay, _ = env.step(replay, dataclasses.replace(batches[i], old_logprobs=old[i]))
  new = np.asarray(env.logprobs(replay.params, batches[1]))
  resp = np.asarray(batches[1].response_mask)[:, 1:] > 0
  want = (np.asarray(old[1]) - new)[:, 1:][resp].mean()
  np.testing.assert_allclose(metrics["approx_kl"], want, rtol=1e-3, atol=1e-7)
  assert abs(metrics["approx_kl"]) > 1e-6


# ---------------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_keeps_only_informative_groups(sampler):
  config = ml_collections.ConfigDict(dict(seed=0, view_pixels=112 * 112, rl=dict(
      prompts_per_step=PROMPTS, group_size=GROUP, tiers=("easy",), length_stop="wrong", dynamic_sampling=True,
      dynamic_sampling_max_rounds=3)))
  plain = rollouts.RolloutBatch(*rollouts.rl_examples(sampler.rollout(tasks(0), seed=0), even_first_token,
                                                        "wrong"))
  groups = rollouts.groups_of(plain.examples)
  rewards = np.array([[e["reward"] for e in g] for g in groups])                  # [prompts, group]
  np.testing.assert_array_equal([rollouts.informative(g) for g in groups], rewards.min(1) < rewards.max(1))
  overturned = [dict(e, overturn=True) for e in groups[0]]
  assert not rollouts.informative(overturned)  # over-turns count as reward 0 whatever their reward

  # The demo's synthetic prompt stream through the real sampler, scored by the toy reward.
  drawn = rl_stages.draw_batch(config, sampler, even_first_token, step=0)
  kept = rollouts.groups_of(drawn.examples)
  n_informative = int(drawn.stats["dynamic_groups_kept"])
  assert len(kept) == PROMPTS and all(rollouts.informative(g) for g in kept[:n_informative])
  assert not any(rollouts.informative(g) for g in kept[n_informative:])  # the fill, only when short
  assert n_informative == PROMPTS or drawn.stats["dynamic_rounds"] == 3
  assert drawn.stats["dynamic_groups_drawn"] == PROMPTS * (1 + drawn.stats["dynamic_rounds"])
  assert rl_stages.prompt_indices(run_config.rl_draws(config), 0, 1).start >= rl_stages.DYNAMIC_INDEX_OFFSET


# ------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("length_stop,masking", [("wrong", True), ("overturn", False)])
def test_rl_learns_a_toy_reward(env, sampler, model, length_stop, masking):
  """Real rollout -> GRPO update -> set_params cycles raise the toy reward beyond its noise, with the mask
  on (capped turns count as wrong, so nothing is masked) and off (capped turns would be over-turns).
  (With the mask on and every trajectory an over-turn nothing is learnt: the gradient is exactly zero,
  tests/test_train_steps.py.)"""
  state = env.fresh_state()
  sampler.set_params(state.model())
  first = None
  for i in range(5):
    results = sampler.rollout(tasks(10 + i), seed=100 + i)
    examples, stats = rollouts.rl_examples(results, even_first_token, length_stop)
    if not masking:
      examples = [dict(e, overturn=False) for e in examples]
    first = stats["rollout_accuracy"] if first is None else first
    state, _ = env.step(state, env.batch(examples))
    sampler.set_params(state.model())
  final = np.mean([even_first_token(r) for r in sampler.rollout(tasks(99, n=8), seed=7)])  # 128 samples
  sampler.set_params(model)
  assert final > 0.5 + 3 * np.sqrt(0.25 / 128) and final > first, (first, final)
