"""The per-row image layout of training batches (each row's images encoded separately) gives the
flat-batch logits."""

import numpy as np
import pytest
from flax import nnx

import hf_reference as ref
from mini_o3_jax.model import config as config_lib
from mini_o3_jax.model import Qwen25VL, prepare_inputs
from row_inputs import prepare_row_inputs


@pytest.fixture(scope="module")
def model():
  cfg = config_lib.tiny(vocab_size=ref.VOCAB, image_token_id=ref.IMAGE, vision_start_token_id=ref.VISION_START,
                        vision_end_token_id=ref.VISION_END, video_token_id=ref.VIDEO)
  return Qwen25VL(cfg, rngs=nnx.Rngs(0))


def test_per_row_images_equal_flat_batch(model):
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
