"""The base's two-phase recipe (issue 13): feature targets for the tower, its stage alone, the cell-first
locate answer, the fixed sin-cos code on the patch embeddings."""

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.ImageDraw
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import train_worker as W  # noqa: E402

from configs import demo, pretrain_tiny  # noqa: E402
from mini_o3_jax import run_config  # noqa: E402
from mini_o3_jax.agent import tools  # noqa: E402
from mini_o3_jax.data import coldstart, grounding, scene_levels, synthetic  # noqa: E402
from mini_o3_jax.model import config as config_lib  # noqa: E402
from mini_o3_jax.model import rope, vlm  # noqa: E402
from mini_o3_jax.model import vision as vision_lib  # noqa: E402
from mini_o3_jax.model.vision import VisionInputs  # noqa: E402
from mini_o3_jax.pipeline import common, grounding_probe, pretrain_stage  # noqa: E402
from mini_o3_jax.processing import image as image_lib  # noqa: E402
from mini_o3_jax.train import batch as batch_lib  # noqa: E402
from mini_o3_jax.train import optimizer as opt_lib  # noqa: E402
from mini_o3_jax.train import state as state_lib  # noqa: E402
from mini_o3_jax.train import vision_targets as vt  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return common.build_tokenizer(demo.get_config(), str(tmp_path_factory.mktemp("tok")))


def _sincos(pos, dim, max_period):
  """numpy: [n, dim] sin / cos of rows then cols at dim / 4 frequencies pi .. pi / max_period."""
  q = dim // 4
  freqs = math.pi * np.exp(-np.log(max_period) * np.arange(q) / max(q - 1, 1))
  r, c = pos[:, :1] * freqs, pos[:, 1:] * freqs
  out = np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], -1)
  return np.pad(out, ((0, 0), (0, dim - out.shape[-1])))


# ------------------------------------------------------------------------------------------ host targets

def test_token_colours_name_each_shape_and_silence_the_canvas():
  """On rendered scenes: the tokens that hold a shape take the shape's palette colour, each shape's most
  colourful token has saliency 1 however pale its colour, and tokens far from every shape have 0."""
  tcfg = synthetic.SyntheticConfig()
  names = [name for name, _ in tcfg.palette]
  palette = np.asarray([rgb for _, rgb in tcfg.palette], np.float32) / 255.0
  checked = 0
  for i in range(6):
    task = scene_levels.make_scene("few", i, tcfg)
    pv, grid = image_lib.preprocess_image(synthetic.render_view(task.image, None, tcfg), tcfg.view_min_pixels,
                                          tcfg.view_max_pixels)
    saliency, colour = image_lib.token_colours(pv, grid[None], palette)
    cells = image_lib.token_cells(grid[None])
    th, tw = grid[1] // 2, grid[2] // 2
    assert saliency.shape == colour.shape == (th * tw,) and cells.shape == (th * tw, 2)
    assert np.all((saliency >= 0) & (saliency <= 1))
    centre = lambda box: ((box[1] + box[3]) / 2 * th, (box[0] + box[2]) / 2 * tw)   # in token units
    for obj in task.objects:
      y, x = centre(obj.box)
      at = int(np.flatnonzero((cells[:, 0] == int(y)) & (cells[:, 1] == int(x)))[0])
      if saliency[at] > 0.3:       # the token under the shape's centre holds enough of it to be named
        assert names[colour[at]] == obj.colour, (i, obj.colour, names[colour[at]])
        checked += 1
      same = colour == names.index(obj.colour)
      assert abs(saliency[same].max() - 1) < 1e-4
    # a token that no shape's box touches is canvas
    boxes = [o.box for o in task.objects]
    for t, (r, c) in enumerate(cells):
      if not any(b[0] < (c + 1) / tw and b[2] > c / tw and b[1] < (r + 1) / th and b[3] > r / th for b in boxes):
        assert saliency[t] == 0.0
  assert checked >= 10, checked


def test_token_cells_are_row_major_per_image():
  cells = image_lib.token_cells(np.array([[1, 4, 6], [1, 2, 2]]))
  assert cells.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [0, 0]]


def test_token_boxes_pick_the_box_that_covers_most_of_each_token():
  # a 4 x 4 token grid; box 0 covers the top-left 2 x 2 tokens (and a sliver more), box 1 most of token (3, 3)
  # and a sliver of (2, 3), where box 2 covers more
  boxes = np.array([[0.0, 0.0, 0.55, 0.55], [0.8, 0.7, 1.0, 1.0], [0.76, 0.5, 1.0, 0.72]])
  got = image_lib.token_boxes(boxes, (1, 8, 8)).reshape(4, 4)
  assert got.tolist() == [[0, 0, 0, -1], [0, 0, 0, -1], [0, 0, 0, 2], [-1, -1, -1, 1]]
  assert image_lib.token_boxes(np.zeros((0, 4)), (2, 4, 4)).tolist() == [-1] * 8


def test_token_centres_mark_the_token_holding_each_box_centre():
  # a 4 x 4 token grid: box 0's centre (0.3, 0.2) is in token (0, 1), box 1's (0.9, 0.85) in (3, 3); box 2's
  # centre lies on the image's right edge (x = 1.0), clipped into the last column, row 2
  boxes = np.array([[0.1, 0.1, 0.5, 0.3], [0.8, 0.7, 1.0, 1.0], [1.0, 0.5, 1.0, 0.7]])
  got = image_lib.token_centres(boxes, (1, 8, 8)).reshape(4, 4)
  want = np.full((4, 4), -1)
  want[0, 1], want[3, 3], want[2, 3] = 0, 1, 2
  assert got.tolist() == want.tolist()
  assert image_lib.token_centres(boxes, (2, 8, 8)).tolist() == got.ravel().tolist() * 2   # every frame alike
  assert image_lib.token_centres(np.zeros((0, 4)), (1, 4, 4)).tolist() == [-1] * 4


# ------------------------------------------------------------------------------------------ the math

def test_feature_targets_and_loss_match_numpy():
  rng = np.random.default_rng(0)
  b, t, d, k = 3, 5, 16, 4
  saliency = rng.uniform(0, 1, size=(b, t)).astype(np.float32)
  saliency[2, 3:] = -1.0                                              # padding tokens
  colour = rng.integers(0, k, size=(b, t)).astype(np.int32)
  cells = rng.integers(0, 4, size=(b, t, 2)).astype(np.int32)
  shape = rng.integers(-1, 3, size=(b, t)).astype(np.int32)                   # -1: no shape covers the token
  cfg = vt.FeatureTargetConfig(num_colours=k, num_shapes=3, position_scale=0.5, object_scale=0.4, colour_scale=0.3)
  got = np.asarray(vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells), d, cfg))
  u = np.asarray(vt.object_direction(d, cfg.object_seed))
  v = np.asarray(vt.unit_directions(k, d, cfg.colour_seed))
  np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-6)
  code = _sincos(cells.reshape(-1, 2).astype(np.float64), d, 4.0).reshape(b, t, d)
  want = np.maximum(saliency, 0)[..., None] * (0.5 * code / np.sqrt(d) + 0.4 * u + 0.3 * v[colour])
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.all(got[2, 3:] == 0)
  with_kind = dataclasses.replace(cfg, shape_scale=0.2)
  w = np.asarray(vt.unit_directions(3, d, cfg.shape_seed))
  kinds = np.where((shape >= 0)[..., None], w[np.maximum(shape, 0)], 0.0)
  np.testing.assert_allclose(np.asarray(vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells),
                                                           d, with_kind, jnp.asarray(shape))),
                             want + np.maximum(saliency, 0)[..., None] * 0.2 * kinds, atol=1e-6)
  with pytest.raises(ValueError, match="shape kind"):
    vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells), d, with_kind)
  # shape_by_saliency off: the kind's term whole on every real token that has a kind (none on padding)
  whole = dataclasses.replace(with_kind, shape_by_saliency=False)
  got_whole = vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells), d, whole,
                                jnp.asarray(shape))
  np.testing.assert_allclose(np.asarray(got_whole), want + (saliency >= 0)[..., None] * 0.2 * kinds, atol=1e-6)
  # the digit: digit_scale * its direction, whole, on real tokens that hold a digit's centre
  digit = rng.integers(-1, 10, size=(b, t)).astype(np.int32)
  with_digit = dataclasses.replace(cfg, digit_scale=0.7)
  z = np.asarray(vt.unit_directions(10, d, cfg.digit_seed))
  digits = np.where(((digit >= 0) & (saliency >= 0))[..., None], z[np.maximum(digit, 0)], 0.0)
  np.testing.assert_allclose(np.asarray(vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells),
                                                           d, with_digit, digit=jnp.asarray(digit))),
                             want + 0.7 * digits, atol=1e-6)
  with pytest.raises(ValueError, match="digit"):
    vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells), d, with_digit)
  # a small label: label_scale * (its direction + 2 dx and 2 dy times two more), on real tokens that hold one
  here = rng.random((b, t)) < 0.5
  label = np.concatenate([here[..., None], here[..., None] * rng.uniform(-0.5, 0.5, (b, t, 2))], -1).astype(np.float32)
  with_label = dataclasses.replace(cfg, label_scale=0.6)
  lab, lx, ly = np.asarray(vt.unit_directions(3, d, cfg.label_seed))
  labels = (here & (saliency >= 0))[..., None] * (lab + 2 * label[..., 1:2] * lx + 2 * label[..., 2:3] * ly)
  np.testing.assert_allclose(np.asarray(vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells),
                                                           d, with_label, label=jnp.asarray(label))),
                             want + 0.6 * labels, atol=1e-6)
  with pytest.raises(ValueError, match="label"):
    vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells), d, with_label)
  # a shape's centre: the same form, its own directions, beside the label's
  with_both = dataclasses.replace(with_label, centre_scale=0.3)
  c, cx, cy = np.asarray(vt.unit_directions(3, d, cfg.centre_seed))
  centre = label[::-1].copy()
  centres = (centre[..., 0] * (saliency >= 0))[..., None] * (c + 2 * centre[..., 1:2] * cx + 2 * centre[..., 2:3] * cy)
  np.testing.assert_allclose(np.asarray(vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells),
                                                           d, with_both, label=jnp.asarray(label),
                                                           centre=jnp.asarray(centre))),
                             want + 0.6 * labels + 0.3 * centres, atol=1e-6)
  with pytest.raises(ValueError, match="centre"):
    vt.feature_targets(jnp.asarray(saliency), jnp.asarray(colour), jnp.asarray(cells), d, with_both,
                       label=jnp.asarray(label))

  emb = rng.normal(size=(b, t, d)).astype(np.float32)
  real = saliency >= 0
  scale = np.mean(np.sum(want[real] ** 2, -1))
  expected = np.mean(np.sum((emb[real] - want[real]) ** 2, -1)) / scale
  loss = vt.feature_target_loss(jnp.asarray(emb), jnp.asarray(got), jnp.asarray(real))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(vt.feature_target_loss(jnp.asarray(got), jnp.asarray(got), jnp.asarray(real))) == 0.0


def test_train_only_vision_updates_the_tower_alone():
  params = {"visual": {"w": jnp.ones((3, 4))}, "model": {"w": jnp.ones((3, 4))}}
  cfg = opt_lib.OptimizerConfig(lr=0.1, train_only_vision=True, weight_decay=0.1)
  tx = opt_lib.make_optimizer(cfg, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.asarray(updates["model"]["w"]) == 0) and np.all(np.asarray(updates["visual"]["w"]) != 0)
  with pytest.raises(ValueError, match="train nothing"):
    opt_lib.make_optimizer(dataclasses.replace(cfg, freeze_vision=True), params)
  with pytest.raises(ValueError, match="train_only_vision"):
    opt_lib.make_optimizer(cfg, {"model": params["model"]})


def test_vision_step_learns_the_targets_and_leaves_the_decoder():
  """The jitted tower step on a micro model: the feature-target loss falls, only `visual` params move."""
  mcfg = W.micro_config()
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
  ocfg = opt_lib.OptimizerConfig(lr=3e-3, total_steps=40, train_only_vision=True)
  state, shardings, tx = state_lib.create_train_state(mcfg, lambda p: state_lib.make_tx(ocfg, p), mesh, seed=0)
  before = jax.tree.map(np.asarray, state.params)
  examples = batch_lib.random_examples(mcfg, 4, seq_len=40, images_per_row=1, grid=(1, 4, 4), seed=3)
  batch = batch_lib.collate_sft(examples, mcfg, batch_lib.BatchConfig(4, length_buckets=(48,), patch_buckets=(16,)))
  rng = np.random.default_rng(0)
  batch = dataclasses.replace(batch, image_saliency=(rng.uniform(size=(4, 4)) > 0.5).astype(np.float32),
                              image_colour=rng.integers(0, 3, size=(4, 4)).astype(np.int32),
                              image_cell=np.tile(image_lib.token_cells(np.array([[1, 4, 4]]))[None], (4, 1, 1)))
  step = vt.make_vision_step(vt.FeatureTargetConfig(num_colours=3), tx, mesh, shardings)
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch_lib.shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  after = jax.tree.leaves(jax.tree.map(np.asarray, state.params))
  moved = {opt_lib.path_names(path): not np.array_equal(x, y)
           for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(before), after)}
  assert any(m for names, m in moved.items() if names[0] == "visual")
  assert not any(m for names, m in moved.items() if names[0] != "visual"), [n for n, m in moved.items() if m]


# ------------------------------------------------------------------------------------------ model option

def test_position_sincos_is_a_fixed_position_table():
  """position_sincos = a adds a * the sin-cos code of each patch's (row, column) to the patch embeddings:
  the same model as a position table whose row / column rows hold the code's row / column halves."""
  base = config_lib.tiny(300, image_token_id=290, vision_start_token_id=291, vision_end_token_id=292,
                         video_token_id=293)
  d = base.vision.hidden_size
  coded = vlm.random_model(base.replace(vision=dataclasses.replace(base.vision, position_sincos=0.7)), seed=1)
  table = vlm.random_model(base.replace(vision=dataclasses.replace(base.vision, position_table=8)), seed=1)
  pos = np.arange(8, dtype=np.float64)[:, None]
  code = 0.7 * _sincos(np.concatenate([pos, pos], -1), d, 10.0)              # [8, d]: rows and cols alike
  half = 2 * (d // 4)
  table.visual.row_embed[...] = jnp.asarray(np.concatenate([code[:, :half], np.zeros((8, d - half))], -1), jnp.float32)
  table.visual.col_embed[...] = jnp.asarray(np.concatenate([np.zeros((8, half)), code[:, half:]], -1), jnp.float32)
  shared = nnx.to_pure_dict(nnx.state(table, nnx.Param))        # every other weight the same in both
  del shared["visual"]["row_embed"], shared["visual"]["col_embed"]
  params = nnx.state(coded, nnx.Param)
  nnx.replace_by_pure_dict(params, shared)
  nnx.update(coded, params)
  grids = np.array([[1, 4, 6], [1, 6, 4]])
  pv = np.random.default_rng(0).normal(size=(48, base.vision.patch_dim)).astype(np.float32)
  inputs = VisionInputs.build(grids, coded.config.vision)
  got = np.asarray(coded.encode_images(pv, inputs))
  np.testing.assert_allclose(got, np.asarray(table.encode_images(pv, inputs)), atol=1e-5)
  plain = vlm.random_model(base, seed=1)
  nnx.update(plain, params)
  assert not np.allclose(got, np.asarray(plain.encode_images(pv, inputs)), atol=1e-3)
  with pytest.raises(ValueError, match="position_sincos"):
    coded.config.to_hf_dict()


def test_sincos_position_table_gives_the_qwen3_tower_the_patch_code():
  """A Qwen3-VL table holding the sin-cos code of its 8 x 8 cells hands each patch of an 8 x 8 grid the
  code of its own (row, column) — the Qwen2.5-VL tower's `position_sincos` input — through the table's
  bilinear taps, and a 6 x 10 grid the code at its corners; the tower phase starts from it."""
  d = 64
  table = np.asarray(vision_lib.sincos_position_table(8, d))                              # [64, d]
  def added_code(grid):
    index, weight = rope.position_table_taps(np.array([grid]), 8, 2)
    pos = rope.vision_patch_positions(np.array([grid]), 2).astype(np.float64)            # [patches, 2]
    return np.einsum("pk,pkd->pd", weight, table[index]), pos                            # [patches, d]

  added, pos = added_code([1, 8, 8])
  np.testing.assert_allclose(added, _sincos(pos, d, 10.0), atol=1e-5)
  added, pos = added_code([1, 6, 10])
  corners = [np.flatnonzero((pos == c).all(-1))[0] for c in ([0, 0], [5, 9], [0, 9])]
  np.testing.assert_allclose(added[corners], _sincos(np.array([[0, 0], [7, 7], [0, 7]], np.float64), d, 10.0),
                             atol=1e-5)
  config = common.resolve(demo.get_config())
  config.model.family = "qwen3_vl"
  ids = run_config.special_ids("small")
  mcfg = run_config.model_config_for_vocabulary(config, 1024, ids)
  params = pretrain_stage.sincos_table_params(mcfg, seed=0, scale=0.5)
  np.testing.assert_allclose(params["visual"]["pos_embed"], 0.5 * _sincos(
      np.stack(np.divmod(np.arange(64), 8), -1).astype(np.float64), mcfg.vision.hidden_size, 10.0), atol=1e-6)
  tiny_config = common.resolve(pretrain_tiny.get_config())
  tiny_config.model.family = "qwen2_5_vl"
  with pytest.raises(ValueError, match="qwen3_vl"):  # the Qwen2.5-VL tower has no table to start
    run_config.pretrain_vision_stage(tiny_config, run_config.model_config_for_vocabulary(tiny_config, 1024, ids))


# ------------------------------------------------------------------------------------------ the rows

def test_cell_window_holds_every_small_box_whose_centre_is_in_its_cell():
  assert coldstart.cell_window(5) == (0.25, 0.25, 0.75, 0.75)
  assert coldstart.cell_window(1) == (0.0, 0.0, 0.5, 0.5)          # shifted inside the image, not cut
  assert coldstart.cell_window(6) == (0.5, 0.25, 1.0, 0.75)
  rng = np.random.default_rng(0)
  for _ in range(2000):
    side = rng.uniform(0.01, 1 / 6, size=2)                        # up to 1/6 wide: the window's margin is 1/12
    lo = rng.uniform(0, 1 - side)
    box = [lo[0], lo[1], lo[0] + side[0], lo[1] + side[1]]
    w = coldstart.cell_window(coldstart.grid_cell(box))
    assert w[0] <= box[0] + 1e-9 and w[1] <= box[1] + 1e-9 and box[2] <= w[2] + 1e-9 and box[3] <= w[3] + 1e-9
    assert np.isclose(w[2] - w[0], 0.5) and np.isclose(w[3] - w[1], 0.5)
  # the answer's call carries the window, as the agent's parser reads it
  answer = grounding.locate_answer([0.7, 0.1, 0.8, 0.2], 2, cell_first=True, window=True)
  assert answer.startswith("3 ")
  assert tools.parse_action(answer).bbox == pytest.approx(list(coldstart.cell_window(3)))
  with pytest.raises(ValueError, match="cell_window needs cell_first"):
    grounding.GroundingConfig(cell_window=True)


def test_cell_first_answers_and_cell_only_loss(tokenizer):
  tcfg = synthetic.SyntheticConfig()
  assert [coldstart.grid_cell(b) for b in ([0, 0, 0.1, 0.1], [0.4, 0.4, 0.6, 0.6], [0.9, 0.1, 1.0, 0.3],
                                           [0.0, 0.7, 0.2, 1.0])] == [1, 5, 3, 7]
  cfg = grounding.GroundingConfig(locate=2, name=1, read=0, cell_first=True, cell_only_steps=3, target_first=False)
  firsts = set()
  for i in range(12):
    task = scene_levels.make_scene("few", i, tcfg)
    rng = np.random.default_rng(i)
    questions = grounding.scene_questions(task, cfg, np.random.default_rng(i))
    for kind, _, answer, j in questions:
      if kind == "locate":
        cell, call = answer.split(" ", 1)
        assert int(cell) == coldstart.grid_cell(task.objects[j].box)
        assert grounding_probe.iou(tools.parse_action(call).bbox, task.objects[j].box) > 0.8
        assert tools.parse_action(answer).bbox == tools.parse_action(call).bbox   # the agent's parser reads past it
    located = [j for kind, _, _, j in questions if kind == "locate"]
    firsts.add(task.objects[located[0]].is_target if located else None)
    ex = grounding.scene_example(task, tokenizer, cfg, tcfg, rng, cell_only=True)
    full = grounding.scene_example(task, tokenizer, cfg, tcfg, np.random.default_rng(i))
    np.testing.assert_array_equal(ex["input_ids"], full["input_ids"])
    locate = ex["kinds"] == grounding.KINDS.index("locate")
    starts = locate & ~np.concatenate([[False], locate[:-1]])
    np.testing.assert_array_equal(ex["loss_mask"][locate], starts[locate])           # one token per answer
    np.testing.assert_array_equal(ex["loss_mask"][~locate], full["loss_mask"][~locate])
    pieces = [tokenizer.decode([int(x)]) for x in ex["input_ids"]]
    roles = grounding_probe.token_roles(pieces, ex["kinds"])
    assert [t for t, r in enumerate(roles) if r == "cell"] == list(np.flatnonzero(starts))
    assert all(pieces[t].strip().isdigit() for t in np.flatnonzero(starts))
  assert firsts >= {True, False}       # target_first=False: the target is not always asked first
  with pytest.raises(ValueError, match="cell_only_steps needs cell_first"):
    grounding.GroundingConfig(cell_only_steps=5)
  # A stream keeps the cell alone in the loss for its first cell_only_steps steps, the whole answer after.
  stream = grounding.SceneStream(scene_levels.Curriculum.parse("0:few=1"), cfg, tcfg, tokenizer, rows=2, seed=0)
  locate_loss = lambda rows: [int(r["loss_mask"][r["kinds"] == grounding.KINDS.index("locate")].sum()) for r in rows]
  answers = lambda rows: [int(((r["kinds"] == grounding.KINDS.index("locate"))
                               & ~np.concatenate([[False], r["kinds"][:-1] == grounding.KINDS.index("locate")])).sum())
                          for r in rows]
  early, late = stream.rows_for(2), stream.rows_for(3)
  assert locate_loss(early) == answers(early) and all(a > 0 for a in answers(early))
  assert all(n > a for n, a in zip(locate_loss(late), answers(late)))


def test_feature_target_batch_from_rows(tokenizer):
  """`with_feature_targets` fills each row's real tokens from its pixels and pads with saliency -1."""
  config = common.resolve(demo.get_config())
  mcfg = run_config.model_config(config, tokenizer)
  tcfg = run_config.task_config(config)
  gcfg = grounding.GroundingConfig(locate=1, name=0, read=0)
  rows = [grounding.scene_example(scene_levels.make_scene("few", i, tcfg), tokenizer, gcfg, tcfg,
                                  np.random.default_rng(i)) for i in range(3)]
  patches = int(np.prod(rows[0]["image_grid_thw"], -1).sum())
  bcfg = batch_lib.BatchConfig(batch_size=4, length_buckets=(128,), patch_buckets=(patches + 4,),
                               pad_token_id=mcfg.text.pad_token_id)
  palette = tuple(tuple(v / 255.0 for v in rgb) for _, rgb in tcfg.palette)
  stage = run_config.PretrainVisionStage(loop=None, optimizer=None, batch=bcfg, curriculum=None,
                                         targets=vt.FeatureTargetConfig(num_colours=len(palette)), palette=palette)
  batch = pretrain_stage.with_feature_targets(batch_lib.collate_sft(rows, mcfg, bcfg), rows, mcfg, stage)
  tokens = patches // 4
  assert batch.image_saliency.shape == batch.image_colour.shape == (4, tokens + 1)
  assert batch.image_cell.shape == (4, tokens + 1, 2)
  assert np.all(batch.image_saliency[:3, tokens:] == -1) and np.all(batch.image_saliency[3] == -1)
  for r, row in enumerate(rows):
    s, k = image_lib.token_colours(row["pixel_values"], row["image_grid_thw"], np.asarray(palette))
    np.testing.assert_array_equal(batch.image_saliency[r, :tokens], s)
    np.testing.assert_array_equal(batch.image_colour[r, :tokens], k)
    np.testing.assert_array_equal(batch.image_cell[r, :tokens], image_lib.token_cells(row["image_grid_thw"]))
    # the kind of the shape that covers most of each token, from the scene's own objects
    task = scene_levels.make_scene("few", r, tcfg)
    for t, (y, x) in enumerate(image_lib.token_cells(row["image_grid_thw"])):
      th, tw = row["image_grid_thw"][0][1] // 2, row["image_grid_thw"][0][2] // 2
      centre_in = [o for o in task.objects if o.box[0] <= (x + 0.5) / tw <= o.box[2] and o.box[1] <= (y + 0.5) / th <= o.box[3]]
      if len(centre_in) == 1:        # a token whose centre one shape's box holds is that shape's
        assert batch.image_shape[r, t] == tcfg.shapes.index(centre_in[0].shape)
    assert np.all(batch.image_shape[r, tokens:] == -1)
  # shape_tokens="centre": the kind only on the token holding each shape's centre
  centre = pretrain_stage.with_feature_targets(batch_lib.collate_sft(rows, mcfg, bcfg), rows, mcfg,
                                               dataclasses.replace(stage, shape_tokens="centre"))
  for r, row in enumerate(rows):
    task = scene_levels.make_scene("few", r, tcfg)
    th, tw = row["image_grid_thw"][0][1] // 2, row["image_grid_thw"][0][2] // 2
    want = np.full(tokens, -1)
    for o in task.objects:
      want[int(th * (o.box[1] + o.box[3]) / 2) * tw + int(tw * (o.box[0] + o.box[2]) / 2)] = tcfg.shapes.index(o.shape)
    np.testing.assert_array_equal(centre.image_shape[r, :tokens], want)
  with pytest.raises(ValueError, match="shape_tokens"):
    dataclasses.replace(stage, shape_tokens="middle")


@pytest.mark.parametrize("jitter", [0.0, 0.12])
def test_a_read_crop_gets_its_digit_where_the_glyph_is(tokenizer, jitter):
  """With a read question, the crop's token holding the digit's centre carries the digit (one token a row,
  none in the scene), and its glyph box is where the glyph lands in the rendered crop (the generator's legible
  crop, or with `read_jitter` one that strays from it)."""
  config = common.resolve(demo.get_config())
  mcfg = run_config.model_config(config, tokenizer)
  tcfg = run_config.task_config(config)
  gcfg = grounding.GroundingConfig(locate=1, name=0, read=1, read_jitter=jitter)
  tasks = [scene_levels.make_scene(level, i, tcfg) for i, level in enumerate(("few", "medium", "hard", "easy"))]
  rows = [grounding.scene_example(t, tokenizer, gcfg, tcfg, np.random.default_rng(i)) for i, t in enumerate(tasks)]
  bcfg = batch_lib.BatchConfig(batch_size=4, length_buckets=(128,), patch_buckets=(128,),
                               pad_token_id=mcfg.text.pad_token_id)
  palette = tuple(tuple(v / 255.0 for v in rgb) for _, rgb in tcfg.palette)
  stage = run_config.PretrainVisionStage(loop=None, optimizer=None, batch=bcfg, curriculum=None,
                                         targets=vt.FeatureTargetConfig(num_colours=len(palette)), palette=palette)
  batch = pretrain_stage.with_feature_targets(batch_lib.collate_sft(rows, mcfg, bcfg), rows, mcfg, stage)
  for r, (task, row) in enumerate(zip(tasks, rows)):
    scene_tokens = int(np.prod(row["image_grid_thw"][0])) // 4
    (i,) = [i for kind, _, _, i in grounding.scene_questions(task, gcfg, np.random.default_rng(r)) if kind == "read"]
    assert row["read_digits"].tolist() == [int(task.objects[i].digit)]
    held = np.flatnonzero(batch.image_digit[r] >= 0)
    assert len(held) == 1 and held[0] >= scene_tokens and batch.image_digit[r, held[0]] == int(task.objects[i].digit)
    # paint the glyph's box magenta in the full image and render the crop: the paint lands on the glyph box
    painted = task.image.copy()
    w, h = painted.size
    gx0, gy0, gx1, gy1 = np.asarray(task.objects[i].detail_box) * [w, h, w, h]
    PIL.ImageDraw.Draw(painted).rectangle((gx0, gy0, gx1 - 1, gy1 - 1), fill=(255, 0, 255))
    crop = grounding.read_crop(task, i, jitter)
    assert (crop == task.objects[i].zoom_path[-1]) == (not jitter)
    view = np.asarray(grounding.synthetic.render_view(painted, crop, tcfg), np.float32)
    ys, xs = np.nonzero((view[..., 0] > 200) & (view[..., 1] < 80) & (view[..., 2] > 200))
    x0, y0, x1, y1 = row["read_glyphs"][0] * np.array([view.shape[1], view.shape[0]] * 2)
    # (the resize blurs the paint by a pixel or two, unevenly where it meets other colours; a token is 28)
    np.testing.assert_allclose([xs.mean() + 0.5, ys.mean() + 0.5], [(x0 + x1) / 2, (y0 + y1) / 2], atol=2.0)
    assert x0 - 3 <= xs.min() and xs.max() < x1 + 3 and y0 - 3 <= ys.min() and ys.max() < y1 + 3
    th, tw = row["image_grid_thw"][1][1] // 2, row["image_grid_thw"][1][2] // 2
    assert held[0] - scene_tokens == int(th * (y0 + y1) / 2 / view.shape[0]) * tw + int(tw * (x0 + x1) / 2 / view.shape[1])
  # a zoom row (the window, then the legible zoom): the digit on the zoom's image, the third, where its glyph is
  zoom_cfg = grounding.GroundingConfig(locate=1, name=0, read=1, zoom=1, cell_first=True, cell_window=True,
                                       prompt_form="agent")
  task = scene_levels.make_scene("medium", 3, tcfg)
  row = grounding.scene_example(task, tokenizer, zoom_cfg, tcfg, np.random.default_rng(0))
  bcfg = dataclasses.replace(bcfg, length_buckets=(256,), patch_buckets=(256,), batch_size=1)
  batch = pretrain_stage.with_feature_targets(batch_lib.collate_sft([row], mcfg, bcfg), [row], mcfg, stage)
  tokens = [int(np.prod(g)) // 4 for g in row["image_grid_thw"]]
  (held,) = np.flatnonzero(batch.image_digit[0] >= 0)
  (i,) = {i for _, _, _, i in grounding.scene_questions(task, zoom_cfg, np.random.default_rng(0))}
  assert batch.image_digit[0, held] == int(task.objects[i].digit) and row["read_images"].tolist() == [2]
  th, tw = row["image_grid_thw"][2][1] // 2, row["image_grid_thw"][2][2] // 2
  x0, y0, x1, y1 = row["read_glyphs"][0]
  assert held - tokens[0] - tokens[1] == int(th * (y0 + y1) / 2) * tw + int(tw * (x0 + x1) / 2)


def test_core_digit_tokens_are_those_the_glyphs_middle_touches(tokenizer):
  """digit_tokens="core": every crop token the central half of the glyph's box touches carries the digit (a glyph
  off the crop's centre straddles tokens), the token holding its centre among them, none in the scene."""
  config = common.resolve(demo.get_config())
  mcfg = run_config.model_config(config, tokenizer)
  tcfg = run_config.task_config(config)
  gcfg = grounding.GroundingConfig(locate=1, name=0, read=1, read_jitter=0.12)
  rows = [grounding.scene_example(scene_levels.make_scene("medium", i, tcfg), tokenizer, gcfg, tcfg,
                                  np.random.default_rng(i)) for i in range(8)]
  bcfg = batch_lib.BatchConfig(batch_size=8, length_buckets=(128,), patch_buckets=(128,),
                               pad_token_id=mcfg.text.pad_token_id)
  palette = tuple(tuple(v / 255.0 for v in rgb) for _, rgb in tcfg.palette)
  stage = run_config.PretrainVisionStage(loop=None, optimizer=None, batch=bcfg, curriculum=None,
                                         targets=vt.FeatureTargetConfig(num_colours=len(palette)), palette=palette,
                                         digit_tokens="core")
  batch = pretrain_stage.with_feature_targets(batch_lib.collate_sft(rows, mcfg, bcfg), rows, mcfg, stage)
  straddled = 0
  for r, row in enumerate(rows):
    scene_tokens = int(np.prod(row["image_grid_thw"][0])) // 4
    th, tw = row["image_grid_thw"][1][1] // 2, row["image_grid_thw"][1][2] // 2
    x0, y0, x1, y1 = row["read_glyphs"][0]
    dx, dy = (x1 - x0) / 4, (y1 - y0) / 4
    cols = range(int(tw * (x0 + dx)), min(tw - 1, int(np.ceil(tw * (x1 - dx)) - 1)) + 1)
    rows_ = range(int(th * (y0 + dy)), min(th - 1, int(np.ceil(th * (y1 - dy)) - 1)) + 1)
    want = sorted(scene_tokens + a * tw + b for a in rows_ for b in cols)
    held = np.flatnonzero(batch.image_digit[r] >= 0).tolist()
    assert held == want and set(batch.image_digit[r, held]) == {int(row["read_digits"][0])}
    assert scene_tokens + int(th * (y0 + y1) / 2) * tw + int(tw * (x0 + x1) / 2) in held
    straddled += len(held) > 1
  assert straddled  # some glyph's middle straddles a token boundary
  with pytest.raises(ValueError, match="digit_tokens"):
    dataclasses.replace(stage, digit_tokens="all")


def _search_row_setup(tokenizer, **stage_options):
  """(model config, world config, batch config, a tower stage with `stage_options`) for one search row a batch."""
  config = common.resolve(demo.get_config())
  mcfg = run_config.model_config(config, tokenizer)
  tcfg = run_config.task_config(config)
  palette = tuple(tuple(v / 255.0 for v in rgb) for _, rgb in tcfg.palette)
  bcfg = batch_lib.BatchConfig(batch_size=1, length_buckets=(256,), patch_buckets=(320,),
                               pad_token_id=mcfg.text.pad_token_id)
  targets = vt.FeatureTargetConfig(num_colours=len(palette), **stage_options.pop("targets", {}))
  stage = run_config.PretrainVisionStage(loop=None, optimizer=None, batch=bcfg, curriculum=None, targets=targets,
                                         palette=palette, **stage_options)
  return mcfg, tcfg, bcfg, stage


def _painted(task, point, region, tcfg):
  """Where `point` (relative to the scene) lands in the rendered view of `region`, found by painting ~2 view px
  there: (x, y) in view fractions, one view pixel (width, height) in view fractions, and whether it lies 2 px
  inside the view's edges (nearer, a pixel's rounding decides whether it is in); None where the view misses it."""
  w, h = task.image.size
  painted = task.image.copy()
  cx, cy = point[0] * w, point[1] * h
  r = max(1, round(2 * (region[2] - region[0]) * w / 112))  # ~2 view px, whatever the crop's scale
  PIL.ImageDraw.Draw(painted).rectangle((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=(255, 0, 255))
  view = np.asarray(synthetic.render_view(painted, tuple(region), tcfg), np.float32)
  ys, xs = np.nonzero((view[..., 0] > 180) & (view[..., 1] < 100) & (view[..., 2] > 180))
  if not len(xs):
    return None
  vh, vw = view.shape[:2]
  inside = 2 < xs.mean() < vw - 3 and 2 < ys.mean() < vh - 3
  return (xs.mean() + 0.5) / vw, (ys.mean() + 0.5) / vh, (1 / vw, 1 / vh), inside


def test_shapes_on_crops_get_their_kind_where_the_crop_shows_their_centre(tokenizer):
  """shape_on_crops: a search row's window and zoom carry the kind of every shape whose centre they show, on the
  token where that centre lands in the rendered crop (found by painting it), and with centre_scale that token also
  carries where in it the centre lies; without shape_on_crops only the scene does. The row's crop regions are the
  search's own."""
  mcfg, tcfg, bcfg, stage = _search_row_setup(tokenizer, targets=dict(centre_scale=1.0), shape_tokens="centre",
                                              shape_on_crops=True)
  checked = 0
  for i, (level, zooms) in enumerate((("medium", 1), ("hard", 1), ("few", 1), ("medium", 2), ("hard", 2))):
    task = scene_levels.make_scene(level, i, tcfg)
    questions = pretrain_stage.search_rows(zooms)
    row = grounding.scene_example(task, tokenizer, questions, tcfg, np.random.default_rng(i))
    grids = row["image_grid_thw"]
    if len(grids) < 2 + zooms:
      continue
    (obj,) = {i for _, _, _, i in grounding.scene_questions(task, questions, np.random.default_rng(i))}
    search = coldstart.reflex_search(task, task.objects[obj], questions.decimals, via_object=zooms == 2)
    w, h = task.image.size
    cropped = [np.divide(synthetic.pixel_box(r, (w, h)), (w, h, w, h)) for r in search.regions]
    np.testing.assert_allclose(row["crop_regions"], cropped, atol=1e-6)
    np.testing.assert_allclose(row["crop_regions"], search.regions, atol=2 / w)
    batch = pretrain_stage.with_feature_targets(batch_lib.collate_sft([row], mcfg, bcfg), [row], mcfg, stage)
    plain = pretrain_stage.with_feature_targets(batch_lib.collate_sft([row], mcfg, bcfg), [row], mcfg,
                                                dataclasses.replace(stage, shape_on_crops=False))
    starts = np.cumsum([0] + [int(np.prod(g)) // 4 for g in grids])
    np.testing.assert_array_equal(batch.image_shape[0, :starts[1]], plain.image_shape[0, :starts[1]])
    assert np.all(plain.image_shape[0, starts[1]:] == -1)
    for j, region in enumerate(search.regions, start=1):
      th, tw = grids[j][1] // 2, grids[j][2] // 2
      want, sure, offset = np.full(th * tw, -1), np.ones(th * tw, bool), np.zeros((th * tw, 2))
      for o in task.objects:
        seen = _painted(task, ((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2), region, tcfg)
        if seen is None or not seen[3]:
          continue  # its centre is not in the crop (or on its very edge, where a pixel's rounding decides)
        # the centre in tokens (the processor may resize the view: a token is 1 / tw of its width)
        x, y = seen[0] * tw, seen[1] * th
        dx, dy = seen[2][0] * tw, seen[2][1] * th    # a view pixel
        near = {int(min(th - 1, max(0, y + a * dy))) * tw + int(min(tw - 1, max(0, x + b * dx)))
                for a in (-1, 1) for b in (-1, 1)}
        if len(near) > 1:  # on a token boundary: a pixel's rounding decides which token holds the centre
          sure[list(near)] = False
          assert tcfg.shapes.index(o.shape) in batch.image_shape[0, starts[j] + np.asarray(sorted(near))]
          continue
        token = near.pop()
        want[token], offset[token] = tcfg.shapes.index(o.shape), (x - int(x) - 0.5, y - int(y) - 0.5)
      np.testing.assert_array_equal(batch.image_shape[0, starts[j]:starts[j + 1]][sure], want[sure])
      centre = batch.image_centre[0, starts[j]:starts[j + 1]]
      np.testing.assert_array_equal(centre[sure, 0], (want[sure] >= 0).astype(np.float32))
      np.testing.assert_allclose(centre[sure, 1:], offset[sure], atol=1.5 * tw / 112)
      checked += int(np.sum(want >= 0))
  assert checked >= 5


def test_small_labels_sit_where_the_window_and_the_object_show_them(tokenizer):
  """label_scale: on a search row through the shape (the scene, the window, the shape's zoom, the legible crop), the
  window's and the object's views carry (1, dx, dy) on the token where each label's centre lands when painted and
  rendered, (dx, dy) its offset in the token to a view pixel or so; the scene and the read crop carry none."""
  mcfg, tcfg, bcfg, stage = _search_row_setup(tokenizer, targets=dict(label_scale=1.0))
  questions = pretrain_stage.search_rows(2)
  checked = 0
  for i, level in enumerate(("medium", "hard", "medium")):
    task = scene_levels.make_scene(level, i, tcfg)
    row = grounding.scene_example(task, tokenizer, questions, tcfg, np.random.default_rng(i))
    grids = row["image_grid_thw"]
    batch = pretrain_stage.with_feature_targets(batch_lib.collate_sft([row], mcfg, bcfg), [row], mcfg, stage)
    starts = np.cumsum([0] + [int(np.prod(g)) // 4 for g in grids])
    label = batch.image_label[0]
    assert len(grids) == 4 and not label[:starts[1]].any() and not label[starts[3]:].any()
    for j in (1, 2):
      region = row["crop_regions"][j - 1]
      th, tw = grids[j][1] // 2, grids[j][2] // 2
      want, sure = np.zeros((th * tw, 3), np.float32), np.ones(th * tw, bool)
      for o in task.objects:
        seen = _painted(task, ((o.detail_box[0] + o.detail_box[2]) / 2, (o.detail_box[1] + o.detail_box[3]) / 2),
                        region, tcfg)
        if seen is None:
          continue
        x, y = seen[0] * tw, seen[1] * th
        token = min(th - 1, int(y)) * tw + min(tw - 1, int(x))
        if not seen[3]:
          sure[token] = False  # on the crop's very edge: a pixel's rounding decides whether it is in
          continue
        want[token] = (1.0, x - int(x) - 0.5, y - int(y) - 0.5)
      got = label[starts[j]:starts[j + 1]]
      np.testing.assert_array_equal(got[sure, 0], want[sure, 0])
      np.testing.assert_allclose(got[sure, 1:], want[sure, 1:], atol=1.5 * tw / 112)
      checked += int(want[:, 0].sum())
  assert checked >= 6


def test_a_qwen3_model_gets_its_own_pixels_and_the_same_targets(tokenizer):
  """Rows and probe prompts for a Qwen3-VL model are normalised as its image processor does (mean / std 0.5,
  not CLIP's), and the feature targets read from them are the Qwen2.5-VL model's for the same scenes: each
  family's pixels are decoded with its own normalisation."""
  config = common.resolve(demo.get_config())
  q25 = run_config.model_config(config, tokenizer)
  config.model.family = "qwen3_vl"
  q3 = run_config.model_config(config, tokenizer)
  tcfg = run_config.task_config(config)
  gcfg = grounding.GroundingConfig(locate=1, name=0, read=0)
  scenes = [scene_levels.make_scene("few", i, tcfg) for i in range(2)]
  rows = {m.model_type: [grounding.scene_example(t, tokenizer, gcfg, tcfg, np.random.default_rng(i),
                                                 image=image_lib.settings_for(m)) for i, t in enumerate(scenes)]
          for m in (q25, q3)}
  view = synthetic.render_view(scenes[0].image, None, tcfg)
  want, _ = image_lib.preprocess_image(view, tcfg.view_min_pixels, tcfg.view_max_pixels, **image_lib.settings_for(q3))
  np.testing.assert_allclose(rows["qwen3_vl"][0]["pixel_values"], want)
  assert not np.allclose(rows["qwen2_5_vl"][0]["pixel_values"], want, atol=1e-2)
  stream = grounding.SceneStream(scene_levels.Curriculum.parse("0:few=1"), gcfg, tcfg, tokenizer, rows=1, seed=0,
                                 image=image_lib.settings_for(q3))
  first = stream.rows_for(0)[0]
  np.testing.assert_allclose(first["pixel_values"], grounding.scene_example(
      scene_levels.make_scene("few", 0, tcfg), tokenizer, gcfg, tcfg, np.random.default_rng(0),
      image=image_lib.settings_for(q3))["pixel_values"])
  probe = grounding_probe.GroundingProbe(grounding_probe.ProbeConfig(levels=("few",), scenes=1), gcfg, tcfg,
                                         tokenizer, q3)
  np.testing.assert_allclose(probe._prompt([view], "where?")[1], want)
  palette = tuple(tuple(v / 255.0 for v in rgb) for _, rgb in tcfg.palette)
  patches = int(np.prod(rows["qwen3_vl"][0]["image_grid_thw"], -1).sum())
  bcfg = batch_lib.BatchConfig(batch_size=2, length_buckets=(128,), patch_buckets=(patches,), pad_token_id=0)
  stage = run_config.PretrainVisionStage(loop=None, optimizer=None, batch=bcfg, curriculum=None,
                                         targets=vt.FeatureTargetConfig(num_colours=len(palette)), palette=palette)
  targets = {m.model_type: pretrain_stage.with_feature_targets(
      batch_lib.collate_sft(rows[m.model_type], m, bcfg), rows[m.model_type], m, stage) for m in (q25, q3)}
  a, b = targets["qwen2_5_vl"], targets["qwen3_vl"]
  np.testing.assert_allclose(b.image_saliency, a.image_saliency, atol=1e-4)
  np.testing.assert_array_equal(b.image_colour[a.image_saliency > 0], a.image_colour[a.image_saliency > 0])
  assert (a.image_saliency > 0).any() and (a.image_saliency == 0).any()


def test_tower_rows_ask_what_the_stage_names(tokenizer):
  """A tower row's questions: one locate (no digit target), a read crop too with the digit target, or the base's
  whole direct search (`search_rows`): the scene, the window and the legible zoom inside it."""
  tcfg = synthetic.SyntheticConfig()
  stage = run_config.PretrainVisionStage(loop=None, optimizer=None, batch=None, curriculum=None,
                                         targets=vt.FeatureTargetConfig(num_colours=8), palette=(), read_jitter=0.1)
  assert pretrain_stage.tower_questions(stage) == grounding.GroundingConfig(locate=1, name=0, read=0, read_jitter=0.1)
  digits = dataclasses.replace(stage, targets=vt.FeatureTargetConfig(num_colours=8, digit_scale=3.0))
  assert pretrain_stage.tower_questions(digits) == grounding.GroundingConfig(locate=1, name=0, read=1, read_jitter=0.1)
  search = pretrain_stage.tower_questions(dataclasses.replace(digits, search_rows=1))
  task = scene_levels.make_scene("medium", 1, tcfg)
  row = grounding.scene_example(task, tokenizer, search, tcfg, np.random.default_rng(0))
  (i,) = {i for _, _, _, i in grounding.scene_questions(task, search, np.random.default_rng(0))}
  regions = coldstart.reflex_search(task, task.objects[i], search.decimals).regions
  assert len(row["image_grid_thw"]) == 3
  np.testing.assert_allclose(row["crop_regions"], regions, atol=2 / task.image.size[0])
  assert row["read_images"].tolist() == [2] and row["read_digits"].tolist() == [int(task.objects[i].digit)]
  through = pretrain_stage.tower_questions(dataclasses.replace(digits, search_rows=2))  # through the shape's zoom
  row = grounding.scene_example(task, tokenizer, through, tcfg, np.random.default_rng(0))
  (i,) = {i for _, _, _, i in grounding.scene_questions(task, through, np.random.default_rng(0))}
  regions = coldstart.reflex_search(task, task.objects[i], through.decimals, via_object=True).regions
  assert len(row["image_grid_thw"]) == 4 and len(regions) == 3
  np.testing.assert_allclose(row["crop_regions"], regions, atol=2 / task.image.size[0])
  assert row["read_images"].tolist() == [3] and row["read_digits"].tolist() == [int(task.objects[i].digit)]


def test_the_tower_phase_draws_scenes_of_its_own(tokenizer):
  """The `pretrain_vision` stage's scenes (`VISION_SPLIT`) are never the decoder phase's (same seed, same steps)."""
  cur, cfg, tcfg = scene_levels.Curriculum.parse("0:few=1"), grounding.GroundingConfig(locate=1, name=0, read=0), \
      synthetic.SyntheticConfig()
  decoder = grounding.SceneStream(cur, cfg, tcfg, tokenizer, rows=3, seed=0)
  tower = grounding.SceneStream(cur, cfg, tcfg, tokenizer, rows=3, seed=0, split=scene_levels.VISION_SPLIT)
  for step in (0, 7):
    a, b = decoder.rows_for(step), tower.rows_for(step)
    assert not {r["id"] for r in a} & {r["id"] for r in b}
    assert not any(np.array_equal(x["pixel_values"], y["pixel_values"]) for x in a for y in b)
