"""The sampler engine: greedy parity with `transformers` generate, sampling statistics, stop strings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

import hf_reference as ref
from mini_o3_jax.agent import prompts
from mini_o3_jax.model.hf import load_pretrained
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax.sampler import engine as engine_lib
from mini_o3_jax.sampler import sampling as sampling_lib
from mini_o3_jax.sampler import SamplingParams, StopMatcher, generate

# ----------------------------------------------------------------------------- greedy == transformers


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  hf = ref.hf_model(ref.hf_config())
  path = str(tmp_path_factory.mktemp("gen"))
  hf.save_pretrained(path)
  ours, _ = load_pretrained(path)
  return hf, ours


GRIDS = [[1, 4, 6], [1, 6, 4], [1, 4, 4]]
# Every case has 3 rows, prompts under 16 tokens, at most 2 image rows of at most 32 patches and the
# same max_new_tokens, so they share the compiled programs (one prefill per image layout, one decode).
CASES = {
    "text_left_pad": ([[7], [12], [3]], [], "left"),
    "images_left_pad": ([[3, ("img", 0), 4], [("img", 1), 2], [5]], GRIDS[:2], "left"),
    "images_right_pad": ([[2, ("img", 0), 1], [6], [1, ("img", 1), 2, ("img", 2)]], GRIDS[:1] + GRIDS[2:] + [[1, 2, 4]],
                         "right"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers_generate(pair, case):
  hf, ours = pair
  rows, grids, side = CASES[case]
  rng = np.random.default_rng(len(case))
  ids, mask = ref.build_batch(rows, grids, rng, pad_side=side)
  kw, pv, g = {}, None, None
  if grids:
    pv, g = ref.pixel_values(grids, rng), np.array(grids)
    kw = dict(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(g))
  t = torch.tensor(ids)
  max_new = 10
  with torch.no_grad():
    if side == "left":
      want = hf.generate(input_ids=t, attention_mask=torch.tensor(mask), mm_token_type_ids=(t == ref.IMAGE).int(),
                         max_new_tokens=max_new, do_sample=False, **kw)[:, ids.shape[1]:].numpy()
    else:  # transformers generate needs left padding: run right-padded rows one by one
      want, offset = [], 0
      for r in range(len(rows)):
        real = t[r:r + 1, :int(mask[r].sum())]
        n_img = sum(isinstance(s, tuple) for s in rows[r])
        row_grids = g[offset:offset + n_img]
        row_kw = {}
        if n_img:
          lo = int(np.prod(g[:offset], -1).sum())
          row_kw = dict(pixel_values=torch.tensor(pv[lo:lo + int(np.prod(row_grids, -1).sum())]),
                        image_grid_thw=torch.tensor(row_grids))
        offset += n_img
        out = hf.generate(input_ids=real, attention_mask=torch.ones_like(real),
                          mm_token_type_ids=(real == ref.IMAGE).int(), max_new_tokens=max_new, do_sample=False,
                          **row_kw)
        want.append(out[0, real.shape[1]:].numpy())
      want = np.stack(want)
  got = generate(ours, ids, mask, pv, g, max_new_tokens=max_new, temperature=0.0)
  np.testing.assert_array_equal(got.tokens, want)
  assert got.lengths.tolist() == [max_new] * 3 and set(got.finish_reasons) == {"length"}
  # Greedy log-probs are log softmax(logits) of the chosen token: check them against a full HF forward.
  full_ids = np.concatenate([ids, got.tokens], 1)
  full_mask = np.concatenate([mask, np.ones_like(got.tokens)], 1)
  if side == "right":  # keep each row contiguous: move its padding to the left
    order = np.argsort(full_mask, axis=1, kind="stable")
    full_ids, full_mask = np.take_along_axis(full_ids, order, 1), np.take_along_axis(full_mask, order, 1)
  logits = torch.tensor(ref.hf_logits(hf, full_ids, full_mask, pv, grids or None)).double()
  want_lp = torch.log_softmax(logits, -1)[:, -max_new - 1:-1].numpy()
  want_lp = np.take_along_axis(want_lp, got.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(got.logprobs, want_lp, atol=2e-4)
  np.testing.assert_array_equal(got.sample_logprobs, 0.0)


def test_generate_stops_at_stop_token_and_pads(pair):
  _, ours = pair
  rng = np.random.default_rng(7)
  ids, mask = ref.build_batch([[7], [12], [3]], [], rng)
  free = generate(ours, ids, mask, max_new_tokens=10)
  stop = int(free.tokens[1, 3])  # row 1 emits this at step 3 (maybe earlier too)
  got = generate(ours, ids, mask, max_new_tokens=10, stop_token_ids=[stop], pad_token_id=-1)
  for r in range(3):
    hits = np.flatnonzero(free.tokens[r] == stop)
    n = hits[0] + 1 if len(hits) else 10
    assert got.lengths[r] == n
    np.testing.assert_array_equal(got.tokens[r, :n], free.tokens[r, :n])
    assert (got.tokens[r, n:] == -1).all() and (got.logprobs[r, n:] == 0).all()
    assert got.finish_reasons[r] == ("stop_token" if len(hits) else "length")


# ----------------------------------------------------------------------------- sampling statistics


def _numpy_target(logits, temperature, top_k, top_p):
  """Reference distribution written independently of the sampler: temperature, top-k, top-p."""
  z = logits / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros_like(z, bool)
  p = np.exp(z - z.max())
  k = top_k or len(z)
  p_sorted = p[order][:k] / p[order][:k].sum()
  mass = 0.0
  for rank, tok in enumerate(order[:k]):
    keep[tok] = True
    mass += p_sorted[rank]
    if mass >= top_p:
      break
  q = np.where(keep, p, 0.0)
  return q / q.sum()


PARAMS = (SamplingParams(temperature=0.6), SamplingParams(temperature=1.5, top_k=3),
          SamplingParams(temperature=1.0, top_p=0.7), SamplingParams(temperature=0.8, top_k=4, top_p=0.9))


def test_sample_frequencies_match_target():
  logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
  n = 40_000
  keys = jax.random.split(jax.random.PRNGKey(0), n)

  @jax.jit
  def draw_all(keys):  # one program for every setting: compiles are the slow part on CPU
    return [sampling_lib.sample(jnp.broadcast_to(logits, (n, 8)), keys, p)[:3] for p in PARAMS]

  for params, (toks, lp, slp) in zip(PARAMS, draw_all(keys)):
    toks, lp, slp = map(np.asarray, (toks, lp, slp))
    target = _numpy_target(logits.astype(np.float64), params.temperature, params.top_k, params.top_p)
    counts = np.bincount(toks, minlength=8)
    assert counts[target == 0].sum() == 0, f"{params}: sampled a token outside the top-k / top-p set"
    support = target > 0
    chi2 = (((counts - n * target)[support]) ** 2 / (n * target[support])).sum()
    assert chi2 < scipy.stats.chi2.ppf(0.999, support.sum() - 1), (params, counts / n, target)
    # Log-prob conventions: tempered full-vocabulary softmax, and the truncated distribution sampled from.
    tempered = logits / params.temperature
    full = tempered - np.log(np.exp(tempered).sum())
    np.testing.assert_allclose(lp, full[toks], atol=1e-5)
    np.testing.assert_allclose(slp, np.log(target[toks]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sampling_lib.target_distribution(jnp.asarray(logits[None]), params))[0],
                               target, atol=1e-6)


def test_greedy_forced_and_per_row_keys():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  forced = jnp.array([-1, 7, -1, 3])
  perm = jnp.array([2, 0, 3, 1])

  @jax.jit
  def run(logits, keys):
    greedy = sampling_lib.sample(logits, keys, SamplingParams())
    forced_out = sampling_lib.sample(logits, keys, SamplingParams(1.0, top_k=2), forced)
    a = sampling_lib.sample(logits, keys, SamplingParams(1.0))[0]
    b = sampling_lib.sample(logits[perm], keys[perm], SamplingParams(1.0))[0]
    return greedy, forced_out, a, b

  (tok, lp, _, new_keys), (ftok, flp, _, _), a, b = run(logits, keys)
  np.testing.assert_array_equal(tok, np.argmax(logits, -1))
  np.testing.assert_array_equal(new_keys, keys)  # greedy consumes no randomness
  np.testing.assert_allclose(lp, np.max(jax.nn.log_softmax(logits), -1), atol=1e-6)
  assert int(ftok[1]) == 7 and int(ftok[3]) == 3
  np.testing.assert_allclose(flp[1], jax.nn.log_softmax(logits[1])[7], atol=1e-6)
  # A row's draw depends only on its own key: permuting rows permutes the samples.
  np.testing.assert_array_equal(np.asarray(a)[np.asarray(perm)], b)

# ----------------------------------------------------------------------------- stop strings


def _first_stop(pieces, tokens, stops):
  """Host reference: index of the token whose bytes complete the first stop string, or None."""
  text = b""
  for i, t in enumerate(tokens):
    text += pieces[t]
    if any(s.encode() in text for s in stops):
      return i
  return None


def _check_matcher(tokenizer, texts, rng, vocab=None):
  from mini_o3_jax.sampler import stops as stops_lib
  pieces = stops_lib.token_bytes(tokenizer, vocab)
  m = StopMatcher.build(tokenizer, prompts.STOP_STRINGS, vocab)
  assert m.table.shape == (m.match_state + 1, len(pieces))
  # Tokenized texts, and the same texts cut into single-byte-ish pieces at random boundaries.
  relevant = [i for i, p in enumerate(pieces) if p and any(p in s.encode() for s in prompts.STOP_STRINGS)]
  seqs = [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
  seqs += [list(rng.choice(relevant, size=40)) for _ in range(300)]
  for seq in seqs:
    want = _first_stop(pieces, seq, prompts.STOP_STRINGS)
    state, got = 0, None
    for i, t in enumerate(seq):
      state = int(m.table[state, t])
      if state == m.match_state:
        got = i
        break
    assert got == want, (seq, want, got)


TEXTS = ['<think>a</think> <grounding>{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}</grounding> tail',
         "so <answer>42</answer>\n", "</groundin g></answer", "<</answer>>", "</grounding>",
         "x</gro" + "unding>", "nothing here </ground", "éè</answer>ü"]


def test_stop_matcher_small_tokenizer():
  rng = np.random.default_rng(0)
  tok = tok_lib.build_small_tokenizer(TEXTS * 4 + ["grounding answer source"] * 4, vocab_size=320)
  _check_matcher(tok, TEXTS, rng, vocab=330)  # ids past the tokenizer decode to nothing
  # Split spellings of a protocol tag: the matcher fires on the token that completes it.
  head = tok.encode("ok </gro", add_special_tokens=False)
  seq = head + tok.encode("unding>!", add_special_tokens=False)
  m = StopMatcher.build(tok, prompts.STOP_STRINGS)
  assert m.run(head) != m.match_state and m.run(seq) == m.match_state
  assert StopMatcher.build(tok, ()).match_state == -1


@pytest.mark.slow
def test_stop_matcher_qwen_tokenizer():
  rng = np.random.default_rng(1)
  tok = tok_lib.build_qwen_tokenizer()
  _check_matcher(tok, TEXTS, rng, vocab=152064)


def test_oversized_images_are_reported_once_per_size(pair, caplog):
  # Images past patch_buckets each get a program of their own; the log names each size once (then at
  # 10, 100, ... occurrences), not once per image.
  _, ours = pair
  cfg = engine_lib.EngineConfig(num_slots=2, max_context=128, chunk_buckets=(32,), patch_buckets=(16,),
                                cache_len=192)
  eng = engine_lib.Engine(ours, cfg)
  rng = np.random.default_rng(0)
  grids = [[1, 4, 6]]  # 24 patches > 16
  ids, _ = ref.build_batch([[3, ("img", 0), 4]], grids, rng)
  chunk_ids = ids[0]
  pos, next_pos = engine_lib.chunk_positions(chunk_ids, np.array(grids), 0, image_token_id=ours.config.image_token_id,
                                             merge=ours.config.vision.spatial_merge_size)
  with caplog.at_level("WARNING", logger=engine_lib.__name__):
    for _ in range(3):
      chunk = engine_lib.Chunk(ids=chunk_ids, positions=pos, next_pos=next_pos, turn_limit=1,
                               pixel_values=ref.pixel_values(grids, rng), grids=np.array(grids), reset=True,
                               key=np.zeros((2,), np.uint32))
      eng.append({0: chunk})
  reports = [r.getMessage() for r in caplog.records if "exceeds patch_buckets" in r.getMessage()]
  assert reports == ["an image of 24 patches exceeds patch_buckets (16,) (1 time so far)"]
