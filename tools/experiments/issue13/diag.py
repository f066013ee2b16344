"""Feature diagnostics of a run's final tower (or random init with INIT=1): python diag.py RUN [level]
Env EX_* must match the run's (patches). Prints: obj_top1 (token farthest from its image mean is the shape's),
pos_probe (16-way linear probe of the merged-token cell, held-out images), where_probe (9-way linear probe of the x0
tenths digit from the shape's token feature, held-out), cos stats."""
import sys, os, json
run = sys.argv[1]; level = sys.argv[2] if len(sys.argv) > 2 else "single"
sys.argv = ["x"]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'drive.py')).read().split("if __name__")[0])
from configs import pretrain_tiny
from mini_o3_jax.pipeline import common
from mini_o3_jax.pipeline.train_stages import restore_params
from mini_o3_jax import run_config
from mini_o3_jax.data import scene_levels
wd = os.path.join(os.environ.get('RUNS', '/tmp/issue13_runs'), run)
config = pretrain_tiny.get_config()
config, tokenizer, mcfg, mesh = common.setup(config, wd)
graphdef, abstract = state_lib.abstract_model(mcfg)
if os.environ.get("INIT"):
  st = state_lib.create_train_state(mcfg, lambda p: optax.sgd(0.0), mesh, seed=0)[0]
  model = st.model()
else:
  params = restore_params(wd, "pretrain", mcfg, mesh)
  model = nnx.merge(graphdef, params)
tcfg = run_config.task_config(config)
N = 256
tasks = [scene_levels.make_scene(level, 10000 + i, tcfg, scene_levels.HELDOUT_SPLIT) for i in range(N)]
from mini_o3_jax.processing import image as image_lib
pvs, grids, obj_tok, x0d, multi = [], [], [], [], []
for t in tasks:
  v = synthetic.render_view(t.image, None, tcfg)
  pv, g = image_lib.preprocess_image(v, tcfg.view_min_pixels, tcfg.view_max_pixels)
  pvs.append(pv); grids.append(g)
  o = next(o for o in t.objects if o.is_target)
  cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
  obj_tok.append(min(3, int(cy * 4)) * 4 + min(3, int(cx * 4)))
  x0d.append(int(f"{o.box[0]:.2f}"[2]))
vis = [vision_lib.VisionInputs.build(g[None], mcfg.vision, pad_to=64) for g in grids]
vis = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *vis)
emb = np.asarray(model.encode_images(jnp.asarray(np.stack(pvs)), vis))[:, :16]  # [N,16,d]
obj_tok = np.asarray(obj_tok); x0d = np.asarray(x0d)
cen = emb - emb.mean(1, keepdims=True)
top = np.argmax(np.linalg.norm(cen, axis=-1), 1)
obj_top1 = float(np.mean(top == obj_tok))
def ridge_acc(X, y, k):
  n = len(X) // 2
  Xtr, Xte, ytr, yte = X[:n], X[n:], y[:n], y[n:]
  mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
  Xtr = (Xtr - mu) / sd; Xte = (Xte - mu) / sd
  Y = np.eye(k)[ytr]
  W = np.linalg.solve(Xtr.T @ Xtr + 10.0 * np.eye(X.shape[1]), Xtr.T @ Y)
  return float(np.mean(np.argmax(Xte @ W, 1) == yte))
X = emb.reshape(-1, emb.shape[-1]); y = np.tile(np.arange(16), N)
pos_probe = ridge_acc(X, y, 16)
where_probe = ridge_acc(emb[np.arange(N), obj_tok], x0d, 10)
# and from the mean-pooled image (what a decoder that cannot find the token could use)
where_pool = ridge_acc(emb.mean(1), x0d, 10)
u = emb / (np.linalg.norm(emb, axis=-1, keepdims=True) + 1e-9)
uu = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (emb.shape[-1],))) ; uu = uu / np.linalg.norm(uu)
cu = u @ uu
objaux_cos_obj = float(cu[np.arange(N), obj_tok].mean()); objaux_cos_bg = float((cu.sum(1) - cu[np.arange(N), obj_tok]).mean() / 15)
print("objaux cos(obj token,u)", objaux_cos_obj, "background", objaux_cos_bg)
print("DIAG", json.dumps(dict(run=run, init=bool(os.environ.get("INIT")), level=level, obj_top1=obj_top1,
      pos_probe=pos_probe, where_probe_objtoken=where_probe, where_probe_pooled=where_pool,
      where_marginal=float(np.max(np.bincount(x0d[N//2:], minlength=10)) / (N - N//2)),
      norm=float(np.linalg.norm(emb, axis=-1).mean()),
      cosW=float(((np.einsum('btd,bsd->bts', u, u).sum((1, 2)) - 16) / 240).mean()))), flush=True)
