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
single-shape rows apart. The later switches (layout, geometry, the answer's form, labels, the decoder's size, DIAG)
are described where they are read, below.

  PYTHONPATH=. python tools/experiments/issue13/recall3.py
"""
import dataclasses, os, time
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from mini_o3_jax.model import attention as attn_lib, config as config_lib, layers, rope, vlm as vlm_lib

env = lambda k, d: type(d)(os.environ.get(k, d))
STEPS, LR, B, GAP, SEED, WORDS = env("STEPS", 1500), env("LR", 1e-3), env("B", 32), env("GAP", 14), env("SEED", 0), env("WORDS", 1)
FSCALE = env("FSCALE", 1.0)        # image features times this (1: the oracle's norm ~1 per code; text embeddings ~0.23)
POSCODE = env("POSCODE", "sincos")
SINGLE = env("SINGLE", 0.0)        # share of rows with one shape only (the rest of the grid pure canvas)
LABELS = env("LABELS", 0)
FIRSTONLY = env("FIRSTONLY", 0)    # 1: the loss on the answer's first token only
FIRSTONLY_UNTIL = env("FIRSTONLY_UNTIL", 0)  # the loss on the first token only before this step, on all after
ANS1 = env("ANS1", 0)              # 1: the answer is a single token, the shape's top-left cell (16 values); 2: one
                                   # token, its column (4 values); 3: the cell's token, then x0, y0, x1
MIXLABELS = env("MIXLABELS", 0.0)
LABELS_UNTIL = env("LABELS_UNTIL", 0)  # with MIXLABELS: every row asks for the label before this step, none after
mix_now = [MIXLABELS]  # >0: every shape carries a label and this share of rows asks for it (the rest: the place)          # 1: answers are per-shape random digits (distinct first digits) coded on the tokens
LAYOUT = env("LAYOUT", "last")    # last: image, question, filler, A; first: question, filler, image, A; direct: image, question, digits
PLACE = env("PLACE", "tiles")     # tiles: one 2 x 2 shape per quadrant; mosaic: 3-4 shapes of 1-2 x 1-2 cells at random places
NSH = env("NSH", 3)               # columns: shapes per scene
GW = env("GW", 4)                 # columns: the grid's width (16 / GW rows; 4: the VLM's 4 x 4)
HMAX = env("HMAX", 2)             # columns: shapes 1..HMAX cells tall
POSGATE = env("POSGATE", 0)       # 1: canvas tokens carry nothing (the position code only on shape tokens)
UNIQCOL = env("UNIQCOL", 0)       # with WORDS=2: the colours of a scene distinct (the name's colour word suffices)
SINGLE_UNTIL = env("SINGLE_UNTIL", 0)  # every row a single shape before this step (a curriculum)  # sincos: the oracle's 2-D code; random: an independent random code per cell
V = 64; COL = np.arange(10, 18); SHAPE = np.arange(50, 56); DIG = np.arange(20, 30); FILL = np.arange(40, 50); Q, A = 5, 6
cfg = config_lib.tiny(V)
WIDTH, HEADS, LAYERS = env("WIDTH", 128), env("HEADS", 4), env("LAYERS", 4)   # the decoder's size (demo: 128, 4, 4)
cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, out_hidden_size=WIDTH), text=dataclasses.replace(cfg.text, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                                        num_attention_heads=HEADS, num_key_value_heads=HEADS // 2,
                                                        num_hidden_layers=LAYERS))
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


def rect_cells(rect, width):
  """The grid cells (row-major indices, `width` columns) of an (x0, y0, x1, y1) rectangle of cells."""
  x0, y0, x1, y1 = rect
  return [r * width + c for r in range(y0, y1 + 1) for c in range(x0, x1 + 1)]


def mosaic(rng):
  """3-4 non-overlapping rectangles of 1-2 x 1-2 cells on the 4 x 4 grid, as (x0, y0, x1, y1) cell indices."""
  while True:
    free, rects = np.ones((4, 4), bool), []
    for _ in range(40):
      w, h = rng.integers(1, 3, 2); x, y = rng.integers(0, 5 - w), rng.integers(0, 5 - h)
      if free[y:y + h, x:x + w].all():
        free[y:y + h, x:x + w] = False; rects.append((x, y, x + w - 1, y + h - 1))
      if len(rects) == 4:
        return rects
    if len(rects) >= 3:
      return rects


def batch(rng, single_share):
  """ids [B, T], image features [B, 16, H], answer digits [B, 4], is a four-shape row [B]."""
  ids, feats, ans, multi = [], [], [], []
  for _ in range(B):
    if WORDS == 1 or UNIQCOL:  # UNIQCOL: two words, but the colours of a scene distinct (the shape word redundant)
      cols = rng.choice(8, 4, replace=False); shapes = rng.integers(0, 6, 4)
    else:  # colours drawn independently (they may repeat); names unique
      while True:
        cols = rng.integers(0, 8, 4); shapes = rng.integers(0, 6, 4)
        if len(set(zip(cols, shapes))) == 4:
          break
    quads = rng.permutation(4)
    f = POS.copy()
    n_shapes = 1 if rng.random() < single_share else 4
    if PLACE == "verify":  # one shape of 2-3 x 2-3 cells (a crop); the question names its colour or another one
      w, h = rng.integers(2, 4, 2); x, y = rng.integers(0, 5 - w), rng.integers(0, 5 - h)
      rects = [(x, y, x + w - 1, y + h - 1)]
      cells_of = [rect_cells(rects[0], 4)]
      n_shapes = 1
    elif PLACE == "columns":  # 3 shapes, one column each (distinct: the first answer digit names the shape), 1-2 rows
      rects = []
      for c in rng.permutation(GW)[:NSH]:
        h = rng.integers(1, HMAX + 1); y = rng.integers(0, KEYS // GW + 1 - h); rects.append((c, y, c, y + h - 1))
      n_shapes = min(n_shapes, NSH)
      cells_of = [rect_cells(rect, GW) for rect in rects]
    elif PLACE == "mosaic":
      rects = mosaic(rng)
      n_shapes = min(n_shapes, len(rects))
      cells_of = [rect_cells(rect, 4) for rect in rects]
    else:
      rects = [(5 * (q % 2), 5 * (q // 2), 5 * (q % 2) + 4, 5 * (q // 2) + 4) for q in quads]
      cells_of = [QUAD_CELLS[q] for q in quads]
    if POSGATE:
      covered = np.zeros(KEYS, bool); covered[sum(cells_of[:n_shapes], [])] = True
      f[~covered] = 0.0
    for k in range(n_shapes):
      f[cells_of[k]] += colour_dirs[cols[k]] + (shape_dirs[shapes[k]] if WORDS == 2 else 0)
    k = rng.integers(n_shapes)
    digits = list(rects[k])
    asks_label = MIXLABELS > 0 and rng.random() < mix_now[0]
    if MIXLABELS > 0:  # every shape carries a label; this row asks for the label or for the place
      xs, ys = rng.permutation(10)[:4], rng.integers(0, 10, 4)
      for j in range(n_shapes):
        f[cells_of[j]] += LABEL_CODES[0][xs[j]] + LABEL_CODES[1][ys[j]]
      if asks_label:
        digits = [xs[k], ys[k], xs[k], ys[k]]
    if LABELS:  # each shape a random answer of its own (first digits distinct), its codes on all its tokens
      xs, ys = rng.permutation(10)[:4], rng.integers(0, 10, 4)
      for j in range(n_shapes):
        f[cells_of[j]] += LABEL_CODES[0][xs[j]] + LABEL_CODES[1][ys[j]]
      digits = [xs[k], ys[k], xs[k], ys[k]]
    if PLACE == "verify":  # the answer: does the named colour match the shape in view (1) or not (0)
      match = rng.random() < 0.5
      if not match:
        cols = cols.copy(); cols[k] = rng.choice([c for c in range(8) if c != cols[0]])
      digits = [int(match)] * 4
    if ANS1 == 1:  # the answer is one token naming the shape's top-left cell (one code -> one token, as recall.py's digit)
      digits = [cells_of[k][0]]
    elif ANS1 == 2:  # one token: the column only
      digits = [rects[k][0]]
    elif ANS1 == 3:  # the cell's token first, then the four digits' first three
      digits = [cells_of[k][0]] + list(rects[k][:3])
    name = [COL[cols[k]]] + ([SHAPE[shapes[k]]] if WORDS == 2 else [])
    question, answer = [4 if asks_label else Q] + name + list(rng.choice(FILL, GAP)), [A] + [DIG[0] + d for d in digits]
    if LAYOUT == "first":
      ids.append([1] + question + [7] * KEYS + answer)
    elif LAYOUT == "direct":
      ids.append([1] + [7] * KEYS + [Q] + name + [DIG[0] + d for d in digits])
    else:
      ids.append([1] + [7] * KEYS + question + answer)
    feats.append(f); ans.append(digits); multi.append((n_shapes > 1 or PLACE == "verify") and not asks_label)
  return np.array(ids), np.array(feats, np.float32), np.array(ans), np.array(multi)


graphdef, params = nnx.split(model, nnx.Param)
QK_LR = env("QK_LR", 1.0)          # the query / key projections' lr times this
_adam = lambda f: optax.adamw(optax.warmup_cosine_decay_schedule(0, f * LR, 50, STEPS, f * LR * 0.05), weight_decay=0.01)
_qk = lambda tree: jax.tree_util.tree_map_with_path(
    lambda path, _: "qk" if any(getattr(k, "key", None) in ("q_proj", "k_proj") for k in path) else "rest", tree)
tx = optax.multi_transform({"qk": _adam(QK_LR), "rest": _adam(1.0)}, _qk)
opt = tx.init(params)


def loss_fn(p, ids, feats, ans, multi, first_only):
  m = nnx.merge(graphdef, p)
  start = 1 + (1 + WORDS + GAP if LAYOUT == "first" else 0)
  x = m.embed(ids).at[:, start:start + KEYS].add(FSCALE * feats)
  b, t = ids.shape
  h = m.model(x, jnp.broadcast_to(jnp.arange(t)[None, None], (3, b, t)), jnp.ones((b, t), jnp.int32))
  n_ans = ans.shape[1]
  logp = jax.nn.log_softmax(m.logits(h)[:, -1 - n_ans:-1])             # predicts the answer's tokens
  tgt = DIG[0] + ans
  lp = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  ok = jnp.argmax(logp, -1) == tgt
  both = ok[:, 0] & ok[:, min(1, n_ans - 1)]                                        # the quadrant: the binding decision
  weights = jnp.ones(n_ans).at[1:].set(1.0 - first_only)  # first_only: the later tokens are seen, not trained
  return -(lp * weights).sum(-1).mean() / weights.sum(), (jnp.sum(both * multi) / jnp.maximum(multi.sum(), 1), jnp.sum(both * ~multi) / jnp.maximum((~multi).sum(), 1))


@jax.jit
def step(p, o, *arrays):
  (l, accs), g = jax.value_and_grad(loss_fn, has_aux=True)(p, *arrays)
  u, o = tx.update(g, o, p)
  return optax.apply_updates(p, u), o, l, accs


rng = np.random.default_rng(SEED); t0 = time.time(); quad_acc, single_acc = [], []
for s in range(STEPS):
  share = 1.0 if s < SINGLE_UNTIL else SINGLE
  if LABELS_UNTIL:
    mix_now[0] = 1.0 if s < LABELS_UNTIL else 0.0
  first_only = float(FIRSTONLY or s < FIRSTONLY_UNTIL)
  params, opt, l, (qa, sa) = step(params, opt, *map(jnp.asarray, batch(rng, share)), jnp.float32(first_only))
  if share < 1.0:
    quad_acc.append(float(qa))
  if share > 0.0 or MIXLABELS > 0:
    single_acc.append(float(sa))
  if (s + 1) % 100 == 0:
    four = f"{100*np.mean(quad_acc[-100:]):.0f}%" if quad_acc and s >= SINGLE_UNTIL + 99 else "-"
    one = f"{100*np.mean(single_acc[-100:]):.0f}%" if single_acc else "-"
    print(f"FIRSTONLY={FIRSTONLY} FIRSTONLY_UNTIL={FIRSTONLY_UNTIL} ANS1={ANS1} LABELS_UNTIL={LABELS_UNTIL} NSH={NSH} QK_LR={QK_LR} LR={LR} MIXLABELS={MIXLABELS} GW={GW} W={WIDTH} H={HEADS} L={LAYERS} HMAX={HMAX} POSGATE={POSGATE} PLACE={PLACE} LAYOUT={LAYOUT} GAP={GAP} WORDS={WORDS} FSCALE={FSCALE} POSCODE={POSCODE} SINGLE={SINGLE} SINGLE_UNTIL={SINGLE_UNTIL} LABELS={LABELS} UNIQCOL={UNIQCOL} step {s+1}: "
          f"loss {float(l):.3f} quadrant (x0 and y0) of four-shape rows {four} (a shape at random 25%), "
          f"of single rows {one} {time.time()-t0:.0f}s", flush=True)


def diagnose(p, rng):
  """Where the answer's query looks and what it predicts, on fresh multi-shape rows: per layer and head, the
  attention mass on the named shape's tokens, on the other shapes' and on the rest; and the first answer token's
  probability on the named shape's answer."""
  ids, feats, ans, multi = map(jnp.asarray, batch(rng, 0.0))
  m = nnx.merge(graphdef, p)
  start = 1 + (1 + WORDS + GAP if LAYOUT == "first" else 0)
  x = m.embed(ids).at[:, start:start + KEYS].add(FSCALE * feats)
  b, t = ids.shape
  cos, sin = rope.text_cos_sin(m.model.cfg, jnp.broadcast_to(jnp.arange(t)[None, None], (3, b, t)))
  segments = attn_lib.text_segments(jnp.ones((b, t), bool), (b, t))
  mask = attn_lib.segment_mask(segments, True)

  def body(layer, h, _):
    q, k, v = layer.qkv(h, cos, sin)
    out = attn_lib.self_attention(q, k, v, segments, causal=True, impl=layer.attention_impl, block=layer.attention_block)
    kq = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    logits = jnp.where(mask[:, None], jnp.einsum("bthd,bshd->bhts", q, kq) * q.shape[-1] ** -0.5, -1e30)
    return layer.finish(h, out), jax.nn.softmax(logits, -1)

  h, probs = layers.scan_layers(m.model.layers, body, x, None)          # probs [L, b, heads, t, t]
  query = t - 1 - ans.shape[1]                                          # predicts the first answer token
  probs = np.asarray(probs)[:, :, :, query, start:start + KEYS]
  first = np.asarray(jax.nn.softmax(m.logits(m.model.norm(h))[:, query]))[:, DIG[0]:DIG[0] + KEYS]  # [b, KEYS]
  f = np.asarray(feats)
  on_t, on_o, on_bg, p_t = [], [], [], []
  for r in range(b):
    if not multi[r]:
      continue
    named = int(ids[r, start + KEYS + 1]) - COL[0] if LAYOUT != "first" else int(ids[r, 2]) - COL[0]
    sims = f[r] @ colour_dirs[named]
    tgt = sims > 0.5
    shp = np.max(f[r] @ colour_dirs.T, -1) > 0.5
    on_t.append(probs[:, r, :, tgt].sum(0)); on_o.append(probs[:, r, :, shp & ~tgt].sum(0))
    on_bg.append(probs[:, r, :, ~shp].sum(0))
    p_t.append(first[r, int(ans[r, 0])])
  np.set_printoptions(precision=2, suppress=True)
  print("attention mass [layer, head] of the first digit's query on the named shape's tokens:\n", np.mean(on_t, 0).T)
  print("... on the other shapes' tokens:\n", np.mean(on_o, 0).T)
  print("... on the rest:\n", np.mean(on_bg, 0).T)
  print(f"first answer token: p(the named shape's) {np.mean(p_t):.2f}")


if env("DIAG", 0):
  diagnose(params, np.random.default_rng(12345))
