"""The pretrain stage's objectness auxiliary loss (issue 13): host saliency, loss math, weight 0 = plain SFT."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import train_worker as W  # noqa: E402

from mini_o3_jax.processing import image as image_lib  # noqa: E402
from mini_o3_jax.train import batch as batch_lib  # noqa: E402
from mini_o3_jax.train import losses  # noqa: E402
from mini_o3_jax.train import sft  # noqa: E402
from mini_o3_jax.train import state as state_lib  # noqa: E402


def _scene(h, w, box, colour, seed):
  """uint8 [h, w, 3]: a grey, slightly noisy canvas with one coloured rectangle."""
  rng = np.random.default_rng(seed)
  rgb = np.clip(100 + rng.integers(-6, 7, size=(h, w, 3)), 0, 255).astype(np.uint8)
  r0, c0, r1, c1 = box
  rgb[r0:r1, c0:c1] = colour
  return rgb


def _expected_saliency(rgb, power):
  """Numpy re-computation on the image grid: chroma per pixel, mean per 28x28 merged-token block
  (row-major blocks), / the image's largest block mean, ** power."""
  chroma = rgb.astype(np.float64).max(-1) - rgb.astype(np.float64).min(-1)   # [h, w], 0..255
  h, w = chroma.shape
  blocks = chroma.reshape(h // 28, 28, w // 28, 28).mean((1, 3)).ravel() / 255.0
  return (blocks / (blocks.max() + 1e-6)) ** power


def test_token_saliency_matches_the_image_grid_per_image():
  mean, std = image_lib.OPENAI_CLIP_MEAN, image_lib.OPENAI_CLIP_STD
  images = [_scene(84, 112, (30, 60, 60, 100), (215, 35, 35), 0), _scene(56, 84, (0, 0, 20, 30), (35, 70, 215), 1)]
  pixels, grids = [], []
  for rgb in images:
    pixels.append(image_lib.patchify(image_lib.normalize(rgb, mean, std)))
    grids.append([1, rgb.shape[0] // 14, rgb.shape[1] // 14])
  got = image_lib.token_saliency(np.concatenate(pixels), np.asarray(grids), power=4.0)
  want = np.concatenate([_expected_saliency(rgb, 4.0) for rgb in images])
  assert got.shape == (12 + 6,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert abs(got[:12].max() - 1) < 1e-4 and abs(got[12:].max() - 1) < 1e-4  # each image's own max


def test_objectness_sums_match_numpy():
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(3, 5, 8)).astype(np.float32)                  # [batch, tokens, hidden]
  saliency = rng.uniform(0, 1, size=(3, 5)).astype(np.float32)
  saliency[2, 3:] = -1.0                                                # padding tokens
  u = np.asarray(sft.objectness_direction(8, 7))
  np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(u, np.asarray(sft.objectness_direction(8, 7)))   # a pure function of the seed
  total, count = sft.objectness_sums(emb, saliency, u, 0.5)
  cos = emb @ u / (np.linalg.norm(emb, axis=-1) + 1e-6)
  real = saliency >= 0
  np.testing.assert_allclose(float(total), np.sum((cos[real] - 0.5 * saliency[real]) ** 2), rtol=1e-5)
  assert float(count) == real.sum() == 13


_loss = jax.jit(lambda config, graphdef, params, batch: sft.sft_loss_and_grads(config, graphdef, params, batch)[:2],
                static_argnums=(0, 1))


def _micro_batch():
  """(config, params, graphdef, batch without saliency, the same batch with saliency [8, 5])."""
  cfg = W.micro_config()
  params = W.host_params(cfg)
  graphdef, _ = state_lib.abstract_model(cfg)
  examples = batch_lib.random_examples(cfg, 7, seq_len=40, images_per_row=1, grid=(1, 4, 4), seed=3)
  # 7 rows in a batch of 8 (a padding row), 16 patches padded to 20: 4 real tokens + 1 padding token a row
  batch = batch_lib.collate_sft(examples, cfg, batch_lib.BatchConfig(8, length_buckets=(48,), patch_buckets=(20,)))
  saliency = np.full((8, 5), -1.0, np.float32)
  saliency[:7, :4] = np.random.default_rng(0).uniform(0, 1, size=(7, 4)) ** 4
  return cfg, params, graphdef, batch, batch_lib.SFTBatch(batch.inputs, batch.loss_mask, image_saliency=saliency)


def test_objectness_loss_in_the_sft_step_and_weight_zero_is_plain_sft():
  cfg, params, graphdef, batch, with_sal = _micro_batch()

  @jax.jit
  def reference(p, b):
    """(plain SFT loss: CE over the answer tokens / their count, image tokens [batch, tokens, hidden])."""
    model = nnx.merge(graphdef, p)
    targets, mask = losses.next_token_targets(b.inputs.input_ids, b.loss_mask)
    ce = -jnp.sum(losses.token_logprobs(model.forward(b.inputs)[:, :-1], targets) * mask) / jnp.sum(mask)
    return ce, model.encode_images(b.inputs.pixel_values, b.inputs.vision)

  plain_loss, emb = reference(params, batch)
  zero_loss, zero_metrics = _loss(sft.SFTConfig(objectness_weight=0.0), graphdef, params, with_sal)
  np.testing.assert_allclose(float(zero_loss), float(plain_loss), rtol=1e-6)  # weight 0: the plain SFT loss
  assert "objectness" not in zero_metrics

  weight = 10.0
  loss, metrics = _loss(sft.SFTConfig(objectness_weight=weight), graphdef, params, with_sal)
  # numpy: the tower's tokens of the same batch, u from its seed, the formula written out
  emb = np.asarray(emb, np.float64)                                                  # [8, 5, 32]
  u = np.asarray(sft.objectness_direction(emb.shape[-1], 7), np.float64)
  cos = emb @ u / (np.linalg.norm(emb, axis=-1) + 1e-6)
  real = with_sal.image_saliency >= 0
  want = np.mean((cos[real] - 0.5 * with_sal.image_saliency[real]) ** 2)
  np.testing.assert_allclose(float(metrics["objectness"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(loss), float(zero_loss) + weight * want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["nll"]), float(zero_metrics["nll"]), rtol=1e-6)


@pytest.mark.slow
def test_objectness_loss_accumulates_to_the_whole_batch():
  cfg, params, graphdef, batch, with_sal = _micro_batch()
  one, m1 = _loss(sft.SFTConfig(objectness_weight=10.0), graphdef, params, with_sal)
  two, m2 = _loss(sft.SFTConfig(objectness_weight=10.0, grad_accum_steps=2), graphdef, params, with_sal)
  np.testing.assert_allclose(float(two), float(one), rtol=1e-5)
  np.testing.assert_allclose(float(m2["objectness"]), float(m1["objectness"]), rtol=1e-5)
