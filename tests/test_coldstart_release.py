"""The cold-start release reader on a parquet fixture in the original's ShareGPT layout."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mini_o3_jax.data import coldstart_release as cs

_IMAGES = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
_QUESTION = "<image>\nWhat color is the coat?"
_OBSERVATION = ("After the above Action 0, here is the the zoom-in image (Observation 1):\n"
                "<image>.\nContinue your reasoning process inside <think> and </think>.")
_CALL = ('<think>Look closer.</think><grounding>{"bbox_2d": [0.1, 0.2, 0.3, 0.4], '
         '"source": "original_image"}</grounding>')
_ANSWER = "<think>Enough.</think><answer>Orange.</answer>"


def _png(seed: int, size=(20, 12)) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def _turns(*pairs):
  return [{"from": role, "value": value} for role, value in pairs]


def _two_image_turns():
  return _turns(("system", "You are a helpful assistant."), ("human", _QUESTION), ("gpt", _CALL),
                ("human", _OBSERVATION), ("gpt", _ANSWER))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A hub snapshot: data/train-*.parquet with good rows and one of each kind of bad row."""
  root = tmp_path_factory.mktemp("coldstart")
  os.makedirs(root / "data")
  one_image = _turns(("human", _QUESTION), ("gpt", _ANSWER))
  rows = [
      # The original stores the turns as a Python-literal string (it eval()s them).
      (repr(_two_image_turns()), [_png(0), _png(1)]),
      (json.dumps(one_image), [_png(2)]),
      (json.dumps(_two_image_turns()), [_png(3)]),             # 2 placeholders, 1 image
      ("[{'from': 'human', 'value': ", [_png(4)]),              # unparseable turns
      (json.dumps(_turns(("robot", _QUESTION), ("gpt", _ANSWER))), [_png(5)]),  # unknown role
      (json.dumps(one_image), [b"not an image"]),                # bad image bytes
  ]
  table = pa.table({
      "conversations": [r[0] for r in rows],
      "images": pa.array([[{"bytes": b, "path": f"{i}_{k}.png"} for k, b in enumerate(r[1])]
                          for i, r in enumerate(rows)], type=_IMAGES),
      "image_names": [[f"{k}.png" for k in range(len(r[1]))] for r in rows],
      "data_source": ["minio3"] * len(rows),
      "sample_index": list(range(len(rows))),
      "rollout_index": [0] * len(rows),
  })
  pq.write_table(table, root / "data" / "train-00000-of-00001.parquet", row_group_size=2)
  return str(root)


def test_trajectory_conversion(release):
  ds = cs.ColdStartRelease(release, skip_bad=True)
  traj = ds[0]
  assert traj.id == "minio3:0:0" and traj.data_source == "minio3"
  assert [m["role"] for m in traj.messages] == ["system", "user", "assistant", "user", "assistant"]
  assert traj.messages[1]["content"] == [
      {"type": "image"}, {"type": "text", "text": "\nWhat color is the coat?"}]
  assert traj.messages[2]["content"] == [{"type": "text", "text": _CALL}]
  head, tail = _OBSERVATION.split("<image>")
  assert traj.messages[3]["content"] == [
      {"type": "text", "text": head}, {"type": "image"}, {"type": "text", "text": tail}]
  assert len(traj.images) == 2 and all(im.mode == "RGB" for im in traj.images)
  for k, image in enumerate(traj.images):
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(_png(k)))))
  assert cs.count_image_parts(ds[1].messages) == len(ds[1].images) == 1


def test_mismatched_placeholders_name_the_row(release):
  with pytest.raises(cs.ColdStartDataError) as info:
    cs.ColdStartRelease(release)
  message = str(info.value)
  assert "row 2" in message and "2 <image> placeholders but 1 images" in message
  assert "train-00000-of-00001.parquet" in info.value.file


def test_skip_bad_counts_malformed_rows(release, caplog):
  ds = cs.ColdStartRelease(release, skip_bad=True)
  assert len(ds) == 3 and ds.num_skipped == 3  # mismatch, unparseable, unknown role
  assert [s.row.split(" (")[0] for s in ds.skipped] == [
      "cold-start row 2", "cold-start row 3", "cold-start row 4"]
  assert "unknown role 'robot'" in str(ds.skipped[2])
  assert "skipped 3 bad rows" in caplog.text
  with pytest.raises(cs.ColdStartDataError, match="row 5.*unreadable"):
    ds[2]  # the bad image surfaces on access ...
  verified = cs.ColdStartRelease(release, skip_bad=True, verify_images=True)
  assert len(verified) == 2 and verified.num_skipped == 4  # ... or up front when asked


def test_configurable_columns_and_structured_messages(tmp_path):
  """A messages column of role/content structs, images as paths next to the file."""
  with open(tmp_path / "a.png", "wb") as f:
    f.write(_png(7))
  messages = [{"role": "user", "content": "<image>Where?"},
              {"role": "assistant", "content": "<answer>left</answer>"}]
  pq.write_table(pa.table({"msgs": [messages], "pics": [["a.png"]], "uid": ["u1"]}),
                 tmp_path / "set.parquet")
  layout = cs.ColdStartLayout(messages_column="msgs", images_column="pics", id_columns=("uid",))
  ds = cs.load_coldstart_release(str(tmp_path / "set.parquet"), layout=layout)
  traj = ds[0]
  assert traj.id == "u1" and traj.data_source == "minio3_coldstart"
  assert traj.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Where?"}]
  np.testing.assert_array_equal(np.asarray(traj.images[0]),
                                np.asarray(Image.open(io.BytesIO(_png(7)))))
  with pytest.raises(cs.ColdStartDataError, match="no messages column"):
    cs.ColdStartRelease(str(tmp_path))


def test_parse_turns_accepts_json_and_python_literals():
  turns = _turns(("human", "<image>q"), ("gpt", "a"))
  assert cs.parse_turns(json.dumps(turns)) == turns
  assert cs.parse_turns(repr(turns)) == turns
  assert cs.parse_turns(turns) == turns
  with pytest.raises(ValueError):
    cs.parse_turns('{"from": "human"}')
