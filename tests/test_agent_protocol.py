"""Prompts, tool-call parsing, the crop tool and trajectories of the agent protocol."""

import json
import random
import warnings

import numpy as np
from PIL import Image
import pytest

from mini_o3_jax.agent import prompts
from mini_o3_jax.agent import tools
from mini_o3_jax.agent.tools import CropError
from mini_o3_jax.agent.tools import FinalAnswer
from mini_o3_jax.agent.tools import NoAction
from mini_o3_jax.agent.tools import ToolCall
from mini_o3_jax.agent.tools import ToolCallError
from mini_o3_jax.agent import trajectory as traj_lib


def coord_image(width=200, height=120, blue=7):
  """RGB image whose pixel (x, y) is (x, y, blue): crops reveal exactly where they came from."""
  arr = np.zeros((height, width, 3), np.uint8)
  arr[..., 0] = np.arange(width)[None, :]
  arr[..., 1] = np.arange(height)[:, None]
  arr[..., 2] = blue
  return Image.fromarray(arr, "RGB")


def call_text(bbox, source="original_image"):
  return ("<think>Zoom in.</think><grounding>" + json.dumps({
      "bbox_2d": bbox,
      "source": source
  }) + "</grounding>")


# ------------------------------------------------------------------------------------------------
# Prompts.


def test_question_prompt_free_form():
  text = prompts.question_prompt("<image>\nWhat colour is the cup?")
  assert text.startswith(prompts.INSTRUCTIONS)
  assert text.endswith("\n\nQuestion: What colour is the cup?")
  assert "<image>" not in text
  for tag in ("<think>", "<grounding>", "<answer>", '"bbox_2d"', '"source"', "original_image",
              "observation_i"):
    assert tag in text


def test_question_prompt_multiple_choice_and_inverse():
  text = prompts.question_prompt("Which side?", ["left", "right", "top"])
  assert "\nOptions:\nA. left\nB. right\nC. top\n" in text
  assert text.endswith(prompts.CHOICE_INSTRUCTION)
  assert prompts.parse_question_prompt(text) == ("Which side?", ["left", "right", "top"])
  assert prompts.parse_question_prompt(prompts.question_prompt("Q?")) == ("Q?", None)
  assert prompts.parse_question_prompt("<image>\nsomething else") is None


def test_observation_turn_text_and_message():
  text = prompts.observation_turn(2, 3)
  assert text == (
      "After the above Action 2, here is the zoom-in image (Observation 3):\n<image>\n"
      "Continue your reasoning process inside <think> and </think>. If needed, continue to zoom in "
      "on the original image or any observation by outputting <grounding> and </grounding> as "
      "before. If the final answer is confirmed, put it inside <answer> and </answer>.")
  msg = prompts.observation_message(2, 3)
  assert msg["role"] == "user"
  assert [item["type"] for item in msg["content"]] == ["text", "image", "text"]
  assert prompts.render_content(msg["content"]) == text


def test_error_turn_and_inverse():
  text = prompts.error_turn("bad box.")
  assert text.startswith("ERROR occurs during grounding. Error Information: bad box.\n")
  assert "analyze the error" in text and "<think> and </think>" in text
  assert prompts.parse_error_turn(text) == "bad box."
  msg = prompts.error_message("bad box.")
  assert msg == {"role": "user", "content": [{"type": "text", "text": text}]}


def test_user_message_image_first():
  msg = prompts.user_message("Q?", None)
  assert msg["role"] == "user"
  assert msg["content"][0] == {"type": "image"}
  assert msg["content"][1] == {"type": "text", "text": prompts.question_prompt("Q?")}
  img = coord_image()
  assert prompts.user_message("Q?", image=img)["content"][0]["image"] is img


def test_stop_strings():
  assert prompts.STOP_STRINGS == ("</grounding>", "</answer>")


# ------------------------------------------------------------------------------------------------
# parse_action.


def test_parse_valid_call():
  action = tools.parse_action(call_text([0.1, 0.2, 0.3, 0.4]))
  assert action == ToolCall(bbox=(0.1, 0.2, 0.3, 0.4), source="original_image", source_index=0)


@pytest.mark.parametrize("payload, source, index", [
    ("{'bbox_2d': [0.1, 0.2, 0.3, 0.4], 'source': 'observation_2'}", "observation_2", 2),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4,], "source": "original_image",}', "original_image", 0),
    ('\n  {"bbox_2d": (0, 0.2, 1, 0.4), "source": " Observation_1 "}\n', "observation_1", 1),
])
def test_parse_lenient_syntax(payload, source, index):
  action = tools.parse_action(f"<grounding>{payload}</grounding>")
  assert isinstance(action, ToolCall), action
  assert action.source == source and action.source_index == index


def test_parse_takes_last_grounding_open_tag():
  text = ('<think>I will write <grounding> next.</think><grounding>'
          '{"bbox_2d": [0.5, 0.5, 0.6, 0.6], "source": "original_image"}</grounding>')
  assert tools.parse_action(text).bbox == (0.5, 0.5, 0.6, 0.6)


def test_turn_ends_at_first_stop_string():
  # Whatever closes first wins: the sampler would have stopped there.
  call = call_text([0.1, 0.1, 0.2, 0.2])
  assert isinstance(tools.parse_action(call + "<answer>B</answer>"), ToolCall)
  assert tools.parse_action("<answer>B</answer>" + call) == FinalAnswer("B")
  assert tools.truncate_at_stop("a</answer>b</grounding>") == "a</answer>"
  assert tools.truncate_at_stop("no stop") == "no stop"


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer> White. </answer>", FinalAnswer("White.")),
    ("<answer>6C71</answer>", FinalAnswer("6C71")),
    ("<answer>  </answer>", NoAction()),
    ("</answer>", NoAction()),
    ("<think>I give up.</think>", NoAction()),
    ("<answer>truncated", NoAction()),
    ('<grounding>{"bbox_2d": [0.1, 0.2', NoAction()),  # Cut mid-call: the sampler's max_response.
    ("", NoAction()),
])
def test_parse_answers_and_no_action(text, expected):
  assert tools.parse_action(text) == expected


BAD_CALLS = [
    ("", "empty"),
    ("not json at all", "not valid JSON"),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image"', "not valid JSON"),
    ("{bbox_2d: [0.1, 0.2, 0.3, 0.4], source: original_image}", "not valid JSON"),
    ('[{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image"}]', "one JSON object"),
    ('"original_image"', "one JSON object"),
    ('{"bbox": [0.1, 0.2, 0.3, 0.4], "source": "original_image"}', 'missing key "bbox_2d"'),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4]}', 'missing key "source"'),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image", "label": "cup"}',
     'unexpected key "label"'),
    ('{"bbox_2d": [0.1, 0.2, 0.3], "source": "original_image"}', "exactly 4 numbers"),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4, 0.5], "source": "original_image"}', "exactly 4 numbers"),
    ('{"bbox_2d": "0.1, 0.2, 0.3, 0.4", "source": "original_image"}', "must be a list of 4"),
    ('{"bbox_2d": {"x0": 0.1}, "source": "original_image"}', "must be a list of 4"),
    ('{"bbox_2d": [0.1, "0.2", 0.3, 0.4], "source": "original_image"}', "y0 is not a number"),
    ('{"bbox_2d": [0.1, 0.2, true, 0.4], "source": "original_image"}', "x1 is not a number"),
    ('{"bbox_2d": [0.1, 0.2, 0.3, null], "source": "original_image"}', "y1 is not a number"),
    ('{"bbox_2d": [[0.1], 0.2, 0.3, 0.4], "source": "original_image"}', "x0 is not a number"),
    ('{"bbox_2d": [NaN, 0.2, 0.3, 0.4], "source": "original_image"}', "x0 is not a finite number"),
    ('{"bbox_2d": [0.1, 0.2, Infinity, 0.4], "source": "original_image"}', "x1 is not a finite"),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 1e999], "source": "original_image"}', "y1 is not a finite"),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "image_1"}', 'unknown source "image_1"'),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "observation_x"}', "unknown source"),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": 1}', '"source" must be a string'),
    ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image"}' + " " * 3000, None),
    ("x" * 5000, "too long"),
    ('{"bbox_2d": [0.5, 0.2, 0.3, 0.4or 1], "source": "original_image"}', "not valid JSON"),  # a run-on number
]


@pytest.mark.parametrize("payload, fragment", BAD_CALLS)
def test_bad_calls_become_tool_call_errors(payload, fragment):
  with warnings.catch_warnings(record=True) as caught:  # the error turn says what is wrong, nothing else
    warnings.simplefilter("always")
    action = tools.parse_action(f"<think>t</think><grounding>{payload}</grounding>")
  assert not caught, [str(w.message) for w in caught]
  if fragment is None:  # Surrounding whitespace is fine.
    assert isinstance(action, ToolCall)
    return
  assert isinstance(action, ToolCallError), action
  assert fragment in action.message, action.message


def test_closing_tag_without_opening_tag():
  action = tools.parse_action('{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}</grounding>')
  assert isinstance(action, ToolCallError)
  assert "without <grounding>" in action.message


def test_literal_eval_fallback_never_runs_code(tmp_path):
  marker = tmp_path / "pwned"
  payload = ('{"bbox_2d": __import__("pathlib").Path(%r).touch(), "source": "original_image"}' %
             str(marker))
  action = tools.parse_action(f"<grounding>{payload}</grounding>")
  assert isinstance(action, ToolCallError)
  assert not marker.exists()


def test_parse_action_never_raises_on_random_text():
  fragments = [
      "<grounding>", "</grounding>", "<answer>", "</answer>", "{", "}", "[", "]", '"bbox_2d"',
      '"source"', ":", ",", "0.5", "-1", "1e400", "NaN", "'", '"', "observation_9",
      "original_image", "(", ")", "\\", "\n", "𝔁", "True", "None", "{1: 2}", "[[[[["
  ]
  rng = random.Random(0)
  for _ in range(2000):
    text = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 14)))
    action = tools.parse_action(text)
    assert isinstance(action, (ToolCall, FinalAnswer, NoAction, ToolCallError))


# ------------------------------------------------------------------------------------------------
# Sources.


def test_resolve_source():
  assert tools.resolve_source("original_image", 1) == 0
  assert tools.resolve_source("observation_3", 4) == 3
  with pytest.raises(CropError, match='count from observation_1; the original is "original_image"'):
    tools.resolve_source("observation_0", 1)  # the protocol names the original one way only
  with pytest.raises(
      CropError,
      match=r'"observation_7" does not exist; the available images are '
      r"original_image and observation_1 to observation_3"):
    tools.resolve_source("observation_7", 4)
  with pytest.raises(CropError, match="only original_image is available"):
    tools.resolve_source("observation_1", 1)
  with pytest.raises(CropError, match="original_image and observation_1$|observation_1\\.$"):
    tools.resolve_source("observation_2", 2)
  with pytest.raises(CropError, match="unknown source"):
    tools.resolve_source("obs_1", 3)


# ------------------------------------------------------------------------------------------------
# Crop.


def test_crop_exact_pixels():
  img = coord_image(200, 120)
  out = tools.crop(img, (0.1, 0.25, 0.5, 0.75))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(img)[30:90, 20:100])


def test_crop_rounding_floor_start_ceil_end():
  img = coord_image(200, 120)
  # 20.5 -> 20, 99.5 -> 100, 24.6 -> 24, 95.4 -> 96.
  assert tools.pixel_box((0.1025, 0.205, 0.4975, 0.795), img.size) == (20, 24, 100, 96)
  out = tools.crop(img, (0.1025, 0.205, 0.4975, 0.795))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(img)[24:96, 20:100])
  # 0.7 * 10 is 7.000000000000001 in floats; it must not grow the box by a pixel.
  assert tools.pixel_box((0.3, 0.0, 0.7, 1.0), (10, 40)) == (3, 0, 7, 40)


def test_crop_clamps_to_image():
  img = coord_image(200, 120)
  out = tools.crop(img, (-0.5, -0.2, 0.25, 0.5))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(img)[0:60, 0:50])
  out = tools.crop(img, (0.75, 0.5, 1.7, 3.0))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(img)[60:120, 150:200])


def test_crop_upscales_small_regions_with_lanczos():
  img = coord_image(200, 120)
  out = tools.crop(img, (0.1, 0.5, 0.15, 0.5 + 5 / 120))  # 10 x 5 px.
  assert out.size == (56, 28)
  expected = img.crop((20, 60, 30, 65)).resize((56, 28), Image.Resampling.LANCZOS)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
  assert tools.crop(img, (0, 0, 0.005, 0.5)).size == (28, 28 * 60)  # 1 x 60 px.
  assert tools.crop(img, (0, 0, 0.2, 0.5), min_side=64).size == (64, 96)  # 40 x 60 px.
  assert tools.crop(img, (0, 0, 0.2, 0.5)).size == (40, 60)  # Large enough: untouched.


def test_crop_palette_image_is_upscaled_as_rgb():
  img = coord_image(100, 100).convert("P")
  out = tools.crop(img, (0, 0, 0.1, 0.1))
  assert out.mode == "RGB" and out.size == (28, 28)


@pytest.mark.parametrize("bbox, fragment", [
    ((0.5, 0.1, 0.2, 0.3), "x1 (0.2) must be greater than x0 (0.5)"),
    ((0.1, 0.3, 0.2, 0.3), "y1 (0.3) must be greater than y0 (0.3)"),
    ((1.2, 0.1, 1.5, 0.3), "entirely outside the image"),
    ((-0.5, 0.0, 0.0, 1.0), "entirely outside the image"),
    ((0.1, -0.3, 0.5, -0.1), "entirely outside the image"),
    ((100, 50, 300, 200), "entirely outside the image"),
    ((0.5, 0.5, 0.5 + 1e-9, 0.6), "zero area"),
    ((0.2, 0.9999999999, 0.4, 1.5), "zero area"),
    ((0.0, 0.0, 1.0, 0.005), "aspect ratio 200"),
    ((0.1, 0.2, 0.3), "exactly 4 numbers"),
    ((0.1, float("nan"), 0.3, 0.4), "y0 is not a finite number"),
    ((0.1, 0.2, float("inf"), 0.4), "x1 is not a finite number"),
    (("0.1", 0.2, 0.3, 0.4), "x0 is not a number"),
])
def test_crop_rejects_bad_boxes(bbox, fragment):
  with pytest.raises(CropError) as info:
    tools.crop(coord_image(200, 120), bbox)
  assert fragment in info.value.message, info.value.message
  assert str(info.value) == info.value.message


def test_crop_aspect_ratio_limit():
  img = coord_image(199, 10)
  assert tools.crop(img, (0, 0, 1, 0.1)).size[0] == 199 * 28  # 199 x 1: ratio 199 is allowed.
  with pytest.raises(CropError, match="must be below 200"):
    tools.crop(coord_image(200, 10), (0, 0, 1, 0.1))  # 200 x 1.
  with pytest.raises(CropError, match="1x250 pixel region with aspect ratio 250"):
    tools.crop(coord_image(10, 250), (0, 0, 0.1, 1))  # Tall boxes too.
  with pytest.raises(CropError, match="must be below 50"):
    tools.crop(coord_image(200, 120), (0, 0, 1, 0.025), max_aspect=50)  # 200 x 3.


def test_apply_tool_call_uses_the_named_source():
  original = coord_image(200, 120, blue=0)
  obs1 = coord_image(100, 80, blue=11)
  obs2 = coord_image(60, 60, blue=22)
  images = [original, obs1, obs2]
  call = tools.parse_action(call_text([0.5, 0.5, 1.0, 1.0], "observation_1"))
  out = tools.apply_tool_call(call, images)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(obs1)[40:80, 50:100])
  call = tools.parse_action(call_text([0.0, 0.0, 0.5, 0.5], "observation_2"))
  np.testing.assert_array_equal(
      np.asarray(tools.apply_tool_call(call, images)),
      np.asarray(obs2)[0:30, 0:30])
  call = tools.parse_action(call_text([0.0, 0.0, 0.5, 0.5]))
  np.testing.assert_array_equal(
      np.asarray(tools.apply_tool_call(call, images)),
      np.asarray(original)[0:60, 0:100])


def test_apply_tool_call_unknown_source():
  images = [coord_image()] * 4
  call = tools.parse_action(call_text([0, 0, 1, 1], "observation_7"))
  assert isinstance(call, ToolCall)  # Only the images in hand tell that it does not exist.
  with pytest.raises(
      CropError, match="observation_7.*does not exist.*observation_1 to observation_3"):
    tools.apply_tool_call(call, images)


# ------------------------------------------------------------------------------------------------
# execute_turn: every bad call ends on the error path with a specific message.


@pytest.mark.parametrize("text, fragment", [
    ("<grounding>{oops}</grounding>", "not valid JSON"),
    (call_text([0.5, 0.1, 0.2, 0.3]), "must be greater than x0"),
    (call_text([0.5, 0.5, 0.5, 0.6]), "must be greater than x0"),
    (call_text([1.5, 0.5, 1.8, 0.6]), "entirely outside"),
    (call_text([0.5, 0.5, 0.5 + 1e-9, 0.6]), "zero area"),
    (call_text([0.0, 0.0, 1.0, 0.001]), "aspect ratio"),
    (call_text([0.0, 0.0, 1.0, 1.0], "observation_2"), '"observation_2" does not exist'),
    (call_text([0.0, 0.0, 1.0, 1.0], "observation_12"), "observation_1."),
])
def test_execute_turn_error_path(text, fragment):
  images = [coord_image(), coord_image(50, 40)]
  turn, image = traj_lib.execute_turn(text, images)
  assert image is None
  assert turn.observation_index is None
  assert fragment in turn.error, turn.error
  follow = turn.followup_message(0)
  assert prompts.render_content(follow["content"]).startswith("ERROR occurs during grounding.")


def test_execute_turn_success_and_terminal_turns():
  images = [coord_image()]
  turn, image = traj_lib.execute_turn(call_text([0, 0, 0.5, 0.5]), images)
  assert turn.observation_index == 1 and turn.error is None and image.size == (100, 60)
  turn, image = traj_lib.execute_turn("<answer>B</answer>", images)
  assert image is None and turn.action == FinalAnswer("B")
  assert traj_lib.terminal_stop_reason(turn.action) == "answer"
  turn, image = traj_lib.execute_turn("<think>hmm</think>", images)
  assert traj_lib.terminal_stop_reason(turn.action) == "no_action"
  assert turn.followup_message(0) is None


# ------------------------------------------------------------------------------------------------
# Trajectories.


@pytest.mark.parametrize(
    "stop_reason, overturn",
    [
        ("answer", False),
        ("no_action", False),  # A final turn without a well-formed answer is wrong, not over-turn.
        ("error", False),
        ("max_turns", True),  # Turn limit hit with a tool call pending.
        ("max_response", True),
        ("max_context", True),  # The next observation would not fit.
        ("image_limit", True),
    ])
def test_overturn_rule(stop_reason, overturn):
  assert traj_lib.overturn_from_stop_reason(stop_reason) is overturn


def test_overturn_rule_rejects_unknown_reason():
  with pytest.raises(ValueError, match="unknown stop_reason"):
    traj_lib.overturn_from_stop_reason("timeout")


def run_episode(texts, images, question="What is written on the sign?", options=None, max_turns=6):
  """A miniature of the sampler's host loop over scripted model outputs."""
  images = list(images)
  turns = []
  stop = None
  for k, text in enumerate(texts):
    action = tools.parse_action(text)
    if k == max_turns - 1 and isinstance(action, (ToolCall, ToolCallError)):
      turns.append(traj_lib.Turn(text))
      stop = "max_turns"
      break
    turn, image = traj_lib.execute_turn(text, images)
    turns.append(turn)
    if image is not None:
      images.append(image)
    stop = traj_lib.terminal_stop_reason(turn.action)
    if stop:
      break
  return traj_lib.Trajectory(
      question=question,
      images=images,
      turns=turns,
      stop_reason=stop,
      options=options,
      gold="B",
      id="ex1")


SCRIPT = [
    call_text([0.0, 0.0, 0.5, 0.5]),
    call_text([0.5, 0.5, 0.2, 0.2], "observation_1"),  # Degenerate: error turn.
    call_text([0.5, 0.5, 1.0, 1.0], "observation_1"),
    "<think>Found it.</think><answer>B</answer>",
]


def test_trajectory_messages():
  traj = run_episode(SCRIPT, [coord_image()], options=["cat", "dog"])
  assert traj.num_turns == 4 and traj.stop_reason == "answer" and not traj.overturn
  assert traj.final_answer == "B"
  assert len(traj.images) == 3
  kinds = [type(a).__name__ for a in traj.actions]
  assert kinds == ["ToolCall", "ToolCall", "ToolCall", "FinalAnswer"]
  msgs = traj.to_messages()
  assert [m["role"] for m in msgs] == ["user"] + ["assistant", "user"] * 3 + ["assistant"]
  assert msgs[0] == prompts.user_message(traj.question, ["cat", "dog"])
  assert msgs[2] == prompts.observation_message(0, 1)
  assert msgs[4]["content"][0]["text"].startswith("ERROR occurs during grounding.")
  assert msgs[6] == prompts.observation_message(2, 2)  # Action 2 gave Observation 2.
  assert msgs[7] == {"role": "assistant", "content": SCRIPT[3]}
  assert sum(prompts.count_images(m["content"]) for m in msgs) == len(traj.images)
  embedded = traj.to_messages(embed_images=True)
  assert embedded[0]["content"][0]["image"] is traj.images[0]
  assert embedded[6]["content"][1]["image"] is traj.images[2]


def test_trajectory_from_messages_round_trip():
  traj = run_episode(SCRIPT, [coord_image()], options=["cat", "dog"])
  back = traj_lib.Trajectory.from_messages(traj.to_messages(), traj.images, gold="B", id="ex1")
  assert back == traj
  # Images embedded in the messages are picked up when not given.
  back = traj_lib.Trajectory.from_messages(traj.to_messages(embed_images=True), gold="B", id="ex1")
  assert back == traj


@pytest.mark.parametrize("texts, stop_reason", [
    (["<answer>x</answer>"], "answer"),
    (["<think>no idea</think>"], "no_action"),
    ([call_text([0, 0, 0.5, 0.5])] * 3, "max_turns"),
    ([call_text([0, 0, 0.5, 0.5])] + ["<grounding>{bad}</grounding>"] * 2, "max_turns"),
])
def test_stop_reason_inferred_from_messages(texts, stop_reason):
  traj = run_episode(texts, [coord_image()], max_turns=3)
  assert traj.stop_reason == stop_reason
  back = traj_lib.Trajectory.from_messages(traj.to_messages(), traj.images)
  assert back.stop_reason == stop_reason
  assert back.overturn is (stop_reason == "max_turns")


def test_from_messages_foreign_templates():
  observation = [
      {"type": "text", "text": "After the above Action 0, ... (Observation 1):\n"},
      {"type": "image"},
      {"type": "text", "text": "\nContinue..."},
  ]
  error = ("ERROR occurs during grounding. Error Information: The bounding box is not valid.\n"
           "Please analyze ... Countinue ...")
  messages = [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "<image>\nWhat is the number on the bus?"},
      {"role": "assistant", "content": call_text([0.1, 0.1, 0.6, 0.6])},
      {"role": "user", "content": observation},
      {"role": "assistant", "content": call_text([0.1, 0.1, 0.1, 0.6])},
      {"role": "user", "content": error},
      {"role": "assistant", "content": [{"type": "text", "text": "<answer>42</answer>"}]},
  ]
  traj = traj_lib.Trajectory.from_messages(
      messages, ["orig.jpg", "crop1.png"], stop_reason="answer")
  assert traj.prompt == "\nWhat is the number on the bus?"
  assert traj.metadata["system"] == "You are a helpful assistant."
  assert traj.turns[1].error == "The bounding box is not valid."
  assert traj.final_answer == "42"
  msgs = traj.to_messages()  # Re-rendered in our templates, prompt kept verbatim.
  assert msgs[0]["content"][1]["text"] == "\nWhat is the number on the bus?"
  assert msgs[2] == prompts.observation_message(0, 1)
  assert msgs[4] == prompts.error_message("The bounding box is not valid.")


def test_from_messages_rejects_inconsistent_data():
  user = prompts.user_message("Q?")
  with pytest.raises(ValueError, match="images given"):
    traj_lib.Trajectory.from_messages(
        [user, {
            "role": "assistant",
            "content": "<answer>a</answer>"
        }], ["a.png", "b.png"])
  with pytest.raises(ValueError, match="not embedded"):
    traj_lib.Trajectory.from_messages([user])
  with pytest.raises(ValueError, match="observation but its action"):
    traj_lib.Trajectory.from_messages([
        user, {
            "role": "assistant",
            "content": "<think>no call</think>"
        },
        prompts.observation_message(0, 1)
    ], ["a.png", "b.png"])


def test_turn_and_trajectory_validation():
  with pytest.raises(ValueError):
    traj_lib.Turn("<answer>x</answer>", error="boom")
  with pytest.raises(ValueError):
    traj_lib.Turn(call_text([0, 0, 1, 1]), observation_index=1, error="boom")
  traj = traj_lib.Trajectory(
      question="Q?",
      images=["a.png"],
      turns=[traj_lib.Turn(call_text([0, 0, 1, 1]), observation_index=1)])
  with pytest.raises(ValueError, match="observation indices"):
    traj.to_messages()


def test_json_round_trip(tmp_path):
  traj = run_episode(SCRIPT, [coord_image()], options=["cat", "dog"])
  traj.metadata["correct"] = True
  with pytest.raises(TypeError, match="save_images"):
    traj.to_json()
  saved = traj.save_images(tmp_path / "images", relative_to=tmp_path)
  assert saved.images == ["images/ex1_0.png", "images/ex1_1.png", "images/ex1_2.png"]
  path = tmp_path / "cold_start.jsonl"
  traj_lib.write_jsonl(path, [saved, saved])
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert rows[0]["overturn"] is False and rows[0]["num_turns"] == 4
  assert rows[0]["final_answer"] == "B"
  assert rows[0]["turns"][1]["action"]["type"] == "tool_call"
  assert rows[0]["messages"][0]["content"][0] == {"type": "image"}
  loaded = traj_lib.read_jsonl(path)
  assert loaded == [saved, saved]
  reopened = loaded[0].load_images(tmp_path)
  for a, b in zip(reopened.images, traj.images):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A record holding only messages + images (another writer's format) loads too.
  only_messages = {
      "messages": rows[0]["messages"],
      "images": rows[0]["images"],
      "id": "ex1",
      "gold": "B",
      "metadata": {
          "correct": True
      }
  }
  assert traj_lib.Trajectory.from_json_dict(only_messages) == saved
