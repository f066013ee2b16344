"""Issue-13 experiment driver: monkeypatches mini_o3_jax at run time, then runs mini_o3_jax.main.

  PYTHONPATH=. EX_...=... python tools/experiments/issue13/drive.py --config configs/pretrain_tiny.py \
      --workdir RUNS/NAME --config.stages=pretrain ...

Env switches (all optional):
  EX_LEVELS=1        register extra levels: single_flat (flat canvas), single_a25/_a50 (blotch+grain scaled),
                     few_flat, few_a50 (same TierSpecs as single / few)
  EX_ORACLE=1        replace the vision tower output by oracle features: fixed 2-D sin-cos position code per
                     merged token + a fixed "object" vector scaled by the token's colourfulness (one image/row)
  EX_ORACLE_POSGATE=1 (with EX_ORACLE_COL) the position code scaled by the saliency too: canvas tokens carry nothing
  EX_DISTILL=w       (with EX_GATE=pix) aux loss w * the tower's output's squared error to s * (its position code +
                     0.4 a fixed object vector + 0.4 its palette colour's direction), relative to the target's norm
  EX_TOWER_FIRST=n   no answer token in the loss before step n (the aux losses train the tower alone first)
  EX_DETACH=1        (with EX_OBJAUX / EX_COLAUX) the tower trained by the aux losses alone, the decoder on its output
  EX_GATE=pix|norm   the tower's output tokens times a gate (canvas tokens carry nothing): the pixels' chroma
                     saliency, or the centred token's norm relative to the frame's largest ^ EX_GATE_POW (below)
  EX_ORACLE_NOISE=x  (with EX_ORACLE) + a fixed random projection of each token's pixels, norm x, x saliency
  EX_ORACLE_SCALE=x  (with EX_ORACLE) the oracle features times x
  EX_ORACLE_COL=1    (with EX_ORACLE) the object vector plus a fixed unit direction of the token's palette colour
  EX_CENTER=1        subtract each image's mean token from the merger output (kills a shared direction)
  EX_RMS=x           RMS-normalise each merger output token to RMS x (no parameter)
  EX_SCALE=x         multiply the merger output by x
  EX_PEN=lam         + lam * ||mean over tokens and rows of merger output||^2 in the loss
  EX_VISLR=f         vision-tower updates scaled by f (optax.multi_transform)
  EX_SINCOS=a        add a fixed 2-D sin-cos table (amplitude a) to the patch embeddings
  EX_WHERE_W=w       loss weight w on the where tokens (tenths digit of x0/y0), renormalised
  EX_OBJAUX=w        aux loss w * mean over image tokens of (cos(token, u) - 0.5 s)^2 (u fixed, s = chroma saliency)
  EX_COLAUX=w        aux loss w * mean over image tokens of sum_k (cos(token, v_k) - 0.5 s [k = token colour])^2:
                     v_k a fixed random direction per palette colour, the token's colour the palette colour
                     nearest its chroma^2-weighted mean RGB (the shape's fill, where the token holds a shape)
  EX_SALCOL=thr      the saliency s of EX_OBJAUX / EX_COLAUX relative to the most colourful token of the same
                     palette colour (each shape its own maximum) instead of the image's, 0 below chroma thr
  EX_POINTER=w       aux loss w * -log(softmax mass on the target's image tokens) of the cosine scores between the
                     final hidden state that predicts the first box digit and every image token's final hidden
                     state; the target's tokens are those of the palette colour the question names (chroma >
                     0.08): supervises the binding route (question word -> the token of that colour) directly
  EX_ATTNSUP=w       aux loss w * -log(attention mass on the target's image tokens) of heads [0, EX_ATTNSUP_HEADS)
                     (default 1) of decoder layers EX_ATTNSUP_LAYER (default 2; a comma list), from every query that
                     predicts a box's tenths digit; target tokens as EX_POINTER's (the named palette colour,
                     chroma > 0.08): supervises the binding route inside attention, not the residual stream
  EX_MOSAIC=lo,hi    register level "mosaic": 3-4 shapes (few's recipe) drawn lo..hi view pixels wide, so
                     nearly every merged image token holds a shape (a binding curriculum's first rung: the text-only
                     copy of the lookup binds at once without background tokens and keeps binding once they come)
  EX_TILES=px        register level "tiles": 4 shapes (few's recipe) px view pixels wide, one per quadrant of the
                     view, so no merged image token is background (the toy's no-background rung, exactly)
  EX_ASKANY=1        locate questions about uniformly drawn uniquely named shapes (the target is not asked first): with
                     questions.locate=1 neither B1's generator shortcut nor the elimination shortcut of several
                     questions per row ("a shape not answered yet") pays
  EX_CELLFIRST=1     the locate answer starts with the box centre's 3 x 3 grid cell as one digit token (1-9), then the
                     call: recall3's ANS1, where one token that names the place binds and four coordinate digits do not
  EX_CELLONLY=1      (with EX_CELLFIRST) the loss on the cell token only (recall3's FIRSTONLY)
  EX_READNAME=p      one question per row about a uniformly drawn uniquely named shape: with probability p its digit
                     ("What digit is on the <name>?", no crop), else its box; level "bigread" (3-4 shapes 36-44 view px,
                     digits legible in the full view): answers the scene narrows without the question (recall3's LABELS)
  EX_INIT=dir       start from the params of a run's checkpoint directory (e.g. RUNS/P1/ckpt/pretrain: a tower trained
                     alone), the optimizer fresh (what P2 / P2b ran with; the package's `model.init_from` now does the
                     same for an Orbax directory)
  EX_STATS=1         at every probe: image-token norm, cosines, and teacher-forced where with images swapped
"""
import dataclasses
import functools
import json
import math
import os
import sys
import threading

import numpy as np

E = os.environ.get
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mini_o3_jax.data import coldstart, drawing, grounding, scene_levels, synthetic
from mini_o3_jax.model import attention as attn_lib
from mini_o3_jax.model import layers, rope
from mini_o3_jax.model import vision as vision_lib
from mini_o3_jax.model import vlm as vlm_lib
from mini_o3_jax.pipeline import grounding_probe, sources
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import forward as forward_lib
from mini_o3_jax.train import losses
from mini_o3_jax.train import optimizer as opt_lib
from mini_o3_jax.train import sft as sft_lib
from mini_o3_jax.train import state as state_lib

print("EX env:", {k: v for k, v in os.environ.items() if k.startswith("EX_")}, flush=True)

# ------------------------------------------------------------------ H1: canvas amplitude per level
_tls = threading.local()
LEVEL_AMP = {}
if E("EX_LEVELS"):
  for base in ("single", "few"):
    for name, amp in (("flat", 0.0), ("a25", 0.25), ("a50", 0.5)):
      scene_levels.LEVELS[f"{base}_{name}"] = scene_levels.LEVELS[base]
      LEVEL_AMP[f"{base}_{name}"] = amp

  _orig_make_scene = scene_levels.make_scene

  def make_scene(level, index, task_config, split=scene_levels.PRETRAIN_SPLIT):
    _tls.amp = LEVEL_AMP.get(level, 1.0)
    try:
      return _orig_make_scene(level, index, task_config, split)
    finally:
      _tls.amp = 1.0

  scene_levels.make_scene = make_scene
  _plain_background = drawing.background

  def _background(rng, size):
    return _plain_background(rng, size, texture=getattr(_tls, "amp", 1.0))

  drawing.background = _background


# ------------------------------------------------------------------ question order: locate questions first
# (a name question "What is at [box]?" about the same shape, asked earlier in the row, gives the locate answer away)
if E("EX_LOCATE_FIRST"):
  _orig_sq = grounding.scene_questions

  def scene_questions(task, config, rng):
    qs = _orig_sq(task, config, rng)
    rank = {"locate": 0, "name": 1, "read": 2}
    return sorted(qs, key=lambda q: rank[q[0]])  # stable: the random order survives within a kind

  grounding.scene_questions = scene_questions


# ------------------------------------------------------------------ locate questions about any shape, not the target first
# (one question per row about the target leaves B1's shortcut, "the shape whose colour is unique"; several questions
# per row leave an elimination shortcut, "a shape not answered yet in this row": one question about a random shape
# leaves neither)
if E("EX_ASKANY"):
  def scene_questions(task, config, rng):
    if config.name or config.read:
      raise ValueError("EX_ASKANY asks locate questions only: set questions.name=0 and questions.read=0")
    names = [grounding.object_name(o) for o in task.objects]
    unique = [i for i in range(len(names)) if names.count(names[i]) == 1]
    return [("locate", grounding.locate_question(names[i]),
             grounding.locate_answer(task.objects[i].box, config.decimals), int(i))
            for i in rng.permutation(unique)[:config.locate]]

  grounding.scene_questions = scene_questions


# ------------------------------------------------------------------ the cell first: one token that names the place
if E("EX_CELLFIRST"):
  _before_cellfirst_answer = grounding.locate_answer

  def locate_answer(box, decimals, cell_first=False):
    """The box's 3 x 3 grid cell (1-9, one digit token: recall3's ANS1) before the `<grounding>` call."""
    return f"{coldstart.grid_cell(box)} " + _before_cellfirst_answer(box, decimals)

  grounding.locate_answer = locate_answer

if E("EX_CELLONLY"):  # train the cell token alone: every locate answer's later tokens are in the row, not in the loss
  _before_cellonly_example = grounding.scene_example

  def scene_example(task, tokenizer, config, task_config, rng, cell_only=False):
    ex = _before_cellonly_example(task, tokenizer, config, task_config, rng)
    mask, kinds = ex["loss_mask"].copy(), ex["kinds"]
    locate = (kinds == grounding.KINDS.index("locate")).astype(np.int32)
    starts = np.flatnonzero(np.diff(np.concatenate([[0], locate])) == 1)
    mask[locate.astype(bool)] = 0
    mask[starts] = 1
    return {**ex, "loss_mask": mask}

  grounding.scene_example = scene_example


# ------------------------------------------------------------------ read by name: per-shape answers (recall3's LABELS)
if E("EX_READNAME"):
  _readname_share = float(E("EX_READNAME"))
  scene_levels.LEVELS["bigread"] = dataclasses.replace(scene_levels.LEVELS["few"], num_objects=(3, 4), glyph_full_view_px=float(E("EX_READNAME_GLYPH", "10")),
                                                    label_at_centre=True)
  _before_readname_scene_config = scene_levels.scene_config

  def scene_config(task_config, level):
    cfg, tier = _before_readname_scene_config(task_config, level)
    if level == "bigread":
      cfg = dataclasses.replace(cfg, object_view_px=(36.0, 44.0))
    return cfg, tier

  def scene_questions(task, config, rng):
    """One question about a uniformly drawn uniquely named shape: its digit (legible in the full view of a bigread
    scene; kind "read", scored on the digit) with probability EX_READNAME, else its box."""
    if config.name or config.read or config.locate != 1:
      raise ValueError("EX_READNAME asks one question per row: set questions.locate=1, name=0, read=0")
    names = [grounding.object_name(o) for o in task.objects]
    i = int(rng.choice([i for i in range(len(names)) if names.count(names[i]) == 1]))
    if rng.random() < _readname_share:
      return [("read", f"What digit is on the {names[i]}?", f"<answer>{task.objects[i].digit}</answer>", i)]
    return [("locate", grounding.locate_question(names[i]), grounding.locate_answer(task.objects[i].box, config.decimals), i)]

  def scene_views(task, questions, task_config):
    return [synthetic.render_view(task.image, None, task_config)]      # no crop: the digit is read in the scene

  _before_readname_messages = grounding.scene_messages

  def scene_messages(questions, question_first=False):
    return _before_readname_messages([("name" if k == "read" else k, q, a, i) for k, q, a, i in questions], question_first)

  _before_readname_make_scene = scene_levels.make_scene

  def make_scene(level, index, task_config, split=scene_levels.PRETRAIN_SPLIT):
    """bigread scenes whose label does not fit a shape (~2 %) are replaced by the next index's."""
    for attempt in range(50):
      try:
        return _before_readname_make_scene(level, index + attempt * 10_000_000, task_config, split)
      except ValueError:
        if level != "bigread":
          raise
    raise ValueError(f"no bigread scene near index {index}")

  scene_levels.scene_config = scene_config
  scene_levels.make_scene = make_scene
  grounding.scene_questions = scene_questions
  grounding.scene_views = scene_views
  grounding.scene_messages = scene_messages


# ------------------------------------------------------------------ sin-cos helper
def sincos_2d(rows, cols, dim, max_period=10.0):
  """[n, dim] 2-D sin-cos code: first half encodes rows, second half cols (positions in units)."""
  q = dim // 4
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(q) / max(q - 1, 1)) * math.pi  # pi .. pi/10 per unit
  r = rows[:, None].astype(jnp.float32) * freqs[None]
  c = cols[:, None].astype(jnp.float32) * freqs[None]
  out = jnp.concatenate([jnp.sin(r), jnp.cos(r), jnp.sin(c), jnp.cos(c)], -1)
  if out.shape[-1] < dim:
    out = jnp.pad(out, ((0, 0), (0, dim - out.shape[-1])))
  return out


# ------------------------------------------------------------------ vision tower: sincos + output transforms
SINCOS = float(E("EX_SINCOS", "0"))
CENTER = bool(E("EX_CENTER"))
RMS = float(E("EX_RMS", "0"))
SCALE = float(E("EX_SCALE", "0"))
IMGNORM = float(E("EX_IMGNORM", "0"))   # after centring: per-image RMS (over tokens and dims) set to this
POSTPOS = float(E("EX_POSTPOS", "0"))   # fixed 2-D sin-cos of the merged-token cell, norm POSTPOS, added last

if SINCOS or CENTER or RMS or SCALE or IMGNORM or POSTPOS:
  _orig_tower_call = vision_lib.VisionTower.__call__

  def tower_call(self, pixel_values, inputs):
    cfg = self.cfg
    n, unit = pixel_values.shape[0], cfg.merge_unit
    x = self.patch_embed(pixel_values)
    x = x.reshape(n // unit, unit, -1)[inputs.window_index].reshape(n, -1)
    if cfg.position_table:
      rows, cols = inputs.patch_positions[:, 0], inputs.patch_positions[:, 1]
      x = x + (self.row_embed[...][rows] + self.col_embed[...][cols]).astype(x.dtype)
    if SINCOS:
      x = x + SINCOS * sincos_2d(inputs.patch_positions[:, 0], inputs.patch_positions[:, 1],
                                 cfg.hidden_size).astype(x.dtype)
    cos, sin = rope.vision_cos_sin(inputs.patch_positions, cfg.head_dim, cfg.rope_theta)
    window_block = cfg.window_merged**2 * unit
    for start, stop, full in vision_lib._attention_runs(cfg.depth, cfg.fullatt_block_indexes):
      def body(block, x, _, full=full):
        return block(x, cos, sin, full, inputs.image_segments, inputs.window_segments, window_block), None
      x, _ = layers.scan_layers(self.blocks, body, x, None, remat=self.remat, layer_slice=slice(start, stop))
    merged = self.merger(x)[inputs.reverse_index]  # [tokens, out] processor order
    if CENTER:
      # per image frame: segment id of each merged token (processor order)
      seg = inputs.image_segments[::unit][inputs.reverse_index]
      nseg = seg.shape[0]
      same = (seg[:, None] == seg[None, :]).astype(merged.dtype)
      mean = same @ merged / jnp.maximum(same.sum(-1, keepdims=True), 1.0)
      merged = merged - mean
    if RMS:
      merged = merged * (RMS * jax.lax.rsqrt(jnp.mean(merged.astype(jnp.float32)**2, -1, keepdims=True) + 1e-6)
                         ).astype(merged.dtype)
    if IMGNORM:
      seg = inputs.image_segments[::unit][inputs.reverse_index]
      same = (seg[:, None] == seg[None, :]).astype(jnp.float32)
      ms = same @ jnp.mean(merged.astype(jnp.float32)**2, -1, keepdims=True) / jnp.maximum(same.sum(-1, keepdims=True), 1.0)
      merged = merged * (IMGNORM * jax.lax.rsqrt(ms + 1e-8)).astype(merged.dtype)
    if SCALE:
      merged = merged * SCALE
    if POSTPOS:
      cell = inputs.patch_positions[::unit][inputs.reverse_index] // cfg.spatial_merge_size   # [tokens, 2]
      code = sincos_2d(cell[:, 0], cell[:, 1], merged.shape[-1], max_period=4.0)
      merged = merged + (POSTPOS * code / jnp.sqrt(merged.shape[-1] / 1.0)).astype(merged.dtype)
    return merged

  vision_lib.VisionTower.__call__ = tower_call


# ------------------------------------------------------------------ binding curriculum: shapes that fill the view
if E("EX_MOSAIC"):
  _mosaic_px = tuple(float(v) for v in E("EX_MOSAIC").split(","))
  scene_levels.LEVELS["mosaic"] = dataclasses.replace(scene_levels.LEVELS["few"], num_objects=(3, 4))
  _orig_scene_config = scene_levels.scene_config

  def scene_config(task_config, level):
    cfg, tier = _orig_scene_config(task_config, level)
    if level == "mosaic":
      cfg = dataclasses.replace(cfg, object_view_px=_mosaic_px)
    return cfg, tier

  scene_levels.scene_config = scene_config


# ------------------------------------------------------------------ binding curriculum: no background at all
if E("EX_TILES"):
  _tile_px = float(E("EX_TILES"))
  scene_levels.LEVELS["tiles"] = dataclasses.replace(scene_levels.LEVELS["few"], num_objects=(4, 4))
  _before_tiles_scene_config = scene_levels.scene_config
  _before_tiles_make_scene = scene_levels.make_scene
  _before_tiles_place = synthetic._place_boxes

  def scene_config(task_config, level):
    cfg, tier = _before_tiles_scene_config(task_config, level)
    if level == "tiles":
      cfg = dataclasses.replace(cfg, object_view_px=(_tile_px, _tile_px))
    return cfg, tier

  def make_scene(level, index, task_config, split=scene_levels.PRETRAIN_SPLIT):
    _tls.tiles = level == "tiles"
    try:
      return _before_tiles_make_scene(level, index, task_config, split)
    finally:
      _tls.tiles = False

  def place_boxes(rng, sides, size, gap, required):
    """One shape per quadrant, in a random order, jittered inside its quadrant."""
    if not getattr(_tls, "tiles", False):
      return _before_tiles_place(rng, sides, size, gap, required)
    w, h = size
    boxes = []
    for side, q in zip(sides, rng.permutation(4)):
      side = min(side, w // 2, h // 2)
      x = (q % 2) * (w // 2) + int(rng.integers(0, w // 2 - side + 1))
      y = (q // 2) * (h // 2) + int(rng.integers(0, h // 2 - side + 1))
      boxes.append((x, y, x + side, y + side))
    return boxes

  scene_levels.scene_config = scene_config
  scene_levels.make_scene = make_scene
  synthetic._place_boxes = place_boxes


# The pixels' normalisation: Qwen2.5-VL's (CLIP's); probes of another family's run set the run's (features.py).
PIX_MEAN, PIX_STD = image_lib.normalization("qwen2_5_vl")


# ------------------------------------------------------------------ H2: oracle image features
if E("EX_ORACLE"):
  MEAN = np.asarray(PIX_MEAN, np.float32)
  STD = np.asarray(PIX_STD, np.float32)
  OBJ_W = float(E("EX_ORACLE_OBJ", "1.0"))
  POS_W = float(E("EX_ORACLE_POS", "1.0"))

  def oracle_encode(self, pixel_values, vision):
    d = self.config.text.hidden_size
    pv = pixel_values if pixel_values.ndim == 3 else pixel_values[None]
    b, p, _ = pv.shape
    x = pv.reshape(b, p, 3, 2, 14, 14)[:, :, :, 0] * STD[None, None, :, None, None] + MEAN[None, None, :, None, None]
    chroma = (x.max(2) - x.min(2)).mean((-1, -2))           # [b, p]
    tok = chroma.reshape(b, p // 4, 4).mean(-1)             # [b, tokens]
    s = tok / (tok.max(-1, keepdims=True) + 1e-6)
    s = s**4
    t = p // 4
    j = jnp.arange(t) % 16
    pos = sincos_2d(j // 4, j % 4, d, max_period=4.0)        # [t, d]; entries +-1
    pos = POS_W * pos / jnp.sqrt(d / 1.0)                   # norm ~1 per token
    obj = jax.random.normal(jax.random.PRNGKey(123), (d,)) / jnp.sqrt(d) * OBJ_W   # norm ~1
    if E("EX_ORACLE_COL"):
      # + a fixed unit direction per palette colour on each shape's tokens; s per colour when EX_SALCOL is set
      s = chroma_saliency(pv)
      obj = obj[None, None] + jnp.einsum("btk,kd->btd", colour_onehot(pv), colour_directions(d))
      # EX_ORACLE_POSGATE: the position code on shape tokens only (recall3's POSGATE: canvas tokens carry nothing)
      out = s[..., None] * (pos[None] + obj) if E("EX_ORACLE_POSGATE") else pos[None] + s[..., None] * obj
    else:
      out = pos[None] + s[..., None] * obj[None, None]
    if E("EX_ORACLE_NOISE"):
      # + a fixed random projection of each token's pixels (norm EX_ORACLE_NOISE, x saliency): a residual that
      # depends on the image as a tower's does, not on the task
      tok_pix = pv.reshape(b, t, -1)                                                   # [b, t, 4 * patch_dim]
      proj = jax.random.normal(jax.random.PRNGKey(5), (tok_pix.shape[-1], d))
      r = tok_pix @ proj
      r = r / (jnp.linalg.norm(r, axis=-1, keepdims=True) + 1e-6)
      out = out + float(E("EX_ORACLE_NOISE")) * s[..., None] * r
    out = jax.lax.stop_gradient(out) * float(E("EX_ORACLE_SCALE", "1"))  # EX_ORACLE_SCALE: the features' norm
    return out if pixel_values.ndim == 3 else out[0]

  vlm_lib.Qwen25VL.encode_images = oracle_encode


# ------------------------------------------------------------------ H3: vision lr
VISLR = E("EX_VISLR")
if VISLR:
  _orig_make_opt = opt_lib.make_optimizer

  def make_optimizer(config, params_tree, **kw):
    tx = _orig_make_opt(config, params_tree, **kw)
    f = float(VISLR)

    def labels(tree):
      return jax.tree_util.tree_map_with_path(
          lambda p, _: "v" if opt_lib.path_names(p) and opt_lib.path_names(p)[0] == config.vision_prefix else "t", tree)
    return optax.chain(tx, optax.multi_transform({"v": optax.scale(f), "t": optax.identity()}, labels))

  opt_lib.make_optimizer = make_optimizer


# ------------------------------------------------------------------ H3 penalty / where-token weight: custom loss
PEN = float(E("EX_PEN", "0"))
WHERE_W = float(E("EX_WHERE_W", "0"))
OBJAUX = float(E("EX_OBJAUX", "0"))  # aux loss: projection of each image token on a fixed direction = its chroma saliency
SALCOL = float(E("EX_SALCOL", "0"))  # saliency per palette colour (each shape its own maximum), 0 below this chroma


def chroma_saliency(pixel_values):
  """[b, p, 1176] normalised patches -> [b, p/4] (token chroma / image max)**4, as the oracle uses."""
  mean, std = jnp.asarray(PIX_MEAN), jnp.asarray(PIX_STD)
  b, p, _ = pixel_values.shape
  x = pixel_values.reshape(b, p, 3, 2, 14, 14)[:, :, :, 0] * std[None, None, :, None, None] + mean[None, None, :, None, None]
  tok = (x.max(2) - x.min(2)).mean((-1, -2)).reshape(b, p // 4, 4).mean(-1)
  if SALCOL:
    oh = colour_onehot(pixel_values)                                          # [b, t, K]
    cmax = jnp.max(tok[..., None] * oh, axis=1)                               # [b, K] each colour's max
    ref = jnp.einsum("btk,bk->bt", oh, cmax)                                  # [b, t]
    return jax.lax.stop_gradient(jnp.where(tok > SALCOL, (tok / (ref + 1e-6)) ** 4, 0.0))
  return jax.lax.stop_gradient((tok / (tok.max(-1, keepdims=True) + 1e-6)) ** 4)
_where_ids = None
COLAUX = float(E("EX_COLAUX", "0"))
DETACH = bool(E("EX_DETACH"))
DISTILL = float(E("EX_DISTILL", "0"))  # aux: the tower's (gated) output regressed on oracle-like features (with EX_GATE=pix)
COLAUX_T = float(E("EX_COLAUX_T", "0.5"))  # EX_COLAUX's target cosine with the token's colour direction (x saliency)
POINTER = float(E("EX_POINTER", "0"))
ATTNSUP = float(E("EX_ATTNSUP", "0"))
ATTNSUP_LAYERS = tuple(int(x) for x in E("EX_ATTNSUP_LAYER", "2").split(","))
ATTNSUP_HEADS = int(E("EX_ATTNSUP_HEADS", "1"))
PALETTE = np.asarray([rgb for _, rgb in synthetic.DEFAULT_PALETTE], np.float32) / 255.0   # [K, 3]


def colour_directions(d):
  """[K, d] the fixed unit direction of each palette colour (the oracle's, EX_COLAUX's and EX_DISTILL's)."""
  v = jax.random.normal(jax.random.PRNGKey(11), (PALETTE.shape[0], d))
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def object_direction(d):
  """[d] the fixed "object" direction of EX_OBJAUX / EX_DISTILL, norm ~1."""
  return jax.random.normal(jax.random.PRNGKey(7), (d,)) / jnp.sqrt(d)


def real_tokens(pixel_values):
  """[b, tokens] 1 for image tokens holding pixels, 0 for padding."""
  b = pixel_values.shape[0]
  return (jnp.abs(pixel_values).sum(-1).reshape(b, -1, 4).sum(-1) > 0).astype(jnp.float32)


def colour_onehot(pixel_values):
  """[b, p, 1176] normalised patches -> [b, p/4, K] one-hot of the palette colour nearest each token's
  chroma^2-weighted mean RGB (for background tokens this is an arbitrary colour, weighted by s ~ 0 below)."""
  mean, std = jnp.asarray(PIX_MEAN), jnp.asarray(PIX_STD)
  b, p, _ = pixel_values.shape
  x = pixel_values.reshape(b, p, 3, 2, 196)[:, :, :, 0] * std[None, None, :, None] + mean[None, None, :, None]
  x = x.reshape(b, p // 4, 4, 3, 196).transpose(0, 1, 3, 2, 4).reshape(b, p // 4, 3, 4 * 196)   # [b, t, 3, px]
  w = (x.max(2) - x.min(2)) ** 2                                                              # [b, t, px]
  rgb = jnp.sum(x * w[:, :, None], -1) / (jnp.sum(w, -1)[..., None] + 1e-6)                  # [b, t, 3]
  d = jnp.sum((rgb[:, :, None, :] - jnp.asarray(PALETTE)[None, None]) ** 2, -1)              # [b, t, K]
  return jax.lax.stop_gradient(jax.nn.one_hot(jnp.argmin(d, -1), PALETTE.shape[0]))

def pointer_loss(h, inputs, targets, maskf, image_token_id, tokens_per_row):
  """Mean over rows with a named target of -log(sum of softmax(10 cos(h_query, h_img)) over target tokens)."""
  ids = inputs.input_ids
  b, t1, d = h.shape
  prev = ids[:, :-1]
  is_where = jnp.isin(prev, jnp.asarray(_where_ids["prefix"])) & jnp.isin(targets, jnp.asarray(_where_ids["digits"]))
  is_where = is_where & (maskf > 0)
  has_q = jnp.any(is_where, -1)                                                   # [b]
  q_pos = jnp.argmax(is_where, -1)                                                # [b] first where digit
  hq = jnp.take_along_axis(h, q_pos[:, None, None], 1)[:, 0]                      # [b, d]
  img_pos = jax.vmap(lambda r: jnp.nonzero(r == image_token_id, size=tokens_per_row, fill_value=0)[0])(ids)
  hi = jnp.take_along_axis(h, img_pos[..., None], 1)                              # [b, tokens, d]
  colour_ids = jnp.asarray(_where_ids["colours"])                                 # [K] token id per palette colour
  named = jnp.any(ids[:, :, None] == colour_ids[None, None], 1)                   # [b, K] colours named in the row
  onehot = colour_onehot(inputs.pixel_values)                                     # [b, tokens, K]
  chroma = chroma_tokens(inputs.pixel_values)                                     # [b, tokens]
  target = (jnp.einsum("btk,bk->bt", onehot, named.astype(jnp.float32)) > 0) & (chroma > 0.08)
  cos = jnp.einsum("bd,btd->bt", hq, hi) / (jnp.linalg.norm(hq, axis=-1)[:, None] * jnp.linalg.norm(hi, axis=-1) + 1e-6)
  logp = jax.nn.log_softmax(10.0 * cos, -1)
  mass = jax.nn.logsumexp(jnp.where(target, logp, -1e9), -1)                      # [b]
  valid = has_q & jnp.any(target, -1) & (jnp.sum(named, -1) == 1)
  return jnp.sum(jnp.where(valid, -mass, 0.0)) / jnp.maximum(jnp.sum(valid), 1.0)


def chroma_tokens(pixel_values):
  """[b, p, 1176] -> [b, p/4] mean chroma of each merged token (no normalisation)."""
  mean, std = jnp.asarray(PIX_MEAN), jnp.asarray(PIX_STD)
  b, p, _ = pixel_values.shape
  x = pixel_values.reshape(b, p, 3, 2, 14, 14)[:, :, :, 0] * std[None, None, :, None, None] + mean[None, None, :, None, None]
  return jax.lax.stop_gradient((x.max(2) - x.min(2)).mean((-1, -2)).reshape(b, p // 4, 4).mean(-1))


def target_token_mask(inputs, image_token_id, tokens_per_row):
  """(image token positions int [b, tokens], target bool [b, tokens], valid bool [b]): the image tokens of
  the palette colour the row's question names (chroma > 0.08); valid rows name exactly one colour."""
  ids = inputs.input_ids
  img_pos = jax.vmap(lambda r: jnp.nonzero(r == image_token_id, size=tokens_per_row, fill_value=0)[0])(ids)
  colour_ids = jnp.asarray(_where_ids["colours"])
  named = jnp.any(ids[:, :, None] == colour_ids[None, None], 1)                   # [b, K]
  onehot = colour_onehot(inputs.pixel_values)                                     # [b, tokens, K]
  chroma = chroma_tokens(inputs.pixel_values)
  target = (jnp.einsum("btk,bk->bt", onehot, named.astype(jnp.float32)) > 0) & (chroma > 0.08)
  valid = jnp.any(target, -1) & (jnp.sum(named, -1) == 1)
  return img_pos, target, valid


def forward_with_attention(model, x, positions, attention_mask, layer_indices, heads):
  """The text model's forward (as TextModel.__call__, no DeepStack) that also returns layers `layer_indices`'
  attention probabilities of heads [0, heads): (final hidden [b, t, d], probs [b, layers * heads, t, t])."""
  tm = model.model
  b, t, _ = x.shape
  cos, sin = rope.text_cos_sin(tm.cfg, positions)
  segments = attn_lib.text_segments(attention_mask.astype(bool), (b, t))
  mask = attn_lib.segment_mask(segments, True)                                    # [b, t, t]

  def body(layer, h, _):
    q, k, v = layer.qkv(h, cos, sin)
    out = attn_lib.self_attention(q, k, v, segments, causal=True, impl=layer.attention_impl,
                                  block=layer.attention_block)
    group = q.shape[2] // k.shape[2]
    kq = jnp.repeat(k[:, :, :heads // group + 1], group, axis=2)[:, :, :heads]   # the kv head of each q head
    logits = jnp.einsum("bthd,bshd->bhts", q[:, :, :heads], kq) * (q.shape[-1] ** -0.5)
    logits = jnp.where(mask[:, None], logits, -1e30)
    return layer.finish(h, out), jax.nn.softmax(logits, -1)

  h, probs = layers.scan_layers(tm.layers, body, x, None)                       # probs [L, b, heads, t, t]
  probs = jnp.concatenate([probs[i] for i in layer_indices], axis=1)
  return tm.norm(h), probs


def attention_supervision_loss(probs, inputs, targets, maskf, image_token_id, tokens_per_row):
  """Mean over (row, tenths-digit query, head) of -log(attention mass on the named colour's image tokens)."""
  prev = inputs.input_ids[:, :-1]
  is_where = jnp.isin(prev, jnp.asarray(_where_ids["prefix"])) & jnp.isin(targets, jnp.asarray(_where_ids["digits"]))
  is_where = is_where & (maskf > 0)                                               # [b, t-1] query positions
  img_pos, target, valid = target_token_mask(inputs, image_token_id, tokens_per_row)
  p_img = jnp.take_along_axis(probs[:, :, :-1], img_pos[:, None, None, :], axis=-1)  # [b, heads, t-1, tokens]
  mass = jnp.sum(jnp.where(target[:, None, None], p_img, 0.0), -1)                # [b, heads, t-1]
  w = (is_where & valid[:, None]).astype(jnp.float32)[:, None]                    # [b, 1, t-1]
  nll = -jnp.log(mass + 1e-6)
  return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w) * probs.shape[1], 1.0)


if PEN or WHERE_W or OBJAUX or COLAUX or POINTER or ATTNSUP or DISTILL:
  def sft_loss_and_grads(config, graphdef, params, batch, mesh=None, grad_shardings=None):
    _, global_mask = losses.next_token_targets(batch.inputs.input_ids, batch.loss_mask)
    normalizer = sft_lib.sft_normalizer(global_mask, config.sequence_mean)

    def micro_loss(p, micro):
      model = nnx.merge(graphdef, p)
      inputs = micro.inputs
      emb = model.encode_images(inputs.pixel_values, inputs.vision)
      # EX_DETACH: the decoder's loss does not reach the tower; only the aux losses train it (clean, oracle-like
      # colour / objectness directions the decoder can bind on, O6)
      x = model.embed(inputs.input_ids, jax.lax.stop_gradient(emb) if DETACH else emb)
      if ATTNSUP:
        h, probs = forward_with_attention(model, x, inputs.positions, inputs.attention_mask, ATTNSUP_LAYERS,
                                          ATTNSUP_HEADS)
      else:
        h = model.model(x, inputs.positions, inputs.attention_mask)
      hidden = h[:, :-1]
      targets, mask = losses.next_token_targets(inputs.input_ids, micro.loss_mask)
      st = forward_lib.head_token_stats(model, hidden, targets, chunk=config.logits_chunk, correct=True)
      maskf = mask.astype(jnp.float32)
      w = maskf
      if WHERE_W:
        # where token: a digit right after a "0."-ending piece within the first two coords of an answer
        prev = inputs.input_ids[:, :-1]
        is_where = jnp.isin(prev, jnp.asarray(_where_ids["prefix"])) & jnp.isin(targets, jnp.asarray(_where_ids["digits"]))
        # (all four tenths digits: x1/y1 tenths follow x0/y0 closely)
        is_where = is_where & (maskf > 0)
        w = maskf * jnp.where(is_where, WHERE_W, 1.0)
      nll = jnp.where(maskf > 0, -st["logprobs"], 0.0)
      loss = jnp.sum(nll * w) / jnp.maximum(normalizer, 1.0)
      if PEN:
        m = jnp.mean(emb.reshape(-1, emb.shape[-1]), 0)
        loss = loss + PEN * jnp.sum(m**2) / config.grad_accum_steps
      if OBJAUX:
        d = emb.shape[-1]
        u = object_direction(d)
        sal = chroma_saliency(inputs.pixel_values)                      # [b, tokens]
        proj = jnp.einsum("btd,d->bt", emb, u) / (jnp.sqrt(jnp.mean(emb**2, -1)) * jnp.sqrt(d) + 1e-6)  # cosine with u
        real = real_tokens(inputs.pixel_values)
        aux_l = jnp.sum(real * (proj - 0.5 * sal) ** 2) / jnp.maximum(jnp.sum(real), 1.0)
        loss = loss + OBJAUX * aux_l / config.grad_accum_steps
      if POINTER:
        loss = loss + POINTER * pointer_loss(hidden, inputs, targets, maskf, model.config.image_token_id,
                                             inputs.pixel_values.shape[1] // 4) / config.grad_accum_steps
      attnsup = jnp.zeros(())
      if ATTNSUP:
        attnsup = attention_supervision_loss(probs, inputs, targets, maskf, model.config.image_token_id,
                                             inputs.pixel_values.shape[1] // 4)
        loss = loss + ATTNSUP * attnsup / config.grad_accum_steps
      if DISTILL:
        # the oracle's features as the tower's target: s * (its position code + an object vector + its colour's direction)
        d = emb.shape[-1]
        pv = inputs.pixel_values
        sal = chroma_saliency(pv)                                                           # [b, t]
        t = sal.shape[1]
        j = jnp.arange(t) % 16
        pc = 0.5 * vision_lib.position_code(j // 4, j % 4, d) / math.sqrt(d)                 # the tower's own code
        target = sal[..., None] * (pc[None] + 0.4 * object_direction(d)
                                   + jnp.einsum("btk,kd->btd", colour_onehot(pv), 0.4 * colour_directions(d)))
        real = real_tokens(pv)
        err = jnp.sum(jnp.square(emb - target), -1) / jnp.maximum(jnp.mean(jnp.sum(jnp.square(target), -1)), 1e-6)
        loss = loss + DISTILL * jnp.sum(real * err) / jnp.maximum(jnp.sum(real), 1.0) / config.grad_accum_steps
      if COLAUX:
        d = emb.shape[-1]
        sal = chroma_saliency(inputs.pixel_values)                                            # [b, t]
        cosv = jnp.einsum("btd,kd->btk", emb, colour_directions(d)) / (jnp.linalg.norm(emb, axis=-1)[..., None] + 1e-6)
        target = COLAUX_T * sal[..., None] * colour_onehot(inputs.pixel_values)                # [b, t, K]
        real = real_tokens(inputs.pixel_values)
        col_l = jnp.sum(real[..., None] * (cosv - target) ** 2) / jnp.maximum(jnp.sum(real), 1.0)
        loss = loss + COLAUX * col_l / config.grad_accum_steps
      aux = {
          "nll_sum": jax.lax.stop_gradient(jnp.sum(nll)),
          "correct_sum": jnp.sum(st["correct"] * maskf),
          "num_loss_tokens": jnp.sum(maskf),
          "num_tokens": jnp.sum(inputs.attention_mask.astype(jnp.float32)),
          "attnsup": jax.lax.stop_gradient(attnsup),
      }
      return loss, aux

    k = config.grad_accum_steps
    micro = batch_lib.split_microbatches(batch, k)
    constrain = (lambda x: batch_lib.constrain_batch(x, mesh)) if mesh is not None else (lambda x: x)
    loss, aux, grads = state_lib.accumulate_gradients(micro_loss, params, micro, k, constrain, grad_shardings)
    n = aux["num_loss_tokens"]
    safe = jnp.maximum(n, 1.0)
    metrics = {"loss": loss, "nll": aux["nll_sum"] / safe, "accuracy": aux["correct_sum"] / safe,
               "num_loss_tokens": n, "num_tokens": aux["num_tokens"], "attnsup": aux["attnsup"] / k}
    return loss, metrics, grads

  sft_lib.sft_loss_and_grads = sft_loss_and_grads


# ------------------------------------------------------------------ the position only where something is (O6's lesson)
# O6: with oracle features whose canvas tokens carry nothing, the VLM binds the cell; with the position code on every
# token (O5) it does not. Two gates for the trained tower's output tokens (centred, RMS-normalised, + position code):
#   EX_GATE=pix   each token times the oracle's chroma saliency s (from the pixels; no gradient)
#   EX_GATE=norm  each token times (|centred token| / the frame's largest)^EX_GATE_POW (default 4): parameter-free,
#                 from the tower's own features (differentiable), so the tower learns what stands out
GATE = E("EX_GATE", "")
GATE_POW = float(E("EX_GATE_POW", "4"))
if GATE == "pix":
  _before_gate_encode = vlm_lib.Qwen25VL.encode_images

  def gated_encode(self, pixel_values, vision):
    out = _before_gate_encode(self, pixel_values, vision)
    pv = pixel_values if pixel_values.ndim == 3 else pixel_values[None]
    g = 1e-3 + chroma_saliency(pv)      # [b, tokens]; the floor keeps the aux losses' cosines defined on the canvas
    return out * (g[..., None] if pixel_values.ndim == 3 else g[0][..., None]).astype(out.dtype)

  vlm_lib.Qwen25VL.encode_images = gated_encode
elif GATE == "norm":
  _before_gate_normalise = vision_lib._normalise_output

  def gated_normalise(merged, inputs, cfg):
    unit = cfg.merge_unit
    frame = inputs.image_segments[::unit][inputs.reverse_index]                        # [tokens]
    same = (frame[:, None] == frame[None, :]).astype(jnp.float32)                     # [tokens, tokens]
    x = merged.astype(jnp.float32)
    x = x - same @ x / jnp.maximum(same.sum(-1, keepdims=True), 1.0)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), -1) + 1e-12)                               # [tokens]
    g = (norm / (jnp.max(jnp.where(same > 0, norm[None, :], 0.0), -1) + 1e-6)) ** GATE_POW
    return (_before_gate_normalise(merged, inputs, cfg) * g[:, None]).astype(merged.dtype)

  vision_lib._normalise_output = gated_normalise
elif GATE:
  raise ValueError(f"EX_GATE={GATE!r}: pix or norm")


# ------------------------------------------------------------------ the tower first (O6 had its features from step 0)
if E("EX_TOWER_FIRST"):
  _tower_first = int(E("EX_TOWER_FIRST"))
  _before_rows_for = grounding.SceneStream.rows_for

  def rows_for(self, step):
    """Before step EX_TOWER_FIRST no answer token is in the loss: only the aux losses (the tower) learn."""
    rows = _before_rows_for(self, step)
    return rows if step >= _tower_first else [{**r, "loss_mask": np.zeros_like(r["loss_mask"])} for r in rows]

  grounding.SceneStream.rows_for = rows_for


# ------------------------------------------------------------------ start from another run's params
if E("EX_INIT"):
  def init_params(config, mcfg, mesh):
    params, step = ckpt_lib.restore_params(E("EX_INIT"), mcfg, mesh=mesh)
    print(f"EX_INIT: params of {E('EX_INIT')} step {step}", flush=True)
    return params

  sources.init_params = init_params   # pretrain_stage calls sources.init_params


# ------------------------------------------------------------------ stats at every probe
if E("EX_STATS"):
  _orig_run = grounding_probe.GroundingProbe.run

  def run(self, model, greedy=True):
    out = _orig_run(self, model, greedy)
    try:
      level = self.config.levels[0]
      rows = self.rows[level]
      cfg = batch_lib.BatchConfig(batch_size=len(rows), pad_token_id=self.model_config.text.pad_token_id)
      batch = batch_lib.collate_sft(rows, self.model_config, cfg, seq_len=self.config.seq_len,
                                    num_patches=self.config.num_patches)
      emb = np.asarray(model.encode_images(batch.inputs.pixel_values, batch.inputs.vision))  # [b, t, d]
      n_img = 16
      emb = emb[:, :n_img]
      norms = np.linalg.norm(emb, axis=-1)
      u = emb / (norms[..., None] + 1e-9)
      cross = np.mean(np.sum(u * np.roll(u, 1, axis=0), -1))      # same token, two images
      within = np.einsum("btd,bsd->bts", u, u)
      within = (within.sum((1, 2)) - n_img) / (n_img * (n_img - 1))
      # centred cosine: remove the dataset mean token first
      c = emb - emb.reshape(-1, emb.shape[-1]).mean(0)
      cu = c / (np.linalg.norm(c, axis=-1, keepdims=True) + 1e-9)
      cross_c = np.mean(np.sum(cu * np.roll(cu, 1, axis=0), -1))
      temb = np.asarray(model.model.embed_tokens.embedding[...]) if hasattr(model.model, "embed_tokens") else None
      out[f"{level}/img_norm"] = float(norms.mean())
      if temb is not None:
        out[f"{level}/text_norm"] = float(np.linalg.norm(temb, axis=-1).mean())
      out[f"{level}/cos_cross"] = float(cross)
      out[f"{level}/cos_within"] = float(within.mean())
      out[f"{level}/cos_cross_centred"] = float(cross_c)
      # teacher-forced where with images rolled by one row (does the text use the image?)
      swapped = []
      for i, r in enumerate(rows):
        o = rows[(i + 1) % len(rows)]
        swapped.append(dict(r, pixel_values=o["pixel_values"], image_grid_thw=o["image_grid_thw"]))
      sw = self.teacher_forced(model, swapped)
      out[f"{level}/swap_where"] = sw.get("tf_where", float("nan"))
      out[f"{level}/swap_box"] = sw.get("tf_box", float("nan"))
    except Exception as e:  # never kill a run for a stat
      print("stats failed:", repr(e), flush=True)
    print("PROBE", json.dumps({k: round(v, 4) for k, v in out.items()}), flush=True)
    return out

  grounding_probe.GroundingProbe.run = run


if __name__ == "__main__":
  from absl import app
  from mini_o3_jax import main as main_lib
  from mini_o3_jax.processing import tokenizer as tok_lib
  if WHERE_W or POINTER or ATTNSUP:
    # token ids: pieces ending in "0." / "1." (coordinate prefixes) and single digits
    _orig_setup = main_lib.common.setup

    def setup(config, workdir):
      global _where_ids
      out = _orig_setup(config, workdir)
      tok = out[1]
      vocab = [tok.decode([i]) for i in range(config.tokenizer.vocab_size)]
      prefix = [i for i, p in enumerate(vocab) if p.endswith("0.") or p.endswith("1.")]
      digits = [i for i, p in enumerate(vocab) if p.isdigit() and len(p) == 1]
      colours = [tok.encode(" " + name, add_special_tokens=False) for name, _ in synthetic.DEFAULT_PALETTE]
      if any(len(c) != 1 for c in colours):
        raise ValueError(f"colour words are not single tokens: {colours}")
      _where_ids = {"prefix": prefix, "digits": digits, "colours": [c[0] for c in colours]}
      print("where ids", [vocab[i] for i in prefix], [vocab[i] for i in digits], flush=True)
      return out

    main_lib.common.setup = setup
  app.run(main_lib.main)
