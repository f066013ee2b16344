"""Text-only binding in the demo's decoder: N (colour, position) pairs, then "where is <colour>" ->
its position digit, with a filler gap like the chat template's. Does the 4x128 Qwen2 decoder learn the two-hop
lookup at lr 1e-3, and how fast? Env: PAIRS, GAP, STEPS, LR, B, KEYS (0: pairs are [colour, digit]; 1: each pair
is ONE token whose embedding is colour_emb + digit_emb, like an image token holding both)."""
import os, time  # run from the repository root: PYTHONPATH=. python tools/experiments/issue13/recall.py
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from mini_o3_jax.model import config as config_lib, vlm as vlm_lib
PAIRS = int(os.environ.get("PAIRS", 3)); GAP = int(os.environ.get("GAP", 14)); STEPS = int(os.environ.get("STEPS", 1500))
LR = float(os.environ.get("LR", 1e-3)); B = int(os.environ.get("B", 32)); KEYS = int(os.environ.get("KEYS", 1))
BG = int(os.environ.get("BG", 0))
NQ = int(os.environ.get("NQ", 1))
SEED = int(os.environ.get("SEED", 0))  # model init and data
CURR = int(os.environ.get("CURR", 0))  # no background keys before this step (a binding curriculum)
BG_FINAL = BG  # questions per sequence (distinct shapes, each answered after its own gap)  # background key tokens (no colour; a position code like every image token)
V = 64; COL = np.arange(10, 18); DIG = np.arange(20, 30); FILL = np.arange(40, 60); Q, A = 5, 6
cfg = config_lib.tiny(V)
model = vlm_lib.VLM(cfg, rngs=nnx.Rngs(SEED)) if hasattr(vlm_lib, "VLM") else vlm_lib.Qwen25VL(cfg, rngs=nnx.Rngs(SEED))
def sample(rng):
  cols = rng.choice(COL, PAIRS, replace=False); digs = rng.choice(DIG, PAIRS, replace=False); k = rng.integers(PAIRS)
  return cols, digs, k
def batch(rng):
  ids, extra, ans = [], [], []
  for _ in range(B):
    cols, digs, k = sample(rng)
    if KEYS:  # one token per pair: placeholder id 7, extra embedding added below
      body = [7] * (PAIRS + BG)
      slots = rng.permutation(PAIRS + BG)
      ex = [None] * (PAIRS + BG)
      for j, (c, d) in enumerate(zip(cols, digs)):
        ex[slots[j]] = (c, d)
      for j in range(PAIRS, PAIRS + BG):
        ex[slots[j]] = (61, rng.choice(DIG))   # 61: "no colour"
    else:
      body = [t for c, d in zip(cols, digs) for t in (c, d)]; ex = []
    seq = [1] + body; a = []
    for j, kk in enumerate(rng.permutation(PAIRS)[:NQ]):
      seq += [Q, cols[kk]] + list(rng.choice(FILL, GAP)) + [A] + ([digs[kk]] if j < NQ - 1 else [])
      a.append(digs[kk])
    ids.append(seq); extra.append(ex); ans.append(a)
  return np.array(ids), extra, np.array(ans)
graphdef, params = nnx.split(model, nnx.Param)
tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, LR, 50, STEPS, LR * 0.05), weight_decay=0.01)
opt = tx.init(params)
def forward(p, ids, pair_emb):
  m = nnx.merge(graphdef, p)
  x = m.embed(ids)
  if KEYS:
    x = x.at[:, 1:1 + PAIRS + BG].add(pair_emb)
  b, t = ids.shape
  pos = jnp.broadcast_to(jnp.arange(t)[None, None], (3, b, t))
  h = m.model(x, pos, jnp.ones((b, t), jnp.int32))
  return m.logits(h)
@jax.jit
def step(p, o, ids, cidx, didx, ans):
  def loss_fn(p):
    m = nnx.merge(graphdef, p)
    E = m.model.embed_tokens.embedding[...]
    R = jax.random.normal(jax.random.PRNGKey(3), (V, E.shape[1])) * jnp.std(E) * 1.0   # fixed, unrelated to E
    pair = {0: 0.0, 1: E[cidx] + E[didx], 2: R[cidx] + E[didx], 3: R[cidx] + R[didx]}[KEYS]
    lg = forward(p, ids, pair)                                   # [b, t, V]
    apos = jnp.cumsum(ids == A, axis=1)                          # which answer each A position is
    is_a = ids == A
    logp = jax.nn.log_softmax(lg)
    tgt = jnp.take_along_axis(ans, jnp.clip(apos - 1, 0, NQ - 1), axis=1)   # [b, t]
    lp = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    ok = (jnp.argmax(lg, -1) == tgt)
    return -jnp.sum(jnp.where(is_a, lp, 0)) / jnp.sum(is_a), jnp.sum(jnp.where(is_a, ok, 0)) / jnp.sum(is_a)
  (l, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
  u, o = tx.update(g, o, p)
  return optax.apply_updates(p, u), o, l, acc
rng = np.random.default_rng(SEED); t0 = time.time(); accs = []
for s in range(STEPS):
  BG = 0 if s < CURR else BG_FINAL
  ids, extra, ans = batch(rng)
  cidx = np.array([[c for c, _ in e] for e in extra]) if KEYS else np.zeros((B, 1), int)
  didx = np.array([[d for _, d in e] for e in extra]) if KEYS else np.zeros((B, 1), int)
  params, opt, l, acc = step(params, opt, jnp.asarray(ids), cidx, didx, jnp.asarray(ans))
  accs.append(float(acc))
  if (s + 1) % 100 == 0:
    print(f"SEED={SEED} BG={BG} PAIRS={PAIRS} KEYS={KEYS} GAP={GAP} step {s+1}: loss {float(l):.3f} acc(last 100) {100*np.mean(accs[-100:]):.0f}% "
          f"(chance {100/PAIRS:.0f}%) {time.time()-t0:.0f}s", flush=True)
