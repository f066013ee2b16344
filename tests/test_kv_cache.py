"""The KV-cache path (prefill, appended chunks, single-token decode) equals one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as ref
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model import KVCache, Qwen25VL, prepare_inputs
from mini_o3_jax.model.text import advance
from flax import nnx


@pytest.fixture(scope="module")
def model():
  cfg = config_lib.tiny(vocab_size=ref.VOCAB, image_token_id=ref.IMAGE, vision_start_token_id=ref.VISION_START,
                        vision_end_token_id=ref.VISION_END, video_token_id=ref.VIDEO)
  return Qwen25VL(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def _step(model, ids, positions, cache, mask, image_embeds):
  return model.forward_cached(ids, positions, cache, mask, image_embeds)


def test_prefill_then_decode_equals_full_forward(model):
  rng = np.random.default_rng(0)
  grids = np.array([[1, 6, 8]])
  ids, mask = ref.build_batch([[4, ("img", 0), 6, 10], [7, ("img", 0), 8]], [grids[0]], rng, pad_side="left")
  # Both rows share one image grid shape; give each row its own pixels.
  grids2 = np.concatenate([grids, grids])
  pv = ref.pixel_values(grids2, rng)
  full_inputs, _ = prepare_inputs(model.config, ids, mask, pv, grids2)
  want = np.asarray(model.forward(full_inputs))

  prompt = ids.shape[1] - 6
  image_embeds = model.encode_images(full_inputs.pixel_values, full_inputs.vision)
  cache = model.init_cache(batch=2, max_len=ids.shape[1] + 3)
  logits, cache = _step(model, full_inputs.input_ids[:, :prompt], full_inputs.positions[:, :, :prompt], cache,
                        full_inputs.attention_mask[:, :prompt], image_embeds)
  got = [np.asarray(logits)]
  for t in range(prompt, ids.shape[1]):
    logits, cache = _step(model, full_inputs.input_ids[:, t:t + 1], full_inputs.positions[:, :, t:t + 1], cache,
                          full_inputs.attention_mask[:, t:t + 1], None)
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  valid = mask.astype(bool)
  assert np.abs(got - want)[valid].max() < 1e-4
  assert np.asarray(cache.length).tolist() == [ids.shape[1]] * 2


def test_right_padded_chunks_appended_at_per_row_offsets(model):
  """Rows append chunks of different real lengths (an observation turn); padding never leaks."""
  rng = np.random.default_rng(1)
  lengths = [[5, 3, 4], [2, 6, 1]]  # real tokens per chunk, per row
  seqs = [list(rng.integers(0, 280, sum(r))) for r in lengths]
  cfg = model.config
  full_logits = []
  for s in seqs:
    inputs, _ = prepare_inputs(cfg, np.array([s]))
    full_logits.append(np.asarray(model.forward(inputs))[0])
  cache = model.init_cache(batch=2, max_len=16)
  offsets = [0, 0]
  chunk = 6
  for c in range(3):
    ids = np.zeros((2, chunk), np.int32)
    mask = np.zeros((2, chunk), np.int32)
    pos = np.zeros((3, 2, chunk), np.int32)
    for r in range(2):
      n = lengths[r][c]
      ids[r, :n] = seqs[r][offsets[r]:offsets[r] + n]
      mask[r, :n] = 1
      pos[:, r, :n] = np.arange(offsets[r], offsets[r] + n)
    old = cache
    logits, cache = _step(model, jnp.asarray(ids), jnp.asarray(pos), cache, jnp.asarray(mask), None)
    cache = advance(old, cache, jnp.asarray(mask.sum(1)))
    for r in range(2):
      n = lengths[r][c]
      np.testing.assert_allclose(np.asarray(logits)[r, :n], full_logits[r][offsets[r]:offsets[r] + n], atol=1e-4)
      offsets[r] += n
  assert np.asarray(cache.length).tolist() == offsets


def test_per_row_images_equal_flat_batch(model):
  """prepare_row_inputs (images encoded per row, vmapped) gives the flat-batch logits."""
  from mini_o3_jax.model.vlm import prepare_row_inputs
  rng = np.random.default_rng(2)
  grids = [[1, 6, 8], [1, 4, 4], [1, 2, 6]]
  ids, mask = ref.build_batch([[3, ("img", 0), 4, ("img", 1), 2], [5, ("img", 2), 6], [9]], grids, rng)
  pv = ref.pixel_values(grids, rng)
  flat, _ = prepare_inputs(model.config, ids, mask, pv, np.array(grids))
  want = np.asarray(model.forward(flat))
  n0, n1 = 48 + 16, 12
  rows, _ = prepare_row_inputs(model.config, ids, mask, [pv[:n0], pv[n0:n0 + n1], None],
                               [np.array(grids[:2]), np.array(grids[2:]), None], pad_patches_to=80)
  got = np.asarray(model.forward(rows))
  assert np.abs(got - want)[mask.astype(bool)].max() < 1e-4
