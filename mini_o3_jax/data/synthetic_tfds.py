"""The synthetic visual-search tiers as a TFDS dataset (ArrayRecord, no TensorFlow), grain sources.

Two ways to read the same items:

* `SyntheticSource` (in `synthetic`) generates on the fly, deterministic by index; the CPU demo uses
  it (no preparation step, any size).
* `SyntheticVisualSearch`, a TFDS `GeneratorBasedBuilder` writing ArrayRecord files, read back with
  `builder.as_data_source()`; `grain_source` wraps it as a grain `MapDataset`. TFDS shuffles records
  when it writes them, so record i of the prepared split is *not* item i: use the `id` field
  (`synthetic.parse_task_id`) to find an item's index.

Both yield the loader-style record: ``id, image (PIL RGB), question, options=None, answer,
category`` plus ``difficulty, target_box [4], detail_box [4], candidate_boxes [N, 4],
zoom_path [K, 4]`` (float32, relative [x0, y0, x1, y1] of the original image).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mini_o3_jax.data import synthetic
from mini_o3_jax.data import tfds_builders

DEFAULT_NUM_TRAIN = 1000
DEFAULT_NUM_TEST = 300


@dataclasses.dataclass(eq=False)
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
  """One tier with its split sizes and generator config."""
  tier: str = "easy"
  num_train: int = DEFAULT_NUM_TRAIN
  num_test: int = DEFAULT_NUM_TEST
  synthetic: synthetic.SyntheticConfig = synthetic.SyntheticConfig()


def builder_config(tier: str, num_train: int = DEFAULT_NUM_TRAIN,
                   num_test: int = DEFAULT_NUM_TEST,
                   config: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
                   ) -> SyntheticBuilderConfig:
  """A builder config whose name identifies its contents (tier, sizes, generator config)."""
  config.tier(tier)  # validates the name
  if (num_train, num_test, config) == (DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST,
                                       synthetic.SyntheticConfig()):
    name = tier
  else:
    # Different contents must never share a directory: the name carries a digest of all of them.
    digest = hashlib.sha1(repr((num_train, num_test, config)).encode()).hexdigest()[:10]
    name = f"{tier}_{num_train}_{num_test}_{digest}"
  return SyntheticBuilderConfig(
      name=name, version="1.0.0", tier=tier, num_train=num_train, num_test=num_test,
      synthetic=config,
      description=f"synthetic {tier} tier, {num_train} train / {num_test} test items")


def _features() -> tfds.features.FeaturesDict:
  box = tfds.features.Tensor(shape=(4,), dtype=np.float32)
  boxes = tfds.features.Tensor(shape=(None, 4), dtype=np.float32)
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      "question": tfds.features.Text(),
      "answer": tfds.features.Text(),
      "difficulty": tfds.features.Text(),
      "category": tfds.features.Text(),
      "target_box": box,
      "detail_box": box,
      "candidate_boxes": boxes,
      "zoom_path": boxes,
  })


class SyntheticVisualSearch(tfds_builders.LocalGeneratorBuilder):
  """Synthetic "read the digit on the <colour> <shape>" visual-search items, one config per tier."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [builder_config(tier) for tier in synthetic.TIERS]

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` looks for package metadata this module lacks.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=_features(),
        homepage="https://arxiv.org/abs/2509.07969",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict]]]:
    del dl_manager  # everything is generated
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "test": self._generate_examples("test", cfg.num_test),
    }

  def _generate_examples(self, split: str, n: int) -> Iterator[tuple[str, dict]]:
    cfg = self.builder_config
    for task in synthetic.generate_split(cfg.tier, split, n, cfg.synthetic):
      record = task_record(task)
      del record["options"]  # always None; restored on reading
      yield task.id, record


def make_builder(tier: str, data_dir: str, num_train: int = DEFAULT_NUM_TRAIN,
                 num_test: int = DEFAULT_NUM_TEST,
                 config: synthetic.SyntheticConfig = synthetic.SyntheticConfig(),
                 prepare: bool = True) -> SyntheticVisualSearch:
  """The builder for these contents under `data_dir`, prepared (ArrayRecord) unless told not to."""
  builder = SyntheticVisualSearch(
      data_dir=data_dir, config=builder_config(tier, num_train, num_test, config),
      file_format="array_record")
  if prepare:
    builder.download_and_prepare()  # a no-op when the files are already there
  return builder


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(example: dict) -> dict:
  """A TFDS data-source example -> loader-style record (PIL image, str fields, float32 boxes)."""
  return {
      "id": _text(example["id"]),
      "image": Image.fromarray(np.asarray(example["image"], np.uint8), mode="RGB"),
      "question": _text(example["question"]),
      "options": None,
      "answer": _text(example["answer"]),
      "category": _text(example["category"]),
      "difficulty": _text(example["difficulty"]),
      "target_box": np.asarray(example["target_box"], np.float32),
      "detail_box": np.asarray(example["detail_box"], np.float32),
      "candidate_boxes": np.asarray(example["candidate_boxes"], np.float32).reshape(-1, 4),
      "zoom_path": np.asarray(example["zoom_path"], np.float32).reshape(-1, 4),
  }


def task_record(task: synthetic.SyntheticTask) -> dict:
  """The loader-style record (id, image, question, options, answer, category) plus the boxes."""
  return {
      "id": task.id,
      "image": task.image,
      "question": task.question,
      "options": None,
      "answer": task.answer,
      "category": task.category,
      "difficulty": task.difficulty,
      "target_box": np.asarray(task.target_box, np.float32),
      "detail_box": np.asarray(task.detail_box, np.float32),
      "candidate_boxes": np.asarray(task.candidate_boxes, np.float32).reshape(-1, 4),
      "zoom_path": np.asarray(task.zoom_path, np.float32).reshape(-1, 4),
  }


class SyntheticSource:
  """Random-access source (grain's RandomAccessDataSource protocol) generating on the fly."""

  def __init__(self, tier: str, split: str, n: int,
               config: synthetic.SyntheticConfig = synthetic.SyntheticConfig()):
    config.tier(tier)  # validates the name
    self.tier, self.split, self.n, self.config = tier, split, n, config

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.n:
      raise IndexError(f"index {index} out of range for {self.n} items")
    return task_record(synthetic.make_task(self.tier, index, self.config, self.split))

  def __repr__(self) -> str:
    return f"SyntheticSource(tier={self.tier!r}, split={self.split!r}, n={self.n})"


def grain_source(tier: str, split: str, data_dir: str, num_train: int = DEFAULT_NUM_TRAIN,
                 num_test: int = DEFAULT_NUM_TEST,
                 config: synthetic.SyntheticConfig = synthetic.SyntheticConfig(),
                 prepare: bool = True) -> grain.MapDataset:
  """A grain MapDataset over the prepared TFDS split, yielding loader-style records."""
  if split not in synthetic.SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {synthetic.SPLITS}")
  builder = make_builder(tier, data_dir, num_train, num_test, config, prepare=prepare)
  return grain.MapDataset.source(builder.as_data_source()[split]).map(decode_record)


def direct_source(tier: str, split: str, n: int,
                  config: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
                  ) -> grain.MapDataset:
  """A grain MapDataset generating items on the fly (no TFDS), record i = item i."""
  return grain.MapDataset.source(SyntheticSource(tier, split, n, config))
