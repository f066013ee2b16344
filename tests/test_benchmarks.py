"""Benchmark readers, TFDS builders and tools/prepare_data.py on release-layout fixtures."""

import base64
import importlib.util
import io
import json
import logging
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mini_o3_jax.data import benchmarks, image_sources
from mini_o3_jax.data.benchmarks import BenchmarkDataError
from mini_o3_jax.data import load_benchmark

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image_bytes(seed: int, fmt: str = "JPEG", size=(48, 32), mode="RGB") -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(out, format=fmt)
  return out.getvalue()


def _write(path, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _pixels(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _vp_row(folder: str, name: str, doc_id, question: str, answer: str, source: str) -> dict:
  return {"images": [f"{folder}/data/{name}"], "doc_id": doc_id,
          "problem": f"<image>\n{question}", "solution": answer, "data_source": source}


def _write_json(path, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(rows, f)


@pytest.fixture(scope="module")
def vp_dir(tmp_path_factory):
  """VisualProbe snapshot: hard has a missing and a corrupt image, medium a malformed row."""
  root = tmp_path_factory.mktemp("visualprobe")
  hard = "VisualProbe_Hard"
  _write(root / hard / "data/visual_probe_hard_0.jpg", _image_bytes(0))
  # visual_probe_hard_1.jpg is deliberately missing.
  _write(root / hard / "data/visual_probe_hard_2.jpg", _image_bytes(2))
  _write(root / hard / "data/visual_probe_hard_3.jpg", _image_bytes(3)[:300])  # truncated
  _write(root / hard / "data/visual_probe_hard_4.png", _image_bytes(4, "PNG"))
  _write_json(root / hard / "val.json", [
      _vp_row(hard, "visual_probe_hard_0.jpg", 10, "What color is the sign?", "White.",
              "visual_probe_hard"),
      _vp_row(hard, "visual_probe_hard_1.jpg", 11, "What is written?", "6C71", "visual_probe_hard"),
      _vp_row(hard, "visual_probe_hard_2.jpg", 12, "What weight?", "67.200 LBS",
              "visual_probe_hard"),
      _vp_row(hard, "visual_probe_hard_3.jpg", 13, "Which digit?", "7", "visual_probe_hard"),
      _vp_row(hard, "visual_probe_hard_4.png", 14, "Which animal?", "Cat.", "visual_probe_hard"),
  ])
  medium = "VisualProbe_Medium"
  for i in range(3):
    _write(root / medium / f"data/m{i}.jpg", _image_bytes(10 + i))
  bad = _vp_row(medium, "m1.jpg", 21, "Q?", "x", "visual_probe_medium")
  del bad["solution"]
  _write_json(root / medium / "val.json", [
      _vp_row(medium, "m0.jpg", 20, "Q0?", "a", "visual_probe_medium"), bad,
      _vp_row(medium, "m2.jpg", 22, "Q2?", "b", "visual_probe_medium")])
  # A lower-cased download whose JSON still names "VisualProbe_Easy/...".
  for i in range(2):
    _write(root / "visualprobe_easy" / f"data/e{i}.jpg", _image_bytes(30 + i))
  _write_json(root / "visualprobe_easy" / "val.json", [
      _vp_row("VisualProbe_Easy", f"e{i}.jpg", 30 + i, f"E{i}?", f"e{i}", "visual_probe_easy")
      for i in range(2)])
  for i in range(2):
    _write(root / "VisualProbe_train" / f"data/t{i}.jpg", _image_bytes(40 + i))
  _write_json(root / "VisualProbe_train" / "train.json", [
      _vp_row("VisualProbe_train", f"t{i}.jpg", i, f"T{i}?", f"t{i}", "visual_probe_train")
      for i in range(2)])
  return str(root)


@pytest.fixture(scope="module")
def vstar_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("vstar")
  for i in range(3):
    stem = root / "direct_attributes" / f"sa_{100 + i}"
    _write(f"{stem}.jpg", _image_bytes(100 + i))
    _write_json(f"{stem}.json", {
        "target_object": ["cup"], "bbox": [[1, 2, 3, 4]], "question": f"What color is cup {i}?",
        "options": [f"right {i}", f"wrong a{i}", f"wrong b{i}", f"wrong c{i}"]})
  for i in range(2):
    stem = root / "relative_position" / f"sa_{200 + i}"
    _write(f"{stem}.jpg", _image_bytes(200 + i))
    _write_json(f"{stem}.json", {
        "target_object": ["a", "b"], "bbox": [[1, 2, 3, 4], [5, 6, 7, 8]],
        "question": f"Is a left of b ({i})?", "options": [f"yes {i}", f"no {i}"]})
  return str(root)


def _hr_table(images, answers, category="single"):
  n = len(images)
  return pa.table({
      "index": list(range(n)),
      "question": [f"Question {i // 4}?" for i in range(n)],
      "answer": answers,
      "A": [f"opt A{i}" for i in range(n)], "B": [f"opt B{i}" for i in range(n)],
      "C": [f"opt C{i}" for i in range(n)], "D": [f"opt D{i}" for i in range(n)],
      "category": [category if i < 4 else "cross" for i in range(n)],
      "cycle_category": ["c"] * n,
      "image": images,
  })


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
  """HR-Bench: 4k = 2 questions x 4 rotations sharing images; 8k has a corrupt image."""
  root = tmp_path_factory.mktemp("hrbench")
  b64 = [base64.b64encode(_image_bytes(300 + q)).decode() for q in range(2)]
  table = _hr_table([b64[i // 4] for i in range(8)], list("ABCDBCDA"))
  pq.write_table(table, root / "hr_bench_4k.parquet", row_group_size=3)
  images = [b64[0], base64.b64encode(b"not an image").decode(),
            "data:image/jpeg;base64," + b64[1]]
  pq.write_table(_hr_table(images, list("ABC")), root / "hr_bench_8k.parquet")
  return str(root)


# ------------------------------------------------------------------------------------------------
# VisualProbe.


def test_visualprobe_records(vp_dir):
  ds = load_benchmark("visualprobe", "hard", vp_dir)
  assert len(ds) == 5 and ds.num_skipped == 0
  rec = ds[0]
  assert set(rec) == {"id", "image", "question", "options", "answer", "category"}
  assert rec["id"] == "10" and rec["question"] == "What color is the sign?"
  assert rec["options"] is None and rec["answer"] == "White."
  assert rec["category"] == "visual_probe_hard"
  assert rec["image"].mode == "RGB" and rec["image"].size == (48, 32)
  expected = _pixels(open(os.path.join(vp_dir, "VisualProbe_Hard/data/visual_probe_hard_0.jpg"),
                          "rb").read())
  np.testing.assert_array_equal(np.asarray(rec["image"]), expected)
  assert ds[4]["answer"] == "Cat." and ds[-1]["id"] == "14"


def test_visualprobe_missing_image_names_row_and_file(vp_dir):
  ds = load_benchmark("visualprobe", "hard", vp_dir)
  with pytest.raises(BenchmarkDataError) as info:
    ds[1]
  message = str(info.value)
  assert "row 1" in message and "doc_id 11" in message
  assert "visual_probe_hard_1.jpg" in message and "missing" in message
  assert info.value.kind == "missing"


def test_visualprobe_corrupt_image_names_row_and_file(vp_dir):
  ds = load_benchmark("visualprobe", "hard", vp_dir)
  with pytest.raises(BenchmarkDataError) as info:
    ds[3]
  assert "row 3" in str(info.value) and "visual_probe_hard_3.jpg" in str(info.value)
  assert info.value.kind == "unreadable"


def test_visualprobe_skip_bad(vp_dir, caplog):
  with caplog.at_level(logging.WARNING):
    ds = load_benchmark("visualprobe", "hard", vp_dir, skip_bad=True)
  assert len(ds) == 3 and ds.num_skipped == 2
  assert sorted(s.kind for s in ds.skipped) == ["missing", "unreadable"]
  assert [ds[i]["id"] for i in range(len(ds))] == ["10", "12", "14"]
  assert "skipped 2 bad rows" in caplog.text


def test_visualprobe_malformed_row(vp_dir):
  with pytest.raises(BenchmarkDataError) as info:
    load_benchmark("visualprobe", "medium", vp_dir)
  assert "row 1" in str(info.value) and "solution" in str(info.value)
  assert info.value.file.endswith(os.path.join("VisualProbe_Medium", "val.json"))
  ds = load_benchmark("visualprobe", "medium", vp_dir, skip_bad=True)
  assert len(ds) == 2 and ds.num_skipped == 1 and ds.skipped[0].kind == "malformed"


def test_visualprobe_invalid_json_file(tmp_path):
  _write(tmp_path / "VisualProbe_Hard/val.json", b"[{not json")
  with pytest.raises(BenchmarkDataError, match="val.json"):
    load_benchmark("visualprobe", "hard", str(tmp_path), skip_bad=True)


def test_visualprobe_lowercase_folder_and_train(vp_dir):
  easy = load_benchmark("visualprobe", "easy", vp_dir)
  assert [easy[i]["answer"] for i in range(2)] == ["e0", "e1"]
  train = load_benchmark("visualprobe", "train", vp_dir)
  assert len(train) == 2 and train[1]["question"] == "T1?"
  assert benchmarks.available_splits("visualprobe", vp_dir) == ("train", "easy", "medium", "hard")


def test_visualprobe_parquet_export(tmp_path):
  folder = tmp_path / "VisualProbe_Hard" / "data"
  good, path_img = _image_bytes(50), _image_bytes(51)
  _write(folder / "p.jpg", path_img)
  struct_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
  pq.write_table(pa.table({
      "images": pa.array([[{"bytes": good, "path": "a.jpg"}],
                          [{"bytes": b"garbage", "path": "b.jpg"}]], type=struct_type),
      "problem": ["<image>\nQ0?", "<image>\nQ1?"], "solution": ["s0", "s1"],
  }), folder / "val-00000-of-00002.parquet")
  pq.write_table(pa.table({
      "images": [["VisualProbe_Hard/data/p.jpg"], [base64.b64encode(good).decode()]],
      "problem": ["<image>\nQ2?", "<image>\nQ3?"], "solution": ["s2", "s3"], "doc_id": [7, 8],
  }), folder / "val-00001-of-00002.parquet")
  ds = load_benchmark("visualprobe", "hard", str(tmp_path))
  assert len(ds) == 4 and [ds.row(i).question for i in range(4)] == ["Q0?", "Q1?", "Q2?", "Q3?"]
  np.testing.assert_array_equal(np.asarray(ds[0]["image"]), _pixels(good))
  np.testing.assert_array_equal(np.asarray(ds[2]["image"]), _pixels(path_img))
  np.testing.assert_array_equal(np.asarray(ds[3]["image"]), _pixels(good))
  assert ds[3]["id"] == "8"
  with pytest.raises(BenchmarkDataError) as info:
    ds[1]
  assert "row 1" in str(info.value) and "val-00000-of-00002.parquet" in str(info.value)
  assert len(load_benchmark("visualprobe", "hard", str(tmp_path), skip_bad=True)) == 3


def test_image_bytes_from_cell_variants(tmp_path):
  data = _image_bytes(60)
  path = _write(tmp_path / "x.jpg", data)
  resolve = image_sources.PathResolver((str(tmp_path),))
  b64 = base64.b64encode(data).decode()
  for cell in (data, {"bytes": data, "path": None}, {"bytes": None, "path": "x.jpg"}, [b64],
               "data:image/jpeg;base64," + b64, "x.jpg", [{"bytes": data}], path):
    assert image_sources.image_bytes_from_cell(cell, resolve) == data
  with pytest.raises(FileNotFoundError):
    image_sources.image_bytes_from_cell("nope.jpg", resolve)
  with pytest.raises(ValueError):
    image_sources.image_bytes_from_cell([data, data], resolve)
  with pytest.raises(ValueError):
    image_sources.image_bytes_from_cell("%%% not base64", resolve)


# ------------------------------------------------------------------------------------------------
# V* Bench.


def test_vstar_options_shuffled_deterministically(vstar_dir):
  ds = load_benchmark("vstar", "test", vstar_dir)
  again = load_benchmark("vstar", "test", vstar_dir)
  assert len(ds) == 5
  assert [ds.row(i).id for i in range(5)] == [
      "direct_attributes/sa_100", "direct_attributes/sa_101", "direct_attributes/sa_102",
      "relative_position/sa_200", "relative_position/sa_201"]
  for i in range(len(ds)):
    rec = ds[i]
    assert rec["options"] == again[i]["options"] and rec["answer"] == again[i]["answer"]
    letter = rec["answer"]
    assert rec["options"]["ABCD".index(letter)].startswith(("right", "yes"))
    number = rec["id"][-1]
    assert sorted(rec["options"]) == sorted(
        [f"right {number}", f"wrong a{number}", f"wrong b{number}", f"wrong c{number}"]
        if rec["category"] == "direct_attributes" else [f"yes {number}", f"no {number}"])
  assert ds.category_counts() == {"direct_attributes": 3, "relative_position": 2}
  assert ds[0]["question"] == "What color is cup 0?"


def test_vstar_shuffle_depends_on_seed_and_id_only():
  options = ["right", "w1", "w2", "w3"]
  ids = [f"direct_attributes/sa_{i}" for i in range(40)]
  seed0 = [benchmarks.shuffle_options(options, i, 0) for i in ids]
  seed1 = [benchmarks.shuffle_options(options, i, 1) for i in ids]
  assert seed0 == [benchmarks.shuffle_options(options, i, 0) for i in reversed(ids)][::-1]
  assert seed0 != seed1
  assert len({letter for _, letter in seed0}) == 4  # the answer is not stuck on "A"
  for presented, letter in seed0 + seed1:
    assert presented["ABCD".index(letter)] == "right"


def test_vstar_option_seed_reaches_records(vstar_dir):
  orders = {seed: [load_benchmark("vstar", "test", vstar_dir, option_seed=seed).row(i).options
                   for i in range(5)] for seed in range(4)}
  assert len({tuple(v) for v in orders.values()}) > 1


def test_vstar_bad_rows(tmp_path):
  for i, folder in ((1, "direct_attributes"), (4, "relative_position")):
    _write(tmp_path / folder / f"sa_{i}.jpg", _image_bytes(i))
    _write_json(tmp_path / folder / f"sa_{i}.json", {"question": "q?", "options": ["a", "b"]})
  _write(tmp_path / "direct_attributes/sa_2.json", b'{"question": "q?", "options": [')
  _write(tmp_path / "direct_attributes/sa_2.jpg", _image_bytes(2))
  _write_json(tmp_path / "direct_attributes/sa_3.json", {"question": "q?", "options": ["a", "b"]})
  with pytest.raises(BenchmarkDataError) as info:
    load_benchmark("vstar", "test", str(tmp_path))
  assert "sa_2" in str(info.value) and info.value.file.endswith("sa_2.json")
  ds = load_benchmark("vstar", "test", str(tmp_path), skip_bad=True)
  assert len(ds) == 2 and ds.num_skipped == 2
  missing = [s for s in ds.skipped if s.kind == "missing"]
  assert len(missing) == 1 and missing[0].file.endswith("sa_3.jpg") and "sa_3" in missing[0].row


# ------------------------------------------------------------------------------------------------
# HR-Bench.


def test_hrbench_keeps_all_rows(hr_dir):
  ds = load_benchmark("hrbench_4k", "test", hr_dir)
  assert len(ds) == 8 and ds.num_skipped == 0  # 2 questions x 4 rotations, never deduplicated
  assert len({ds.row(i).id for i in range(8)}) == 8
  rec = ds[5]
  assert rec["options"] == ["opt A5", "opt B5", "opt C5", "opt D5"]  # as in the file
  assert [ds.row(i).answer for i in range(8)] == list("ABCDBCDA")
  assert rec["question"] == "Question 1?" and rec["category"] == "cross"
  assert ds.category_counts() == {"single": 4, "cross": 4}
  np.testing.assert_array_equal(np.asarray(rec["image"]), _pixels(_image_bytes(301)))
  # Random access across row groups, out of order.
  np.testing.assert_array_equal(np.asarray(ds[0]["image"]), np.asarray(ds[3]["image"]))


def test_hrbench_bad_image_and_data_uri(hr_dir):
  ds = load_benchmark("hrbench_8k", "test", hr_dir)
  assert len(ds) == 3
  np.testing.assert_array_equal(np.asarray(ds[2]["image"]), _pixels(_image_bytes(301)))
  with pytest.raises(BenchmarkDataError) as info:
    ds[1]
  assert "row 1" in str(info.value) and "hr_bench_8k.parquet" in str(info.value)
  skipping = load_benchmark("hrbench_8k", "test", hr_dir, skip_bad=True)
  assert len(skipping) == 2 and skipping.num_skipped == 1


def test_benchmark_pickles_for_grain_workers(hr_dir):
  import grain  # pylint: disable=g-import-not-at-top
  ds = pickle.loads(pickle.dumps(load_benchmark("hrbench_4k", "test", hr_dir)))
  assert grain.MapDataset.source(ds)[7]["answer"] == "A"


def test_bad_names_and_missing_download(tmp_path):
  with pytest.raises(ValueError, match="unknown benchmark"):
    load_benchmark("mmvp", "test", str(tmp_path))
  with pytest.raises(ValueError, match="unknown split"):
    load_benchmark("vstar", "hard", str(tmp_path))
  for name, split in (("visualprobe", "hard"), ("vstar", "test"), ("hrbench_8k", "test")):
    with pytest.raises(FileNotFoundError):
      load_benchmark(name, split, str(tmp_path))


# ------------------------------------------------------------------------------------------------
# TFDS + grain, and the prepare_data tool.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, vp_dir, vstar_dir, hr_dir):
  from mini_o3_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp("tfds"))
  for name, download in (("visualprobe", vp_dir), ("vstar", vstar_dir), ("hrbench_4k", hr_dir)):
    tfds_builders.build_benchmark(name, download, out)
  return out


@pytest.mark.parametrize("name,split,download", [
    ("visualprobe", "hard", "vp_dir"), ("visualprobe", "medium", "vp_dir"),
    ("vstar", "test", "vstar_dir"), ("hrbench_4k", "test", "hr_dir")])
def test_tfds_grain_round_trip(tfds_dir, request, name, split, download):
  from mini_o3_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  reference = load_benchmark(name, split, request.getfixturevalue(download), skip_bad=True)
  ds = tfds_builders.grain_source(name, split, tfds_dir)
  assert len(ds) == len(reference)
  raw = tfds_builders.data_source(name, split, tfds_dir)
  for i in range(len(ds)):
    got, want = ds[i], reference[i]
    assert {k: v for k, v in got.items() if k != "image"} == {
        k: v for k, v in want.items() if k != "image"}
    assert got["image"].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(want["image"]))
    assert raw[i]["image"] == reference.image_bytes(i)  # stored as released, not re-encoded


def test_storable_image_bytes_converts_non_rgb():
  from mini_o3_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  gray = _image_bytes(70, "JPEG", mode="L")
  stored = tfds_builders.storable_image_bytes(gray)
  assert Image.open(io.BytesIO(stored)).format == "PNG"
  np.testing.assert_array_equal(_pixels(stored), _pixels(gray))
  rgb = _image_bytes(71)
  assert tfds_builders.storable_image_bytes(rgb) == rgb


def test_prepare_data_cli(vp_dir, vstar_dir, tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
      "prepare_data", os.path.join(_REPO, "tools", "prepare_data.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  out = str(tmp_path / "tfds")
  assert tool.main(["--dataset", "visualprobe", "--download_dir", vp_dir, "--out_dir", out]) == 0
  printed = capsys.readouterr().out
  assert ("hard: 3 rows kept, 2 skipped (missing image 1, unreadable image 1, malformed 0)"
          in printed)
  assert ("medium: 2 rows kept, 1 skipped (missing image 0, unreadable image 0, malformed 1)"
          in printed)
  assert "categories: visual_probe_hard 3" in printed and "hard: 3 examples" in printed
  args = ["--dataset", "vstar", "--download_dir", vstar_dir, "--out_dir", out]
  assert tool.main(args) == 0 and tool.main(args + ["--overwrite"]) == 0
  assert capsys.readouterr().out.count("test: 5 examples") == 2
  assert tool.main(["--dataset", "vstar", "--download_dir", str(tmp_path / "none"),
                    "--out_dir", out, "--scan_only"]) == 1


# ------------------------------------------------------------------------------------------------
# Files that hold nothing, or not what they claim (issue 18, items 7 and 9).


def test_empty_files_are_an_error_naming_the_file(tmp_path):
  _write_json(tmp_path / "vp" / "VisualProbe_Hard/val.json", [])
  with pytest.raises(BenchmarkDataError, match=r"val.json.*no rows|no rows.*val.json"):
    load_benchmark("visualprobe", "hard", str(tmp_path / "vp"))
  folder = tmp_path / "vpq" / "VisualProbe_Hard" / "data"
  folder.mkdir(parents=True)
  pq.write_table(pa.table({"images": pa.array([], pa.list_(pa.string())), "problem": pa.array([], pa.string()),
                           "solution": pa.array([], pa.string())}), folder / "val-00000-of-00001.parquet")
  with pytest.raises(BenchmarkDataError, match=r"val-00000-of-00001.parquet.*no rows|no rows.*val-00000"):
    load_benchmark("visualprobe", "hard", str(tmp_path / "vpq"))
  hr = tmp_path / "hr"
  hr.mkdir()
  pq.write_table(_hr_table([], []), hr / "hr_bench_4k.parquet")
  with pytest.raises(BenchmarkDataError, match="hr_bench_4k.parquet"):
    load_benchmark("hrbench_4k", "test", str(hr))


def test_nan_solution_is_an_error_naming_the_row(tmp_path):
  folder = tmp_path / "VisualProbe_Hard" / "data"
  _write(folder / "p.jpg", _image_bytes(60))
  pq.write_table(pa.table({"images": [["VisualProbe_Hard/data/p.jpg"]] * 2, "problem": ["<image>\nQ0?"] * 2,
                           "solution": [1.5, float("nan")]}), folder / "val-00000-of-00001.parquet")
  with pytest.raises(BenchmarkDataError, match=r"row 1.*NaN 'solution'|NaN 'solution'.*row 1") as info:
    load_benchmark("visualprobe", "hard", str(tmp_path))
  assert "val-00000-of-00001.parquet" in str(info.value)
  ds = load_benchmark("visualprobe", "hard", str(tmp_path), skip_bad=True)
  assert len(ds) == 1 and ds[0]["answer"] == "1.5" and ds.num_skipped == 1


def test_files_of_the_wrong_kind_are_named(tmp_path):
  (tmp_path / "hr_bench_4k.parquet").write_bytes(b"index,question\n0,What?\n")  # a CSV under a parquet name
  with pytest.raises(BenchmarkDataError, match=r"not a readable parquet file.*hr_bench_4k.parquet"):
    load_benchmark("hrbench_4k", "test", str(tmp_path))
  _write(tmp_path / "vp" / "VisualProbe_Hard/val.json", json.dumps([{"problem": "é"}]).encode("utf-16"))
  with pytest.raises(BenchmarkDataError, match=r"not UTF-8 text.*val.json"):
    load_benchmark("visualprobe", "hard", str(tmp_path / "vp"))
