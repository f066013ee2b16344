"""Image preprocessing == transformers' Qwen2VLImageProcessorPil, plus loading errors."""

import io
import math
import pathlib
import warnings

import numpy as np
import PIL.Image
import pytest

from mini_o3_jax.processing import image as image_lib

qwen2_vl_pil = pytest.importorskip(
    "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

DEFAULT = (56 * 56, 28 * 28 * 1280)
PIXEL_SETTINGS = [
    DEFAULT,
    (40_000, 2_000_000),  # Mini-o3's evaluation budget
    (256 * 28 * 28, 512 * 28 * 28),  # forces upscaling of small images
    (4 * 28 * 28, 16 * 28 * 28),  # forces strong downscaling
]


def _sample_images() -> list[pathlib.Path]:
  """Real photos/renders that installed packages ship (matplotlib's sample data)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  root = pathlib.Path(matplotlib.get_data_path()) / "sample_data"
  names = ["grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png"]
  return [root / n for n in names if (root / n).is_file()]


def _reference(image, min_pixels, max_pixels):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    proc = qwen2_vl_pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=image)
  return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])[0]


def _assert_parity(image, min_pixels=DEFAULT[0], max_pixels=DEFAULT[1]):
  want_pv, want_grid = _reference(image, min_pixels, max_pixels)
  pv, grid = image_lib.preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels)
  assert pv.dtype == np.float32 and grid.dtype == np.int64
  np.testing.assert_array_equal(grid, want_grid)
  assert pv.shape == want_pv.shape
  np.testing.assert_allclose(pv, want_pv, rtol=0, atol=1e-5)
  return grid


def _noise(h, w, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)


@pytest.mark.parametrize("path", _sample_images(), ids=lambda p: p.name)
@pytest.mark.parametrize("pixels", PIXEL_SETTINGS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_parity_sample_photos(path, pixels):
  with PIL.Image.open(path) as img:
    img.load()
    _assert_parity(img, *pixels)


def test_sample_photos_exist():
  if not _sample_images():
    pytest.skip("matplotlib sample data not installed")
  assert len(_sample_images()) >= 1


@pytest.mark.parametrize("hw", [(57, 213), (29, 29), (1000, 31), (28, 28), (1, 1), (13, 7),
                                (300, 2), (2, 399), (3, 600), (1300, 1900)])
def test_parity_odd_sizes(hw):
  _assert_parity(PIL.Image.fromarray(_noise(*hw)))


@pytest.mark.parametrize("pixels", PIXEL_SETTINGS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("hw", [(57, 213), (480, 640), (900, 120)])
def test_parity_pixel_budgets(hw, pixels):
  _assert_parity(PIL.Image.fromarray(_noise(*hw, seed=1)), *pixels)


def _smooth(h, w):
  """A smooth gradient with an alpha ramp: catches compositing and resampling errors."""
  y, x = np.mgrid[0:h, 0:w]
  rgba = np.stack([255 * x / w, 255 * y / h, 128 + 0 * x, 255 * (x + y) / (h + w)], -1)
  return PIL.Image.fromarray(rgba.astype(np.uint8), "RGBA")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "PA", "CMYK", "I;16", "I", "F",
                                  "1", "YCbCr", "RGBa"])
def test_parity_modes(mode):
  _assert_parity(_smooth(83, 61).convert(mode))
  _assert_parity(PIL.Image.fromarray(_noise(40, 50, 4, seed=2), "RGBA").convert(mode))


def test_parity_palette_with_transparency():
  img = PIL.Image.fromarray(_noise(45, 70)).convert("P")
  img.info["transparency"] = 3
  _assert_parity(img)


def test_rgba_is_composited_on_white():
  img = PIL.Image.new("RGBA", (56, 56), (0, 0, 0, 0))  # fully transparent black
  pv, _ = image_lib.preprocess_image(img)
  white = (1.0 - np.array(image_lib.OPENAI_CLIP_MEAN)) / np.array(image_lib.OPENAI_CLIP_STD)
  per_channel = pv.reshape(-1, 3, 2 * 14 * 14)
  np.testing.assert_allclose(per_channel, np.broadcast_to(white[None, :, None],
                                                          per_channel.shape), atol=1e-6)


def test_smart_resize_matches_reference_on_many_sizes():
  rng = np.random.default_rng(3)
  sizes = rng.integers(1, 5000, size=(400, 2))
  budgets = [DEFAULT, (40_000, 2_000_000), (3136, 12544), (200704, 401408)]
  for (h, w), (lo, hi) in zip(sizes, budgets * 100):
    if max(h, w) / min(h, w) > 200:
      continue
    got = image_lib.smart_resize(int(h), int(w), 28, lo, hi)
    assert got == qwen2_vl_pil.smart_resize(int(h), int(w), 28, lo, hi), (h, w, lo, hi)
    assert got[0] % 28 == 0 and got[1] % 28 == 0


def test_smart_resize_properties():
  h, w = image_lib.smart_resize(4000, 3000, 28, 40_000, 2_000_000)
  assert h * w <= 2_000_000 and abs(h / w - 4 / 3) < 0.05
  h, w = image_lib.smart_resize(30, 40, 28, 40_000, 2_000_000)
  assert h * w >= 40_000
  # Python's round() is half-to-even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2.
  assert image_lib.smart_resize(42, 70, 28, 1, 10**9) == (56, 56)


def test_patch_layout():
  """Features are (channel, time, row, col); time is a copy; rows go merge-block-wise."""
  h, w = 56, 84  # 4x6 patches = 2x3 merge blocks
  img = PIL.Image.fromarray(_noise(h, w, seed=4))
  pv, grid = image_lib.preprocess_image(img, min_pixels=h * w, max_pixels=h * w)
  np.testing.assert_array_equal(grid, [1, 4, 6])
  patches = pv.reshape(24, 3, 2, 14, 14)
  np.testing.assert_array_equal(patches[:, :, 0], patches[:, :, 1])
  chw = image_lib.normalize(np.asarray(img))
  # The 2nd merged token (block row 0, block col 1); inside it, patch (1, 0).
  row, col = 0 * 2 + 1, 1 * 2 + 0
  np.testing.assert_array_equal(patches[4 + 2, :, 0],
                                chw[:, row * 14:(row + 1) * 14, col * 14:(col + 1) * 14])


def test_num_image_tokens():
  assert image_lib.num_image_tokens([1, 4, 6]) == 6
  assert image_lib.num_image_tokens(np.array([1, 42, 36])) == 378
  assert image_lib.num_image_tokens([1, 4, 6], merge_size=1) == 24
  with pytest.raises(ValueError):
    image_lib.num_image_tokens([1, 3, 3])


def test_token_count_matches_pixel_budget():
  _, grid = image_lib.preprocess_image(PIL.Image.new("RGB", (2000, 1500)),
                                       min_pixels=40_000, max_pixels=200_000)
  assert math.prod(grid) * 14 * 14 <= 200_000


# ---------------------------------------------------------------------- errors
def test_extreme_aspect_ratio_rejected_like_reference():
  img = PIL.Image.new("RGB", (201, 1))
  with pytest.raises(ValueError, match="aspect ratio"):
    _reference(img, *DEFAULT)
  with pytest.raises(ValueError, match="aspect ratio"):
    image_lib.preprocess_image(img)
  _assert_parity(PIL.Image.new("RGB", (200, 1)))  # exactly at the limit is accepted


def test_empty_image_rejected():
  with pytest.raises(ValueError, match="positive"):
    image_lib.preprocess_image(PIL.Image.new("RGB", (0, 10)))
  with pytest.raises(ValueError, match="positive"):
    image_lib.smart_resize(0, 10)


def test_bad_arguments():
  with pytest.raises(TypeError):
    image_lib.preprocess_image(np.zeros((28, 28, 3), np.uint8))
  with pytest.raises(ValueError):
    image_lib.preprocess_image(PIL.Image.new("RGB", (28, 28)), min_pixels=100, max_pixels=10)


def _png_bytes(img):
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def test_load_image_paths_and_bytes(tmp_path):
  img = _smooth(40, 30)
  path = tmp_path / "a.png"
  path.write_bytes(_png_bytes(img))
  for source in (path, str(path), path.read_bytes()):
    loaded = image_lib.load_image(source)
    assert loaded.mode == "RGB" and loaded.size == (30, 40)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image_lib.to_rgb(img)))


def test_load_image_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    image_lib.load_image(tmp_path / "nope.jpg")


def test_load_image_corrupt_file(tmp_path):
  path = tmp_path / "garbage.jpg"
  path.write_bytes(b"this is not an image at all" * 10)
  with pytest.raises(ValueError, match="garbage.jpg"):
    image_lib.load_image(path)


def test_load_image_truncated_file(tmp_path):
  buf = io.BytesIO()
  PIL.Image.fromarray(_noise(200, 200, seed=5)).save(buf, format="JPEG", quality=90)
  path = tmp_path / "cut.jpg"
  path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  with pytest.raises(ValueError, match="cut.jpg"):
    image_lib.load_image(path)
  with pytest.raises(ValueError, match="bytes"):
    image_lib.load_image(buf.getvalue()[:100])
