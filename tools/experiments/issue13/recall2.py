"""The toy lookup grown towards the VLM's answer: each key (a "shape" token: colour code + position codes) has
a position (x, y) in 0..99, and the answer is its digits x//10, x%10, y//10, y%10 (teacher forced), like the first
coordinate pair of a bbox_2d. Keys' x//10 differ, so the first digit decides which key is meant; the later digits
can follow the first without the question. Env as recall.py: PAIRS, BG, GAP, STEPS, LR, B, NQ, plus
ANSLEN (1, 2 or 4 answer digits), FMT (deterministic format tokens in the loss before each answer, as the
bbox_2d's '<grounding>{"bbox_2d": [' and '0.'), SEED, CURR (no background before this step), OBJ (an object code
on shape keys, relative to a colour code's scale).

  PYTHONPATH=. python tools/experiments/issue13/recall2.py
Prints, every 100 steps, the first digit's accuracy (the binding decision; chance 1/PAIRS when a shape is
picked at random) and the later digits' accuracy.
"""
import os, time
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from mini_o3_jax.model import config as config_lib, vlm as vlm_lib

env = lambda k, d: type(d)(os.environ.get(k, d))
PAIRS, BG, GAP, STEPS = env("PAIRS", 3), env("BG", 0), env("GAP", 14), env("STEPS", 1500)
LR, B, NQ, ANSLEN, FMT, SEED = env("LR", 1e-3), env("B", 32), env("NQ", 1), env("ANSLEN", 4), env("FMT", 0), env("SEED", 0)
CURR = env("CURR", 0)     # no background keys before this step (the binding curriculum)
OBJ = env("OBJ", 0.0)     # scale of one fixed "object" code added to every shape key (an objectness feature)
V = 64; COL = np.arange(10, 18); DIG = np.arange(20, 30); FILL = np.arange(40, 60); Q, A = 5, 6
FMT_TOKENS = list(range(30, 30 + FMT))
cfg = config_lib.tiny(V)
model = vlm_lib.VLM(cfg, rngs=nnx.Rngs(SEED))
KEYS = PAIRS + BG  # key slots; before CURR the background slots are left out of the row


def key_positions(rng, n_keys):
  """[n_keys, 2] positions in 0..99 whose x tens digits differ for the first PAIRS keys (the shapes)."""
  tens = rng.permutation(10)[:PAIRS]
  shapes = np.stack([tens * 10 + rng.integers(0, 10, PAIRS), rng.integers(0, 100, PAIRS)], 1)
  return np.concatenate([shapes, rng.integers(0, 100, (n_keys - PAIRS, 2))])


def batch(rng, bg):
  """ids [B, T], key colour index [B, KEYS] (8 = none), key positions [B, KEYS, 2], answers [B, NQ * ANSLEN]."""
  ids, cols_out, pos_out, ans = [], [], [], []
  for _ in range(B):
    cols = rng.choice(8, PAIRS, replace=False)
    n = PAIRS + bg
    pos = key_positions(rng, n)
    slot = rng.permutation(n)                        # where each key sits among the image tokens
    key_col = np.full(n, 8); key_pos = np.zeros((n, 2), int)
    key_col[slot[:PAIRS]] = cols; key_pos[slot] = pos
    seq, a = [1] + [7] * n, []
    for j, k in enumerate(rng.permutation(PAIRS)[:NQ]):
      x, y = pos[k]
      digits = [x // 10, x % 10, y // 10, y % 10][:ANSLEN]
      seq += [Q, COL[cols[k]]] + list(rng.choice(FILL, GAP)) + [A] + FMT_TOKENS + [DIG[d] for d in digits]
      a += digits
    ids.append(seq); cols_out.append(key_col); pos_out.append(key_pos); ans.append(a)
  return np.array(ids), np.array(cols_out), np.array(pos_out), np.array(ans)


graphdef, params = nnx.split(model, nnx.Param)
tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, LR, 50, STEPS, LR * 0.05), weight_decay=0.01)
opt = tx.init(params)
H = cfg.text.hidden_size
codes = jax.random.normal(jax.random.PRNGKey(3), (5, 10, H)) * 0.02  # colour (9 used), x tens, x ones, y tens, y ones


def loss_fn(p, ids, key_col, key_pos, ans):
  m = nnx.merge(graphdef, p)
  scale = jnp.std(m.model.embed_tokens.embedding[...]) / 0.02
  is_shape = (key_col < 8)[..., None]
  key = (codes[0][key_col] * is_shape + OBJ * codes[0][9] * is_shape + codes[1][key_pos[..., 0] // 10] + codes[2][key_pos[..., 0] % 10]
         + codes[3][key_pos[..., 1] // 10] + codes[4][key_pos[..., 1] % 10]) * scale   # [B, KEYS, H]
  x = m.embed(ids).at[:, 1:1 + key_col.shape[1]].add(key)
  b, t = ids.shape
  h = m.model(x, jnp.broadcast_to(jnp.arange(t)[None, None], (3, b, t)), jnp.ones((b, t), jnp.int32))
  logp = jax.nn.log_softmax(m.logits(h)[:, :-1])                      # predicts ids[:, 1:]
  nxt = ids[:, 1:]
  in_loss = ((nxt >= 20) & (nxt < 30)) | ((nxt >= 30) & (nxt < 40))   # answer digits and format tokens
  lp = jnp.take_along_axis(logp, nxt[..., None], -1)[..., 0]
  loss = -jnp.sum(jnp.where(in_loss, lp, 0)) / jnp.sum(in_loss)
  digit = (nxt >= 20) & (nxt < 30)
  ok = (jnp.argmax(logp, -1) == nxt) & digit
  order = jnp.cumsum(digit, 1) - 1                                     # which answer digit this is
  first = digit & (order % ANSLEN == 0)
  later = digit & (order % ANSLEN != 0)
  return loss, (jnp.sum(ok & first) / jnp.sum(first), jnp.sum(ok & later) / jnp.maximum(jnp.sum(later), 1))


@jax.jit
def step(p, o, *batch_arrays):
  (l, accs), g = jax.value_and_grad(loss_fn, has_aux=True)(p, *batch_arrays)
  u, o = tx.update(g, o, p)
  return optax.apply_updates(p, u), o, l, accs


rng = np.random.default_rng(SEED); t0 = time.time(); first_acc, later_acc = [], []
for s in range(STEPS):
  params, opt, l, (f, lt) = step(params, opt, *map(jnp.asarray, batch(rng, 0 if s < CURR else BG)))
  first_acc.append(float(f)); later_acc.append(float(lt))
  if (s + 1) % 100 == 0:
    print(f"ANSLEN={ANSLEN} FMT={FMT} PAIRS={PAIRS} BG={BG} NQ={NQ} CURR={CURR} OBJ={OBJ} step {s+1}: loss {float(l):.3f} first digit "
          f"{100*np.mean(first_acc[-100:]):.0f}% (a shape at random {100/PAIRS:.0f}%) later digits "
          f"{100*np.mean(later_acc[-100:]):.0f}% {time.time()-t0:.0f}s", flush=True)
