"""Tests of the loss math (train.losses, train.sft's objective, rl.advantages, rl.objective) against
plain numpy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mini_o3_jax.rl import advantages as _advantages
from mini_o3_jax.rl import objective as _objective
from mini_o3_jax.train import losses as _losses
from mini_o3_jax.train import sft

B, T, V = 4, 7, 11


class _Jitted:
  """`losses.f(*arrays, **static)` -> cached `jax.jit` of f with the statics.

  Eager op-by-op dispatch compiles every primitive; one cached jit per
  (function, static arguments) is several times faster on CPU.
  """

  def __init__(self, module):
    self._module = module
    self._cache = {}

  def __getattr__(self, name):
    fn = getattr(self._module, name)
    is_static = lambda v: isinstance(v, (bool, int, float, type(None)))

    def call(*args, **kwargs):
      static = tuple(sorted((k, v) for k, v in kwargs.items() if is_static(v)))
      dyn = {k: v for k, v in kwargs.items() if not is_static(v)}
      pos_static = tuple((i, v) for i, v in enumerate(args) if is_static(v))
      pos_dyn = [v for v in args if not is_static(v)]
      key = (name, len(args), pos_static, static)
      if key not in self._cache:
        ps = dict(pos_static)

        def f(a, d):
          it = iter(a)
          full = [ps[i] if i in ps else next(it) for i in range(len(args))]
          return fn(*full, **d, **dict(static))

        self._cache[key] = jax.jit(f)
      return self._cache[key](pos_dyn, dyn)

    return call


losses = _Jitted(_losses)
advantages = _Jitted(_advantages)
objective = _Jitted(_objective)


# ----------------------------------------------------------------------------
# numpy oracles (no jax).
# ----------------------------------------------------------------------------


def np_log_softmax(z):
  z = z.astype(np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_group_adv(rewards, group_ids, valid, normalize_std, eps, exclude):
  rewards = np.asarray(rewards, np.float64)
  adv = np.zeros_like(rewards)
  degenerate, nonempty = 0, 0
  for g in np.unique(group_ids):
    idx = np.where(group_ids == g)[0]
    nonempty += 1
    members = idx[valid[idx]] if exclude else idx
    r = rewards[members]
    if len(r) < 2 or np.all(r == r[0]):
      degenerate += 1
      continue
    mean, std = r.mean(), r.std(ddof=1)
    for i in members:
      adv[i] = (rewards[i] - mean) / (std + eps) if normalize_std else (
          rewards[i] - mean)
  return adv, degenerate / nonempty


def np_grpo(logp, old, adv, resp, overturn, masking, lo, hi, ref=None,
            kl_coef=0.0, ent=None, ent_coef=0.0):
  mask = resp * (1 - overturn[:, None]) if masking else resp.copy()
  n = mask.sum()
  ratio = np.exp(logp - old)
  a = adv[:, None]
  pg1 = -a * ratio
  pg2 = -a * np.clip(ratio, 1 - lo, 1 + hi)
  pg = np.maximum(pg1, pg2)
  out = {
      'pg_loss': (pg * mask).sum() / n,
      'clip_fraction': ((pg2 > pg1) * mask).sum() / n,
      'approx_kl': ((old - logp) * mask).sum() / n,
      'num_loss_tokens': n,
  }
  loss = out['pg_loss']
  if ref is not None:
    d = ref - logp
    k3 = np.exp(d) - d - 1
    out['kl_ref'] = (k3 * mask).sum() / n
    loss = loss + kl_coef * out['kl_ref']
  if ent is not None:
    out['entropy'] = (ent * mask).sum() / n
    loss = loss - ent_coef * out['entropy']
  rows = resp.sum(-1) > 0
  out['masked_fraction'] = overturn[rows].mean()
  # d loss / d logp (exact for tokens not at a clip boundary; no KL/entropy).
  unclipped = pg1 >= pg2
  grad = np.where(unclipped, -a * ratio, 0.0) * mask / n
  return loss, out, grad


# ----------------------------------------------------------------------------
# Token-level functions.
# ----------------------------------------------------------------------------


def test_token_logprobs_and_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  targets = rng.integers(0, V, size=(B, T))
  ls = np_log_softmax(logits)
  want_lp = np.take_along_axis(ls, targets[..., None], -1)[..., 0]
  want_ent = -(np.exp(ls) * ls).sum(-1)
  got_lp = jax.jit(losses.token_logprobs)(logits, targets)
  got_ent = jax.jit(losses.token_entropy)(logits)
  assert got_lp.dtype == jnp.float32 and got_lp.shape == (B, T)
  np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_ent, want_ent, rtol=1e-5, atol=1e-5)
  # bf16 logits: fp32 math on the (rounded) bf16 values.
  lb = jnp.asarray(logits, jnp.bfloat16)
  ls_b = np_log_softmax(np.asarray(lb.astype(jnp.float32)))
  want_b = np.take_along_axis(ls_b, targets[..., None], -1)[..., 0]
  got_b = losses.token_logprobs(lb, targets)
  assert got_b.dtype == jnp.float32
  np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-5)


def test_next_token_targets():
  ids = np.arange(12).reshape(2, 6)
  mask = np.array([[0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0]])
  t, m = losses.next_token_targets(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_array_equal(t, ids[:, 1:])
  np.testing.assert_array_equal(m, mask[:, 1:])


# ----------------------------------------------------------------------------
# SFT.
# ----------------------------------------------------------------------------


def _sft_inputs(seed=1):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)).astype(np.float32)
  targets = rng.integers(0, V, size=(B, T))
  mask = (rng.random((B, T)) < 0.6).astype(np.float32)
  mask[2] = 0  # A sequence with no loss tokens.
  # Make some predictions right so accuracy is non-trivial.
  logits[0, :, :] = -5
  logits[0, np.arange(T), targets[0]] = 5
  return logits, targets, mask


def test_sft_objective_token_mean_and_normalizer():
  logits, targets, mask = _sft_inputs()
  nll = -np.take_along_axis(np_log_softmax(logits), targets[..., None],
                            -1)[..., 0]
  n = mask.sum()
  logprobs = losses.token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
  normalizer = sft.sft_normalizer(jnp.asarray(mask), sequence_mean=False)
  np.testing.assert_allclose(normalizer, n)
  loss = jax.jit(sft.sft_objective)(logprobs, mask, normalizer)
  np.testing.assert_allclose(loss, (nll * mask).sum() / n, rtol=1e-5)
  loss2 = sft.sft_objective(logprobs, mask, jnp.float32(100.0))
  np.testing.assert_allclose(loss2, (nll * mask).sum() / 100.0, rtol=1e-5)


def test_sft_objective_sequence_mean():
  logits, targets, mask = _sft_inputs(2)
  nll = -np.take_along_axis(np_log_softmax(logits), targets[..., None],
                            -1)[..., 0]
  per_seq = [(nll[b] * mask[b]).sum() / mask[b].sum()
             for b in range(B) if mask[b].sum() > 0]
  logprobs = losses.token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
  normalizer = sft.sft_normalizer(jnp.asarray(mask), sequence_mean=True)
  np.testing.assert_allclose(normalizer, len(per_seq))
  loss = sft.sft_objective(logprobs, mask, normalizer, sequence_mean=True)
  np.testing.assert_allclose(loss, np.mean(per_seq), rtol=1e-5)


def test_sft_objective_empty_mask_zero():
  logits, targets, _ = _sft_inputs()
  mask = np.zeros((B, T), np.float32)
  for seq_mean in (False, True):
    def f(lg):
      logprobs = losses.token_logprobs(lg, jnp.asarray(targets))
      return sft.sft_objective(logprobs, mask, sft.sft_normalizer(jnp.asarray(mask), seq_mean),
                               sequence_mean=seq_mean)
    loss, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(logits))
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


# ----------------------------------------------------------------------------
# Group advantages.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('normalize_std', [True, False])
@pytest.mark.parametrize('exclude', [False, True])
def test_group_advantages(normalize_std, exclude):
  rng = np.random.default_rng(3)
  num_groups, size = 5, 4
  rewards = rng.integers(0, 2, size=num_groups * size).astype(np.float32)
  rewards[4:8] = 1.0  # all-equal group
  rewards[8:12] = [0.0, 1.0, 0.0, 0.0]
  valid = rng.random(num_groups * size) > 0.3
  valid[8:12] = [False, True, True, True]  # masked one has reward 0 anyway
  valid[12:16] = [False, False, True, False]  # excluding: single member
  # Over-turn rollouts get reward 0 (the original's convention).
  rewards = np.where(valid, rewards, 0.0).astype(np.float32)
  gids = np.repeat(np.arange(num_groups), size)
  want, want_frac = np_group_adv(rewards, gids, valid, normalize_std, 1e-6,
                                 exclude)
  kw = dict(normalize_std=normalize_std, exclude_masked_from_stats=exclude)
  adv, m = jax.jit(lambda r, v: advantages.group_advantages(r, size, v, **kw))(
      rewards, valid)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m['degenerate_group_fraction'], want_frac)
  if exclude:
    assert np.all(np.asarray(adv)[~valid] == 0.0)
  if not (normalize_std and exclude):
    return  # The id layout shares the code path; test it once (compile time).
  # Same with explicit (shuffled) group ids.
  perm = rng.permutation(len(rewards))
  adv2, m2 = advantages.group_advantages(rewards[perm], jnp.asarray(gids[perm]),
                                     valid[perm], num_groups=num_groups, **kw)
  np.testing.assert_allclose(adv2, want[perm], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m2['degenerate_group_fraction'], want_frac)


def test_group_advantages_unbiased_std_value():
  adv, _ = advantages.group_advantages(np.array([1.0, 0.0, 0.0, 0.0]), 4, eps=0.0)
  # mean .25, unbiased std = sqrt(.75 / 3) = .5
  np.testing.assert_allclose(adv, [1.5, -0.5, -0.5, -0.5], rtol=1e-6)


def test_group_advantages_all_equal_and_size_one():
  # Non-representable mean (0.1) must still give exact zeros.
  adv, m = advantages.group_advantages(np.full((6,), 0.1, np.float32), 3)
  assert np.all(np.asarray(adv) == 0.0)
  assert float(m['degenerate_group_fraction']) == 1.0
  adv, m = advantages.group_advantages(np.array([1.0, 0.0, 0.5]), 1)
  assert np.all(np.asarray(adv) == 0.0)
  assert float(m['degenerate_group_fraction']) == 1.0
  # Empty ids (num_groups larger than used) do not count as groups.
  adv, m = advantages.group_advantages(np.array([1.0, 0.0, 1.0, 1.0]),
                                   jnp.array([0, 0, 2, 2]), num_groups=4)
  np.testing.assert_allclose(adv, [.5 / np.sqrt(.5), -.5 / np.sqrt(.5), 0, 0],
                             rtol=1e-5)
  np.testing.assert_allclose(m['degenerate_group_fraction'], 0.5)


# ----------------------------------------------------------------------------
# GRPO loss.
# ----------------------------------------------------------------------------


def _grpo_inputs(seed=4):
  rng = np.random.default_rng(seed)
  old = rng.normal(-2.0, 0.5, size=(B, T)).astype(np.float32)
  logp = (old + rng.normal(0, 0.4, size=(B, T))).astype(np.float32)
  adv = np.array([1.3, -0.7, 0.9, -1.1], np.float32)
  resp = (rng.random((B, T)) < 0.7).astype(np.float32)
  resp[:, 0] = 1.0
  overturn = np.array([False, True, False, False])
  ref = (old + rng.normal(0, 0.3, size=(B, T))).astype(np.float32)
  ent = rng.random((B, T)).astype(np.float32)
  return logp, old, adv, resp, overturn, ref, ent


def _assert_both_clips_active(logp, old, adv, mask, lo, hi):
  ratio = np.exp(logp - old)
  on = mask > 0
  a = np.broadcast_to(adv[:, None], ratio.shape)
  assert np.any(on & (a > 0) & (ratio > 1 + hi)), 'upper clip never active'
  assert np.any(on & (a < 0) & (ratio < 1 - lo)), 'lower clip never active'
  assert np.any(on & (a > 0) & (ratio < 1 - lo)), 'no unclipped low ratio'


@pytest.mark.parametrize('masking', [True, False])
def test_grpo_loss_value_and_metrics(masking):
  logp, old, adv, resp, overturn, ref, ent = _grpo_inputs()
  lo, hi = 0.2, 0.3
  # Force ratios across both bounds on both advantage signs.
  logp[0, 0] = old[0, 0] + np.log(1.5)   # A>0, ratio > 1.3: clipped
  logp[3, 0] = old[3, 0] + np.log(0.6)   # A<0, ratio < 0.8: clipped
  logp[2, 0] = old[2, 0] + np.log(0.6)   # A>0, ratio < 0.8: not clipped
  logp[3, 1] = old[3, 1] + np.log(1.5)   # A<0, ratio > 1.3: not clipped
  resp[3, 1] = 1.0
  mask = resp * (1 - overturn[:, None]) if masking else resp
  _assert_both_clips_active(logp, old, adv, mask, lo, hi)
  want_loss, want, _ = np_grpo(logp, old, adv, resp, overturn, masking, lo, hi,
                               ref=ref, kl_coef=0.05, ent=ent, ent_coef=0.01)
  f = jax.jit(lambda *a: objective.grpo_loss(
      *a, clip_low=lo, clip_high=hi, ref_logprobs=ref, kl_coef=0.05,
      entropy=ent, entropy_coef=0.01, overturn_masking=masking))
  loss, m = f(logp, old, adv, resp, overturn)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  for k, v in want.items():
    np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  assert 0 < float(m['clip_fraction']) < 1
  np.testing.assert_allclose(m['masked_fraction'], 0.25)


def test_grpo_masking_changes_normaliser():
  logp, old, adv, resp, overturn, _, _ = _grpo_inputs()
  _, m_on = objective.grpo_loss(logp, old, adv, resp, overturn)
  _, m_off = objective.grpo_loss(logp, old, adv, resp, overturn,
                              overturn_masking=False)
  np.testing.assert_allclose(m_on['num_loss_tokens'], resp[~overturn].sum())
  np.testing.assert_allclose(m_off['num_loss_tokens'], resp.sum())


def test_overturn_loss_mask():
  resp = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], np.int32)
  ot = np.array([False, True, False])
  np.testing.assert_array_equal(
      objective.overturn_loss_mask(resp, ot, True), [[1, 1, 0], [0, 0, 0],
                                                  [1, 0, 1]])
  np.testing.assert_array_equal(objective.overturn_loss_mask(resp, ot, False),
                                resp)


def test_grpo_all_overturn_zero_loss_and_grad():
  logp, old, adv, resp, _, ref, ent = _grpo_inputs()
  overturn = np.ones((B,), bool)
  logp[0, 0] = -np.inf  # Garbage in masked positions must not leak NaNs.

  def f(lp, e):
    return objective.grpo_loss(lp, old, adv, resp, overturn, ref_logprobs=ref,
                            kl_coef=0.1, entropy=e, entropy_coef=0.1)

  (loss, m), (g_lp, g_e) = jax.jit(
      jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(logp, ent)
  assert float(loss) == 0.0
  assert np.all(np.asarray(g_lp) == 0.0) and np.all(np.asarray(g_e) == 0.0)
  assert float(m['num_loss_tokens']) == 0.0
  assert all(np.isfinite(np.asarray(v)) for v in m.values())


def test_grpo_masked_trajectory_tokens_do_not_matter():
  logp, old, adv, resp, overturn, ref, ent = _grpo_inputs()
  kw = dict(ref_logprobs=ref, kl_coef=0.1)
  loss, _ = objective.grpo_loss(logp, old, adv, resp, overturn, **kw)
  logp2 = logp.copy()
  logp2[1] += np.random.default_rng(9).normal(0, 2.0, size=T)  # row 1: over-turn
  loss2, _ = objective.grpo_loss(logp2, old, adv, resp, overturn, **kw)
  assert float(loss) == float(loss2)
  g = jax.jit(jax.grad(lambda lp: objective.grpo_loss(
      lp, old, adv, resp, overturn, **kw)[0]))(logp)
  assert np.all(np.asarray(g)[1] == 0.0)
  # Without masking the same perturbation changes the loss.
  loss3, _ = objective.grpo_loss(logp, old, adv, resp, overturn,
                              overturn_masking=False)
  loss4, _ = objective.grpo_loss(logp2, old, adv, resp, overturn,
                              overturn_masking=False)
  assert float(loss3) != float(loss4)


def test_grpo_gradient_matches_numpy():
  logp, old, adv, resp, overturn, _, _ = _grpo_inputs(5)
  logp[0, 0] = old[0, 0] + np.log(1.5)
  logp[3, 0] = old[3, 0] + np.log(0.6)
  g = jax.jit(jax.grad(
      lambda lp: objective.grpo_loss(lp, old, adv, resp, overturn)[0]))(logp)
  _, _, want = np_grpo(logp, old, adv, resp, overturn, True, 0.2, 0.3)
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
  assert np.asarray(g)[0, 0] == 0.0 and np.asarray(g)[3, 0] == 0.0


def test_grpo_normalizer_and_dual_clip():
  logp, old, adv, resp, overturn, _, _ = _grpo_inputs()
  loss, m = objective.grpo_loss(logp, old, adv, resp, overturn)
  loss_n, _ = objective.grpo_loss(logp, old, adv, resp, overturn,
                               normalizer=2 * m['num_loss_tokens'])
  np.testing.assert_allclose(loss_n, loss / 2, rtol=1e-6)
  # Dual clip: A < 0 and a huge ratio -> the token loss is capped at -A * c.
  lp = old.copy()
  lp[3, 0] = old[3, 0] + np.log(10.0)
  one = np.zeros((B, T), np.float32)
  one[3, 0] = 1.0
  loss_c, m_c = objective.grpo_loss(lp, old, adv, one, np.zeros(B, bool),
                                 clip_ratio_c=3.0)
  np.testing.assert_allclose(loss_c, -adv[3] * 3.0, rtol=1e-6)
  np.testing.assert_allclose(m_c['dual_clip_fraction'], 1.0)
  loss_nc, _ = objective.grpo_loss(lp, old, adv, one, np.zeros(B, bool))
  np.testing.assert_allclose(loss_nc, -adv[3] * 10.0, rtol=1e-5)
