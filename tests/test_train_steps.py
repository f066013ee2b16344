"""Sharded SFT / GRPO steps: mesh equivalence, learning signal, over-turn masking, batches."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import row_inputs  # noqa: E402
import train_worker as W  # noqa: E402

from mini_o3_jax.rl import advantages as advantages_lib  # noqa: E402
from mini_o3_jax.rl import step as rl  # noqa: E402
from mini_o3_jax import sharding  # noqa: E402
from mini_o3_jax.train import batch as batch_lib  # noqa: E402
from mini_o3_jax.train import distributed  # noqa: E402
from mini_o3_jax.train import forward as forward_lib  # noqa: E402
from mini_o3_jax.train import losses  # noqa: E402
from mini_o3_jax.train import sft  # noqa: E402
from mini_o3_jax.train import state as state_lib  # noqa: E402

SFT_CONFIG = sft.SFTConfig(grad_accum_steps=2)
# RL runs here are text-only with a frozen vision tower (cheaper to compile).
RL_CONFIG = rl.RLConfig(train_vision=False)  # the recipe's defaults (no KL, no entropy bonus)
# Every option at once, for the (slower) sharded comparison.
RL_FULL_CONFIG = rl.RLConfig(grad_accum_steps=2, kl_coef=0.05, entropy_coef=0.01, logits_chunk=24,
                             clip_ratio_c=3.0, train_vision=False)


class Env:
  """One model config and initial state; states and compiled steps cached per mesh (module scope)."""

  def __init__(self):
    self.cfg = W.micro_config()
    self.params = W.host_params(self.cfg)
    self.meshes, self.steps = {}, {}

  def mesh(self, shape):
    if shape not in self.meshes:
      self.meshes[shape] = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    return self.meshes[shape]

  def state(self, shape, kind):
    """A fresh (donatable) initial state on the mesh; RL states carry a reference copy."""
    key = (shape, kind)
    if key not in self.steps:
      opt = (W.optimizer_config(lr=1e-2) if kind == "sft" else
             W.optimizer_config(lr=1e-3, freeze_vision=True, vision_prefix="visual"))
      state, shardings, tx = state_lib.create_train_state(
          self.cfg, lambda p: state_lib.make_tx(opt, p), self.mesh(shape),
          params=self.params, with_reference=(kind == "rl_full"))
      if kind == "sft":
        step = sft.make_sft_step(SFT_CONFIG, tx, self.mesh(shape), shardings)
      elif kind == "rl":
        step = rl.make_rl_step(RL_CONFIG, tx, self.mesh(shape), shardings)
      else:
        step = rl.make_rl_step(RL_FULL_CONFIG, tx, self.mesh(shape), shardings)
      self.steps[key] = (jax.device_get(state), shardings, step)
    host, shardings, step = self.steps[key]
    return jax.device_put(host, shardings), step

  def run(self, shape, kind, host_batch, num_steps):
    state, step = self.state(shape, kind)
    batch = batch_lib.shard_batch(host_batch, self.mesh(shape))
    metrics = []
    for _ in range(num_steps):
      state, m = step(state, batch)
      metrics.append(jax.device_get(m))
    return state, metrics


@pytest.fixture(scope="module")
def env():
  return Env()


def _sft_batch(cfg, images=0, seed=1):
  examples = batch_lib.random_examples(cfg, 8, seq_len=40, images_per_row=images, grid=(1, 4, 4), seed=seed)
  return batch_lib.collate_sft(examples, cfg, batch_lib.BatchConfig(8, **W.BATCH))


def _rl_batch(cfg, seed=2, **overrides):
  examples = batch_lib.random_examples(cfg, 8, seq_len=40, images_per_row=0, rl=True, group_size=4, seed=seed)
  for key, values in overrides.items():
    for e, v in zip(examples, values):
      e[key] = v
  return batch_lib.collate_rl(examples, cfg, batch_lib.BatchConfig(8, **W.BATCH))


def _assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=str(path))


def _assert_metrics_close(got, want, rtol=2e-5, atol=2e-6):
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


# ------------------------------------------------------------------------------ sharded == single

@pytest.mark.parametrize("shape", [(2, 2, 2), pytest.param((1, 4, 2), marks=pytest.mark.slow)])
def test_sft_sharded_step_matches_single_device(env, shape):
  batch = _sft_batch(env.cfg)
  ref_state, ref_metrics = env.run((1, 1, 1), "sft", batch, 2)
  state, metrics = env.run(shape, "sft", batch, 2)
  for got, want in zip(metrics, ref_metrics):
    _assert_metrics_close(got, want)
  _assert_trees_close(jax.device_get(state.params), jax.device_get(ref_state.params), atol=2e-5)
  # The state stays laid out by the logical rules (FSDP over `fsdp`, heads over `tensor`).
  q = state.params["model"]["layers"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if "q_proj" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
  assert len(moments) == 2 and all(m.sharding.spec == q.sharding.spec for m in moments)
  assert int(state.step) == 2


@pytest.mark.slow
def test_sft_sharded_step_with_images_matches_single_device(env):
  batch = _sft_batch(env.cfg, images=1)
  assert batch.inputs.pixel_values.shape == (8, 16, env.cfg.vision.patch_dim)
  ref_state, ref_metrics = env.run((1, 1, 1), "sft", batch, 1)
  state, metrics = env.run((2, 2, 2), "sft", batch, 1)
  _assert_metrics_close(metrics[0], ref_metrics[0])
  _assert_trees_close(jax.device_get(state.params), jax.device_get(ref_state.params), atol=2e-5)


@pytest.mark.slow
def test_rl_sharded_step_matches_single_device(env):
  batch = _rl_batch(env.cfg)
  ref_state, ref_metrics = env.run((1, 1, 1), "rl_full", batch, 2)
  state, metrics = env.run((2, 2, 2), "rl_full", batch, 2)
  assert ref_metrics[1]["kl_ref"] > 0 and "dual_clip_fraction" in ref_metrics[1]
  for got, want in zip(metrics, ref_metrics):
    _assert_metrics_close(got, want, rtol=1e-4, atol=1e-5)
  _assert_trees_close(jax.device_get(state.params), jax.device_get(ref_state.params), atol=2e-5)


# ------------------------------------------------------------------------------- learning signal

def test_sft_loss_is_global_token_mean(env):
  """The step's loss == CE over all assistant tokens of the batch / their count (padding rows included)."""
  batch = _sft_batch(env.cfg)
  _, metrics = env.run((1, 1, 1), "sft", batch, 1)
  graphdef = state_lib.abstract_model(env.cfg)[0]

  @jax.jit
  def reference(params, b):
    logits = nnx.merge(graphdef, params).forward(b.inputs)
    targets, mask = losses.next_token_targets(b.inputs.input_ids, b.loss_mask)
    logits = logits[:, :-1]
    n = jnp.sum(mask)
    correct = (jnp.argmax(logits, axis=-1) == targets) * mask
    return -jnp.sum(losses.token_logprobs(logits, targets) * mask) / n, n, jnp.sum(correct) / n

  want, num_tokens, accuracy = reference(env.params, batch)
  np.testing.assert_allclose(metrics[0]["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(metrics[0]["num_loss_tokens"], num_tokens)
  np.testing.assert_allclose(metrics[0]["accuracy"], accuracy, atol=1e-6)
  assert metrics[0]["num_tokens"] == batch.inputs.attention_mask.sum()


def test_sft_loss_falls_on_a_fixed_batch(env):
  batch = _sft_batch(env.cfg)
  _, metrics = env.run((1, 1, 1), "sft", batch, 40)
  first, last = metrics[0]["loss"], metrics[-1]["loss"]
  assert last < 0.5 * first, (first, last)
  assert metrics[-1]["accuracy"] > metrics[0]["accuracy"] + 0.3


def _policy_logprobs(state, host_batch):
  """(token log-probs aligned with input_ids [batch, seq], response-token sums per row [batch])."""
  @jax.jit
  def fn(params, b):
    model = nnx.merge(state.graphdef, params)
    lp = losses.token_logprobs(model.forward(b.inputs)[:, :-1], b.inputs.input_ids[:, 1:])
    lp = jnp.pad(lp, ((0, 0), (1, 0))) * b.response_mask
    return lp, jnp.sum(lp, axis=-1)
  return jax.device_get(fn(jax.device_get(state.params), jax.tree.map(jnp.asarray, host_batch)))


def test_grpo_step_raises_positive_and_lowers_negative_trajectories(env):
  rewards = [1, 0, 0, 0, 0, 1, 1, 1]
  batch = _rl_batch(env.cfg, reward=rewards, overturn=[False] * 8)
  state, _ = env.state((1, 1, 1), "rl")
  old, before = _policy_logprobs(state, batch)
  batch = dataclasses.replace(batch, old_logprobs=old)  # on-policy: ratio 1, as right after the rollout
  state, metrics = env.run((1, 1, 1), "rl", batch, 1)
  _, after = _policy_logprobs(state, batch)
  m = metrics[0]
  assert m["clip_fraction"] == 0.0 and abs(m["approx_kl"]) < 1e-6  # on-policy: ratio == 1
  assert m["zero_adv_group_fraction"] == 0.0
  delta = after - before
  positive = np.asarray(rewards) == 1
  # In each group the lone odd-one-out has the large advantage: its log-prob must move the right way.
  assert delta[0] > 0 and delta[4] < 0, delta
  assert delta[positive].mean() > 0 > delta[~positive].mean(), delta


def test_all_overturn_batch_gives_zero_gradient_and_unchanged_params(env):
  batch = _rl_batch(env.cfg, reward=[1, 0, 1, 0, 0, 1, 1, 1], overturn=[True] * 8)
  state, _ = env.state((1, 1, 1), "rl")
  params_before = jax.device_get(state.params)
  state, metrics = env.run((1, 1, 1), "rl", batch, 1)
  m = metrics[0]
  assert m["grad_norm"] == 0.0 and m["loss"] == 0.0 and m["num_loss_tokens"] == 0.0
  assert m["masked_fraction"] == 1.0
  # AdamW without decay turns an exactly-zero gradient into an exactly-zero update.
  for x, y in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params_before)):
    np.testing.assert_array_equal(x, y)


def test_overturn_masking_switch(env):
  """On: over-turn rows leave the loss and the normaliser. Off: they are reward-0 answers."""
  overturn = [True, False, False, False, False, False, True, False]
  batch = _rl_batch(env.cfg, reward=[1, 1, 0, 0, 1, 0, 1, 0], overturn=overturn)
  batch = jax.tree.map(jnp.asarray, batch)
  graphdef = state_lib.abstract_model(env.cfg)[0]
  cfg_on = rl.RLConfig(entropy_metric=False, train_vision=False)
  cfg_off = rl.RLConfig(entropy_metric=False, overturn_masking=False, train_vision=False)

  @jax.jit
  def both(params, b):
    return (rl.rl_loss_and_grads(cfg_on, graphdef, params, b)[1],
            rl.rl_loss_and_grads(cfg_off, graphdef, params, b)[1])

  on, off = jax.device_get(both(env.params, batch))
  resp = np.asarray(batch.response_mask)[:, 1:].sum(-1)
  ot = np.asarray(overturn)
  assert on["num_loss_tokens"] == resp[~ot].sum()
  assert off["num_loss_tokens"] == resp.sum()
  assert on["masked_fraction"] == off["masked_fraction"] == 0.25
  # Rewards of over-turn rows count as 0 either way: group 0 = [0, 1, 0, 0], group 1 = [1, 0, 0, 0].
  assert on["reward_mean"] == off["reward_mean"] == 2 / 8
  assert on["loss"] != off["loss"]
  # The pipeline's ablation: the masking step with every flag cleared (rewards of over-turn rows 0) is
  # the masking-off step, loss and gradients alike (so both runs share one compiled step).
  cleared = dataclasses.replace(batch, overturn=jnp.zeros_like(batch.overturn),
                                rewards=jnp.where(batch.overturn, 0.0, batch.rewards))
  loss_off, _, grads_off = jax.jit(lambda p, b: rl.rl_loss_and_grads(cfg_off, graphdef, p, b))(env.params, batch)
  loss_cl, _, grads_cl = jax.jit(lambda p, b: rl.rl_loss_and_grads(cfg_on, graphdef, p, b))(env.params, cleared)
  np.testing.assert_allclose(float(loss_cl), float(loss_off), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_cl), jax.tree.leaves(grads_off)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)


def test_rl_advantages_follow_the_config():
  rewards = jnp.array([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
  groups = jnp.array([0, 0, 0, 0, 1, 1, 1, -1])  # last row: padding
  overturn = jnp.array([True, False, False, False, False, False, False, False])
  advantages = jax.jit(advantages_lib.trajectory_advantages, static_argnums=0)
  r, adv, m = advantages(rl.RLConfig(), rewards, groups, overturn)
  assert r[0] == 0.0  # forced to 0
  g0 = np.array([0.0, 1.0, 0.0, 0.0])
  np.testing.assert_allclose(adv[:4], (g0 - g0.mean()) / (g0.std(ddof=1) + 1e-6), rtol=1e-5)
  np.testing.assert_allclose(adv[4:7], 0.0)  # all-equal group
  np.testing.assert_allclose(m["degenerate_group_fraction"], 0.5)  # padding row forms no group
  _, adv_ex, _ = advantages(rl.RLConfig(exclude_masked_from_stats=True), rewards, groups, overturn)
  g0v = np.array([1.0, 0.0, 0.0])
  np.testing.assert_allclose(adv_ex[1:4], (g0v - g0v.mean()) / (g0v.std(ddof=1) + 1e-6), rtol=1e-5)
  assert adv_ex[0] == 0.0


def test_chunked_head_matches_full(env):
  model = nnx.merge(state_lib.abstract_model(env.cfg)[0], env.params)
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 13, 32)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, W.MICRO_VOCAB, size=(2, 13)))

  def total(h, chunk):
    st = forward_lib.head_token_stats(model, h, targets, chunk=chunk, entropy=True, correct=True)
    return jnp.sum(st["logprobs"]) + jnp.sum(st["entropy"]), st

  @jax.jit
  def both(h):
    (full, full_st), g_full = jax.value_and_grad(lambda x: total(x, None), has_aux=True)(h)
    (chunked, chunked_st), g_chunk = jax.value_and_grad(lambda x: total(x, 5), has_aux=True)(h)
    return full, full_st, g_full, chunked, chunked_st, g_chunk

  full, full_st, g_full, chunked, chunked_st, g_chunk = both(hidden)
  # float32 sums of 26 log-probs and entropies in another order: a few ulps apart (AMD EPYC: 3.9e-6).
  np.testing.assert_allclose(chunked, full, rtol=1e-5)
  for k in full_st:
    np.testing.assert_allclose(chunked_st[k], full_st[k], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_chunk, g_full, rtol=1e-5, atol=1e-6)


def test_sft_objective_token_and_sequence_mean():
  lp = jnp.asarray([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  mask = jnp.asarray([[1, 1, 1], [1, 0, 0], [0, 0, 0]])

  @jax.jit
  def objectives(lp, mask):
    token = sft.sft_objective(lp, mask, sft.sft_normalizer(mask, False))
    seq = sft.sft_objective(lp, mask, sft.sft_normalizer(mask, True), sequence_mean=True)
    empty = sft.sft_objective(lp, mask * 0, sft.sft_normalizer(mask * 0, False))
    return token, seq, empty, jax.grad(lambda x: sft.sft_objective(x, mask * 0, jnp.float32(0)))(lp)

  token, seq, empty, grad = objectives(lp, mask)
  assert float(token) == pytest.approx(10 / 4)        # every loss token weighs the same
  assert float(seq) == pytest.approx((2 + 4) / 2)     # every sequence weighs the same
  assert float(empty) == 0.0 and not np.any(np.asarray(grad))


# --------------------------------------------------------------------------------------- batches

def test_collate_matches_prepare_row_inputs_and_buckets(env):
  cfg = env.cfg
  examples = batch_lib.random_examples(cfg, 3, seq_len=40, images_per_row=2, grid=(1, 4, 4), seed=5)
  host = batch_lib.collate_sft(examples, cfg, batch_lib.BatchConfig(4, length_buckets=(48, 96),
                                                                    patch_buckets=(16, 32, 64)))
  assert host.inputs.input_ids.shape == (4, 48)                        # bucketed length, 4 rows
  assert host.inputs.pixel_values.shape == (4, 32, cfg.vision.patch_dim)  # 2 images x 16 patches
  assert host.loss_mask[3].sum() == 0 and host.inputs.attention_mask[3].sum() == 0  # padding row
  want, _ = row_inputs.prepare_row_inputs(
      cfg, host.inputs.input_ids, host.inputs.attention_mask,
      [e["pixel_values"] for e in examples] + [None], [e["image_grid_thw"] for e in examples] + [None],
      pad_patches_to=32)
  for x, y in zip(jax.tree.leaves(host.inputs), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    batch_lib.collate_sft(examples, cfg, batch_lib.BatchConfig(4, length_buckets=(16,)))
  # Patches padded to the sequence bucket: one shape per length bucket; too many patches fall back.
  follow = batch_lib.collate_sft(examples, cfg, batch_lib.BatchConfig(
      4, length_buckets=(48, 96), patch_buckets=(16, 32, 64), patches_follow_length=True))
  assert follow.inputs.pixel_values.shape == (4, 48, cfg.vision.patch_dim)
  np.testing.assert_array_equal(follow.inputs.pixel_values[:, :32], host.inputs.pixel_values)
  many = batch_lib.random_examples(cfg, 2, seq_len=20, images_per_row=2, grid=(1, 4, 4), seed=6)
  assert batch_lib.collate_sft(many, cfg, batch_lib.BatchConfig(
      4, length_buckets=(24,), patch_buckets=(64,), patches_follow_length=True)).inputs.pixel_values.shape[1] == 64


def test_collate_rl_groups_and_padding(env):
  examples = batch_lib.random_examples(env.cfg, 5, seq_len=30, images_per_row=0, rl=True, seed=4)
  for e, g in zip(examples, ["q7", "q7", "q3", "q7", "q3"]):
    e["group_id"] = g
  host = batch_lib.collate_rl(examples, env.cfg, batch_lib.BatchConfig(6, **W.BATCH))
  np.testing.assert_array_equal(host.group_ids, [0, 0, 1, 0, 1, -1])
  assert host.ref_logprobs is None
  assert np.all(host.old_logprobs[host.response_mask == 0] == 0)
  assert host.response_mask[5].sum() == 0


def test_split_microbatches_is_strided():
  ids = np.arange(8)[:, None] * np.ones((1, 3), int)
  positions = np.stack([ids] * 3)
  micro = batch_lib.split_microbatches({"input_ids": ids, "positions": positions}, 2)
  np.testing.assert_array_equal(micro["input_ids"][1][:, 0], [1, 3, 5, 7])
  np.testing.assert_array_equal(micro["positions"][0][:, :, 0], [[0, 2, 4, 6]] * 3)


def test_host_rows_single_process(env):
  np.testing.assert_array_equal(distributed.host_rows(env.mesh((2, 2, 2)), 8), np.arange(8))
  assert distributed.is_main_process()
  assert not distributed.maybe_initialize(distributed.DistributedConfig(auto_on_tpu=False))


def test_example_from_rollout(env):
  import types
  result = types.SimpleNamespace(
      token_ids=np.arange(10), response_mask=np.array([0] * 6 + [1] * 4),
      logprobs=np.array([0.0] * 6 + [-0.5] * 4), pixel_values=[np.ones((16, 5)), np.zeros((16, 5))],
      image_grid_thw=np.array([[1, 4, 4], [1, 4, 4]]), overturn=True)
  ex = batch_lib.example_from_rollout(result, reward=1.0, group_id="q1")
  assert ex["pixel_values"].shape == (32, 5) and ex["image_grid_thw"].shape == (2, 3)
  assert ex["overturn"] is True and ex["reward"] == 1.0 and ex["loss_mask"].sum() == 4
