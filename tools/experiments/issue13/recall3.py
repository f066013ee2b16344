"""The toy lookup on the VLM's oracle `tiles` geometry: 16 key tokens in a 4 x 4 grid (one per merged image
token), 4 shapes of 2 x 2 tokens, one per quadrant; each token holds a 2-D sin-cos code of its cell (the oracle's
`sincos_2d`, max period 4) plus, on every token, its shape's colour code. The answer is the shape's quadrant as
two digits, x0 and y0 tenths (0 or 5), teacher forced, then two more digits that follow them (x1, y1 tenths).
What differs from recall2.py: several tokens per shape, positions from a shared low-dimensional code, answers
with a 50 / 50 prior per digit. Env: STEPS, LR, B, GAP, SEED, WORDS (2: the question names colour and shape, and
two shapes of a scene may share a colour, as in the VLM's few recipe; 1: colour only, colours unique), FSCALE
(image features times this), POSCODE (sincos, random per cell, or quadrant: one code per answer digit value), SINGLE (share of single-shape rows),
SINGLE_UNTIL (only single-shape rows before this step), LABELS (1: each shape answers with random digits of its
own, the first digits distinct, coded on its tokens, as in recall2). Prints the quadrant accuracy of four-shape and of
single-shape rows apart.

  PYTHONPATH=. python tools/experiments/issue13/recall3.py
"""
import os, time
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from mini_o3_jax.model import config as config_lib, vlm as vlm_lib

env = lambda k, d: type(d)(os.environ.get(k, d))
STEPS, LR, B, GAP, SEED, WORDS = env("STEPS", 1500), env("LR", 1e-3), env("B", 32), env("GAP", 14), env("SEED", 0), env("WORDS", 1)
FSCALE = env("FSCALE", 1.0)        # image features times this (1: the oracle's norm ~1 per code; text embeddings ~0.23)
POSCODE = env("POSCODE", "sincos")
SINGLE = env("SINGLE", 0.0)        # share of rows with one shape only (the rest of the grid pure canvas)
LABELS = env("LABELS", 0)          # 1: answers are per-shape random digits (distinct first digits) coded on the tokens
SINGLE_UNTIL = env("SINGLE_UNTIL", 0)  # every row a single shape before this step (a curriculum)  # sincos: the oracle's 2-D code; random: an independent random code per cell
V = 64; COL = np.arange(10, 18); SHAPE = np.arange(50, 56); DIG = np.arange(20, 30); FILL = np.arange(40, 50); Q, A = 5, 6
cfg = config_lib.tiny(V)
model = vlm_lib.VLM(cfg, rngs=nnx.Rngs(SEED))
H = cfg.text.hidden_size
KEYS = 16


def sincos_2d(rows, cols, dim, max_period=4.0):
  quarter = dim // 4
  freqs = 1.0 / (max_period ** (np.arange(quarter) / quarter))
  parts = [np.sin(rows[:, None] * freqs), np.cos(rows[:, None] * freqs), np.sin(cols[:, None] * freqs),
           np.cos(cols[:, None] * freqs)]
  return np.concatenate(parts, -1)


cells = np.arange(KEYS)
POS = sincos_2d(cells // 4, cells % 4, H) / np.sqrt(H)                     # [16, H], norm ~1 per token
if POSCODE == "random":
  POS = np.random.default_rng(99).normal(size=(KEYS, H)) / np.sqrt(H)
if POSCODE == "quadrant":  # one random code per quadrant column and one per quadrant row: every token of a shape
  half = np.random.default_rng(98).normal(size=(2, 2, H)) / np.sqrt(H)   # holds its answer's codes, as in recall2
  POS = half[0][(cells % 4) // 2] + half[1][(cells // 4) // 2]
colour_dirs = np.array(jax.random.normal(jax.random.PRNGKey(11), (8, H)))
colour_dirs /= np.linalg.norm(colour_dirs, axis=-1, keepdims=True)          # unit direction per colour
shape_dirs = np.array(jax.random.normal(jax.random.PRNGKey(12), (6, H)))
shape_dirs /= np.linalg.norm(shape_dirs, axis=-1, keepdims=True)
LABEL_CODES = np.random.default_rng(97).normal(size=(2, 10, H)) / np.sqrt(H)
QUAD_CELLS = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]  # quadrant q: column q % 2, row q // 2


def batch(rng, single_share):
  """ids [B, T], image features [B, 16, H], answer digits [B, 4], is a four-shape row [B]."""
  ids, feats, ans, multi = [], [], [], []
  for _ in range(B):
    if WORDS == 1:
      cols = rng.choice(8, 4, replace=False); shapes = rng.integers(0, 6, 4)
    else:  # colours drawn independently (they may repeat); names unique
      while True:
        cols = rng.integers(0, 8, 4); shapes = rng.integers(0, 6, 4)
        if len(set(zip(cols, shapes))) == 4:
          break
    quads = rng.permutation(4)
    f = POS.copy()
    n_shapes = 1 if rng.random() < single_share else 4
    for k in range(n_shapes):
      f[QUAD_CELLS[quads[k]]] += colour_dirs[cols[k]] + (shape_dirs[shapes[k]] if WORDS == 2 else 0)
    k = rng.integers(n_shapes)
    qx, qy = quads[k] % 2, quads[k] // 2
    digits = [5 * qx, 5 * qy, 5 * qx + 4, 5 * qy + 4]
    if LABELS:  # each shape a random answer of its own (first digits distinct), its codes on all its tokens
      xs, ys = rng.permutation(10)[:4], rng.integers(0, 10, 4)
      for j in range(n_shapes):
        f[QUAD_CELLS[quads[j]]] += LABEL_CODES[0][xs[j]] + LABEL_CODES[1][ys[j]]
      digits = [xs[k], ys[k], xs[k], ys[k]]
    name = [COL[cols[k]]] + ([SHAPE[shapes[k]]] if WORDS == 2 else [])
    ids.append([1] + [7] * KEYS + [Q] + name + list(rng.choice(FILL, GAP)) + [A] + [DIG[d] for d in digits])
    feats.append(f); ans.append(digits); multi.append(n_shapes == 4)
  return np.array(ids), np.array(feats, np.float32), np.array(ans), np.array(multi)


graphdef, params = nnx.split(model, nnx.Param)
tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, LR, 50, STEPS, LR * 0.05), weight_decay=0.01)
opt = tx.init(params)


def loss_fn(p, ids, feats, ans, multi):
  m = nnx.merge(graphdef, p)
  x = m.embed(ids).at[:, 1:1 + KEYS].add(FSCALE * feats)
  b, t = ids.shape
  h = m.model(x, jnp.broadcast_to(jnp.arange(t)[None, None], (3, b, t)), jnp.ones((b, t), jnp.int32))
  logp = jax.nn.log_softmax(m.logits(h)[:, -5:-1])                    # predicts the 4 answer digits
  tgt = DIG[0] + ans
  lp = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  ok = jnp.argmax(logp, -1) == tgt
  both = ok[:, 0] & ok[:, 1]                                          # the quadrant: the binding decision
  return -lp.mean(), (jnp.sum(both * multi) / jnp.maximum(multi.sum(), 1), jnp.sum(both * ~multi) / jnp.maximum((~multi).sum(), 1))


@jax.jit
def step(p, o, *arrays):
  (l, accs), g = jax.value_and_grad(loss_fn, has_aux=True)(p, *arrays)
  u, o = tx.update(g, o, p)
  return optax.apply_updates(p, u), o, l, accs


rng = np.random.default_rng(SEED); t0 = time.time(); quad_acc, single_acc = [], []
for s in range(STEPS):
  share = 1.0 if s < SINGLE_UNTIL else SINGLE
  params, opt, l, (qa, sa) = step(params, opt, *map(jnp.asarray, batch(rng, share)))
  if share < 1.0:
    quad_acc.append(float(qa))
  if share > 0.0:
    single_acc.append(float(sa))
  if (s + 1) % 100 == 0:
    four = f"{100*np.mean(quad_acc[-100:]):.0f}%" if quad_acc and s >= SINGLE_UNTIL + 99 else "-"
    one = f"{100*np.mean(single_acc[-100:]):.0f}%" if single_acc else "-"
    print(f"WORDS={WORDS} FSCALE={FSCALE} POSCODE={POSCODE} SINGLE={SINGLE} SINGLE_UNTIL={SINGLE_UNTIL} LABELS={LABELS} step {s+1}: "
          f"loss {float(l):.3f} quadrant (x0 and y0) of four-shape rows {four} (a shape at random 25%), "
          f"of single rows {one} {time.time()-t0:.0f}s", flush=True)
