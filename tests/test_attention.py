"""Every attention implementation against a numpy reference: values, gradients, memory, model parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hf_reference as ref
from mini_o3_jax.model import attention
from mini_o3_jax.model.hf import load_pretrained
from mini_o3_jax.sampler import generate
from mini_o3_jax import sharding as shard_lib


def _np_attention(q, k, v, mask):
  """q [b, t, h, d], k/v [b, s, kvh, d], mask bool [b, t, s]; float64 softmax attention."""
  h, kvh = q.shape[2], k.shape[2]
  k = np.repeat(np.asarray(k, np.float64), h // kvh, axis=2)
  v = np.repeat(np.asarray(v, np.float64), h // kvh, axis=2)
  logits = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None], logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _qkv(rng, b, t, h=4, kvh=2, d=16, scale=0.5):
  return tuple(jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
               for shape in ((b, t, h, d), (b, t, kvh, d), (b, t, kvh, d)))


def _segments(case: str, t: int) -> tuple[np.ndarray, bool]:
  """Segment ids [rows, t] and causality of a test case."""
  if case == "text":  # a full row, a right-padded row, a left-padded row
    valid = np.ones((3, t), bool)
    valid[1, t - 29:] = False
    valid[2, :41] = False
    return np.where(valid, 0, attention.PAD_SEGMENT).astype(np.int32), True
  # images: several images of different sizes per row, then padding patches
  rows = []
  for sizes in ((64, 16, 100), (7, 120, 33)):
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    rows.append(np.concatenate([ids, np.full(t - len(ids), attention.PAD_SEGMENT)]))
  return np.stack(rows).astype(np.int32), False


def _run(impl, q, k, v, seg, causal, block):
  if impl == "splash":
    return attention.self_attention(q, k, v, seg, causal=causal, impl="splash", interpret=True)
  return attention.self_attention(q, k, v, seg, causal=causal, impl=impl, block=block)


def test_dense_matches_numpy_with_grouped_heads():
  rng = np.random.default_rng(0)
  q, k, v = rng.normal(size=(2, 5, 4, 8)), rng.normal(size=(2, 7, 2, 8)), rng.normal(size=(2, 7, 2, 8))
  mask = rng.random((2, 5, 7)) < 0.7
  mask[:, :, 0] = True
  got = attention.dense(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v, mask), atol=1e-5)


# 192: a multiple of the blocks (dense skips key blocks above the diagonal); 233: ragged last block.
@pytest.mark.parametrize("impl,case,t", [(impl, case, t) for impl in ("dense", "blockwise", "splash")
                                         for case, t in (("text", 192), ("text", 233), ("images", 233))
                                         if not (impl == "splash" and t == 192)])  # splash pads to 128 anyway
def test_implementations_equal_numpy(impl, case, t):
  rng = np.random.default_rng(t)
  seg, causal = _segments(case, t)
  q, k, v = _qkv(rng, seg.shape[0], t)
  mask = seg[:, :, None] == seg[:, None, :]
  if causal:
    mask &= np.tril(np.ones((t, t), bool))[None]
  got = _run(impl, q, k, v, jnp.asarray(seg), causal, block=64)
  # Padding is a segment of its own, so every row (padding too) is defined and compared.
  np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
@pytest.mark.parametrize("case", ["text", "images"])
def test_gradients_equal_dense(impl, case):
  t = 200
  rng = np.random.default_rng(1)
  seg, causal = _segments(case, t)
  q, k, v = _qkv(rng, seg.shape[0], t)
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  seg = jnp.asarray(seg)

  def loss(impl, q, k, v):
    return (_run(impl, q, k, v, seg, causal, block=64) * weights).sum()

  want = jax.grad(lambda *x: loss("dense", *x), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(lambda *x: loss(impl, *x), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_local_segment_attention_equals_numpy():
  rng = np.random.default_rng(4)
  block = 16
  for _ in range(2):
    sizes = rng.integers(1, block + 1, size=12)  # contiguous windows, none longer than the block
    seg = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    n = len(seg)
    q, k, v = (rng.normal(size=(n, 2, 8)).astype(np.float32) for _ in range(3))
    got = attention.local_segment_attention(*(jnp.asarray(x) for x in (q, k, v, seg)), block)
    want = _np_attention(q[None], k[None], v[None], (seg[:, None] == seg[None, :])[None])[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_cudnn_path_equals_numpy_on_real_tokens():
  # jax.nn.dot_product_attention with its XLA implementation (the cuDNN one needs a GPU): the lengths the
  # cudnn path derives from right-padded text segments give the dense causal result on real tokens.
  t = 96
  rng = np.random.default_rng(5)
  lengths = np.array([96, 70, 13])
  seg = np.where(np.arange(t)[None] < lengths[:, None], 0, attention.PAD_SEGMENT).astype(np.int32)
  q, k, v = _qkv(rng, 3, t)
  got = attention.cudnn(q, k, v, jnp.asarray(seg), causal=True, implementation="xla")
  mask = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((t, t), bool))[None]
  real = seg == 0
  np.testing.assert_allclose(np.asarray(got)[real], _np_attention(q, k, v, mask)[real], atol=1e-5)
  with pytest.raises(ValueError, match="causal text rows only"):
    attention.cudnn(q, k, v, jnp.asarray(seg), causal=False)


@pytest.mark.parametrize("chunk", [1, 7])
def test_cache_attention_blockwise_equals_dense(chunk):
  # A decode step (one query per slot) and an appended chunk against a cache with holes.
  rng = np.random.default_rng(chunk)
  b, h, kvh, d, w = 3, 4, 2, 16, 100
  q = jnp.asarray(rng.normal(size=(b, chunk, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, kvh, d, w)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, kvh, w, d)), jnp.float32)
  valid = rng.random((b, w)) < 0.8
  index = np.array([60, 93 - chunk, 20])[:, None] + np.arange(chunk)[None]
  valid[np.arange(b)[:, None], index] = True
  args = (q, k, v, jnp.asarray(valid), jnp.asarray(index))
  got = attention.cache_attention(*args, impl="blockwise", block=16)
  dense = attention.cache_attention(*args, impl="dense")
  mask = valid[:, None, :] & (np.arange(w)[None, None] <= index[:, :, None])
  want = _np_attention(np.asarray(q), np.moveaxis(np.asarray(k), 3, 1), np.moveaxis(np.asarray(v), 2, 1), mask)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dense), want, atol=1e-5)


def test_splash_sharded_under_a_mesh_equals_one_device():
  mesh = shard_lib.make_mesh((2, 2, 2))
  t = 128
  seg, _ = _segments("text", t)
  seg = np.concatenate([seg, seg[:1]])                    # 4 rows: 2 per (data x fsdp) shard pair
  rng = np.random.default_rng(6)
  q, k, v = _qkv(rng, 4, t)
  want = _run("splash", q, k, v, jnp.asarray(seg), True, 64)
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v, s: _run("splash", q, k, v, s, True, 64))(
        *(jax.device_put(x, spec) for x in (q, k, v)), jnp.asarray(seg))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def _step_temp_bytes(impl: str, t: int, causal: bool) -> int:
  """XLA's temporary memory of a compiled forward + backward of attention at length t in a scanned stack
  of 2 layers (as the model runs it: a scan is where a per-tile `lax.cond` once made the memory quadratic)."""
  q, k, v = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, t, 2, 16), (1, t, 1, 16), (1, t, 1, 16)))
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  w = jax.ShapeDtypeStruct((2, 16, 16), jnp.float32)

  def loss(w, q, k, v, seg):
    def layer(x, w_i):
      return attention.self_attention(x @ w_i, k, v, seg, causal=causal, impl=impl, block=64), None

    return jax.lax.scan(layer, q, w)[0].sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(w, q, k, v, seg).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_memory_grows_linearly_where_dense_grows_quadratically(causal):
  blockwise = _step_temp_bytes("blockwise", 1024, causal) / _step_temp_bytes("blockwise", 256, causal)
  dense = _step_temp_bytes("dense", 1024, causal) / _step_temp_bytes("dense", 256, causal)
  assert blockwise <= 6, blockwise
  assert dense >= 10, dense  # the reference really is quadratic at these sizes


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family(request, tmp_path_factory):
  """(transformers model, its save directory, patch size) of each backbone."""
  config = ref.hf_config() if request.param == "qwen2_5_vl" else ref.hf_qwen3_config()
  hf = ref.hf_model(config)
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path)
  return hf, path, 14 if request.param == "qwen2_5_vl" else 16


def test_blockwise_model_matches_transformers_and_dense_greedy(family):
  hf, path, patch = family
  blockwise, _ = load_pretrained(path, attention="blockwise", attention_block=16)
  rng = np.random.default_rng(3)
  grids = [[1, 10, 14], [1, 6, 4], [1, 4, 8]]
  ids, mask = ref.build_batch([[4, ("img", 0), 6, ("img", 1), 3], [2, ("img", 2), 5]], grids, rng, "left")
  pv = ref.pixel_values(grids, rng, patch=patch)
  got = np.asarray(blockwise(ids, pv, np.array(grids), mask))
  want = ref.hf_logits(hf, ids, mask, pv, grids)
  assert np.abs(got - want)[mask.astype(bool)].max() < 1e-4
  if patch == 14:
    return  # the sampler's tiled cache path is the same for both families: Qwen3-VL (DeepStack) checks it
  # The sampler reads its cache in 16-slot tiles (prefill and decode): each greedy token is the argmax of
  # transformers' logits over the conversation so far (rows are left-padded, so they stay contiguous).
  tokens = generate(blockwise, ids, mask, pv, np.array(grids), max_new_tokens=8, temperature=0.0).tokens
  full_ids = np.concatenate([ids, tokens], 1)
  full_mask = np.concatenate([mask, np.ones_like(tokens)], 1)
  logits = ref.hf_logits(hf, full_ids, full_mask, pv, grids)[:, ids.shape[1] - 1:-1]
  np.testing.assert_array_equal(tokens, logits.argmax(-1))
