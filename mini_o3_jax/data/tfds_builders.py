"""TFDS manual-dir builders for the benchmarks, written as ArrayRecord and read through grain.

No TensorFlow is needed: the builder is prepared with ``file_format='array_record'`` and read back
with ``builder.as_data_source()``; nothing is ever downloaded (the manual dir is a local download
in the layout `benchmarks.load_benchmark` reads).

    build_benchmark("vstar", download_dir="~/vstar_bench", out_dir="~/tfds")
    ds = grain_source("vstar", "test", "~/tfds")   # grain.MapDataset of BenchmarkRecord dicts

Images are stored exactly as released when they are RGB JPEG or PNG (so pixels round-trip
bit-exactly); anything else (grayscale/CMYK JPEG, WebP, ...) is converted to RGB and stored as
lossless PNG. Multiple-choice options are stored in their presented (shuffled) order with the
builder config's ``option_seed``, so a TFDS copy and ``load_benchmark(..., option_seed=0)`` agree.
Bad rows are skipped at build time (see ``tools/prepare_data.py`` for the report).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
from typing import Any, Iterator, Mapping

import grain
import tensorflow_datasets as tfds
from PIL import Image

from mini_o3_jax.data import benchmarks, image_sources

logger = logging.getLogger(__name__)

_HOMEPAGES = {
    "visualprobe": "https://huggingface.co/Mini-o3",
    "vstar": "https://huggingface.co/datasets/craigwu/vstar_bench",
    "hrbench_4k": "https://huggingface.co/datasets/DreamMr/HR-Bench",
    "hrbench_8k": "https://huggingface.co/datasets/DreamMr/HR-Bench",
}


class LocalGeneratorBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder that only reads local files (or generates its data): no download checksums to find."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:  # pylint: disable=invalid-overridden-method
    # TFDS looks up a builder's source file only to find URL checksums. Nothing is downloaded
    # here, and the lookup needs `importlib_resources` for builders inside a package.
    return None


@dataclasses.dataclass
class BenchmarkConfig(tfds.core.BuilderConfig):
  """One benchmark; `option_seed` fixes the multiple-choice option order stored on disk."""
  option_seed: int = 0


def storable_image_bytes(data: bytes) -> bytes:
  """`data` itself when it is an RGB JPEG/PNG, else the image re-encoded as an RGB PNG."""
  with Image.open(io.BytesIO(data)) as image:
    if image.format in ("JPEG", "PNG") and image.mode == "RGB":
      return data
    rgb = image.convert("RGB")
  out = io.BytesIO()
  rgb.save(out, format="PNG")
  return out.getvalue()


class MiniO3Benchmarks(LocalGeneratorBuilder):
  """VisualProbe, V* Bench and HR-Bench from a local download (one config each)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      BenchmarkConfig(name=name, description=f"{name} ({', '.join(splits)})")
      for name, splits in benchmarks.BENCHMARK_SPLITS.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the release into the manual dir, in its own layout:
    visualprobe: Mini-o3/VisualProbe_{train,Easy,Medium,Hard} as <dir>/VisualProbe_Hard/val.json ...
    vstar: craigwu/vstar_bench as <dir>/direct_attributes/, <dir>/relative_position/
    hrbench_4k / hrbench_8k: DreamMr/HR-Bench as <dir>/hr_bench_4k.parquet, hr_bench_8k.parquet
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Mini-o3 evaluation benchmark. Options in presented order "
                     f"(option_seed={self.builder_config.option_seed}); answer is a letter for "
                     "multiple choice, else the free-form answer."),
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            # Bytes are stored as released; see the module docstring.
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "question": tfds.features.Text(),
            "options": tfds.features.Sequence(tfds.features.Text()),
            "answer": tfds.features.Text(),
            "category": tfds.features.Text(),
        }),
        homepage=_HOMEPAGES[self.builder_config.name],
        # Keep the release's row order, so index i here is row i of load_benchmark.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    data_dir = os.fspath(dl_manager.manual_dir)
    splits = benchmarks.available_splits(self.builder_config.name, data_dir)
    if not splits:
      raise FileNotFoundError(f"no {self.builder_config.name} files in {data_dir}.\n"
                              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {split: self._generate_examples(data_dir, split) for split in splits}

  def _generate_examples(self, data_dir: str, split: str) -> Iterator[tuple[str, dict]]:
    bench = benchmarks.load_benchmark(self.builder_config.name, split, data_dir, skip_bad=True,
                                      option_seed=self.builder_config.option_seed)
    for i in range(len(bench)):
      row = bench.row(i)
      yield row.id, {
          "id": row.id,
          "image": storable_image_bytes(bench.image_bytes(i)),
          "question": row.question,
          "options": list(row.options or ()),
          "answer": row.answer,
          "category": row.category,
      }


def build_benchmark(name: str, download_dir: str, out_dir: str,
                    overwrite: bool = False) -> MiniO3Benchmarks:
  """Prepares the ArrayRecord copy of benchmark `name` from a local download; returns the builder.

  An existing copy is kept as is (TFDS does not rebuild) unless `overwrite`.
  """
  def make() -> MiniO3Benchmarks:
    return MiniO3Benchmarks(config=name, data_dir=os.fspath(out_dir), file_format="array_record")

  builder = make()
  if overwrite and os.path.isdir(builder.data_dir):
    shutil.rmtree(builder.data_dir)
    builder = make()  # forget the dataset info read from the deleted copy
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(download_dir)))
  return builder


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_tfds_record(raw: Mapping[str, Any]) -> benchmarks.BenchmarkRecord:
  """A raw data-source record (image left encoded) -> `BenchmarkRecord`."""
  options = [_text(o) for o in raw["options"]]
  return benchmarks.BenchmarkRecord(
      id=_text(raw["id"]), image=image_sources.decode_image(raw["image"]),
      question=_text(raw["question"]), options=options or None,
      answer=_text(raw["answer"]), category=_text(raw["category"]))


def data_source(name: str, split: str, data_dir_tfds: str):
  """The random-access TFDS source of a prepared benchmark, images left as encoded bytes."""
  builder = MiniO3Benchmarks(config=name, data_dir=os.fspath(data_dir_tfds))
  # Skip TFDS's numpy decode: we decode with PIL to RGB ourselves, once.
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def grain_source(name: str, split: str, data_dir_tfds: str) -> grain.MapDataset:
  """A grain MapDataset of `BenchmarkRecord` dicts (as ``load_benchmark``) from a TFDS copy."""
  return grain.MapDataset.source(data_source(name, split, data_dir_tfds)).map(decode_tfds_record)
