"""Chat template rendering, tokenisation with loss masks, parity with Qwen2_5_VLProcessor."""

import warnings

import numpy as np
import PIL.Image
import pytest

from mini_o3_jax.processing import chat
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tok_lib

IMG = {"type": "image"}


def _text(s):
  return {"type": "text", "text": s}


QUESTION = ("Where is the red umbrella? Think inside <think> </think>, zoom with "
            "<grounding>...</grounding>, answer inside <answer></answer>.")
OBSERVATION = ("After the above Action 1, here is the zoom-in image (Observation 1).\n"
               "Continue your reasoning process inside <think> and </think>.")

CONVERSATIONS = {
    "single_image": [{"role": "user", "content": [IMG, _text("Describe this image.")]}],
    "string_content": [{"role": "user", "content": "Hi there!"},
                       {"role": "assistant", "content": "Hello! How can I help?"}],
    "with_system": [
        {"role": "system", "content": "You are a careful visual searcher."},
        {"role": "user", "content": [IMG, _text(QUESTION)]},
        {"role": "assistant", "content": "<think>Top left.</think> <grounding>{\"bbox_2d\": "
                                         "[0.0, 0.0, 0.5, 0.5], \"source\": \"original_image\"}"
                                         "</grounding>"},
    ],
    "system_as_parts": [
        {"role": "system", "content": [_text("Be brief.")]},
        {"role": "user", "content": [_text("Two images: "), IMG, _text(" and "), IMG]},
    ],
    "multi_turn_trajectory": [
        {"role": "user", "content": [IMG, _text(QUESTION)]},
        {"role": "assistant", "content": [_text("<think>Maybe the left side.</think>\n"
                                                "<grounding>{\"bbox_2d\": [0.1, 0.2, 0.4, 0.6], "
                                                "\"source\": \"original_image\"}</grounding>")]},
        {"role": "user", "content": [_text(OBSERVATION), IMG]},
        {"role": "assistant", "content": "<think>Not here.</think> <grounding>{\"bbox_2d\": "
                                         "[0.5, 0.2, 0.9, 0.6], \"source\": \"original_image\"}"
                                         "</grounding>"},
        {"role": "user", "content": [IMG, _text(OBSERVATION.replace("1", "2"))]},
        {"role": "assistant", "content": "<think>Found it.</think> <answer>blue</answer>"},
    ],
    "image_keys": [{"role": "user", "content": [{"image": "file://a.jpg"},
                                                {"type": "image_url", "image_url": "x"},
                                                {"type": "text", "text": "Compare."}]}],
    "odd_whitespace": [
        {"role": "user", "content": "  spaced  \n\n"},
        {"role": "assistant", "content": "\n\nleading newlines and trailing spaces   "},
        {"role": "user", "content": [_text(""), IMG, _text("\n")]},
        {"role": "assistant", "content": " x"},
    ],
}


@pytest.fixture(scope="module")
def qwen():
  return tok_lib.build_qwen_tokenizer()


@pytest.fixture(scope="module")
def small():
  corpus = [chat.render_chat(c) for c in CONVERSATIONS.values()] * 5
  return tok_lib.build_small_tokenizer(corpus, vocab_size=380)


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_matches_jinja_template(qwen, name, gen):
  messages = CONVERSATIONS[name]
  want = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
  assert chat.render_chat(messages, add_generation_prompt=gen) == want
  with_ids = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                      add_vision_id=True)
  assert chat.render_chat(messages, add_generation_prompt=gen, add_vision_id=True) == with_ids


def test_render_layout():
  text = chat.render_chat(CONVERSATIONS["single_image"], add_generation_prompt=True)
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                  "Describe this image.<|im_end|>\n<|im_start|>assistant\n")
  no_sys = chat.render_chat(CONVERSATIONS["single_image"], add_default_system=False)
  assert no_sys.startswith("<|im_start|>user\n")
  assert chat.render_chat([]) == ""
  assert chat.count_images(CONVERSATIONS["multi_turn_trajectory"]) == 3


class _ProcessorWithoutVideo:
  """Builds transformers' Qwen2_5_VLProcessor without torchvision's video processor."""

  @staticmethod
  def make(tokenizer, min_pixels, max_pixels):
    qwen25 = pytest.importorskip("transformers.models.qwen2_5_vl.processing_qwen2_5_vl")
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

    class Processor(qwen25.Qwen2_5_VLProcessor):

      def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
          return None  # the video class needs torchvision; images never touch it
        return super().check_argument_for_proper_class(argument_name, argument)

    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return Processor(
          image_processor=pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels,
                                                       max_pixels=max_pixels),
          tokenizer=tokenizer, chat_template=tok_lib.QWEN25VL_CHAT_TEMPLATE)


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  sizes = [(120, 90), (57, 213), (300, 300), (40, 41)]
  return [PIL.Image.fromarray(rng.integers(0, 256, sizes[i % 4] + (3,), dtype=np.uint8))
          for i in range(n)]


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", ["single_image", "with_system", "system_as_parts",
                                  "multi_turn_trajectory", "string_content", "odd_whitespace"])
def test_ids_match_qwen25vl_processor(qwen, name, gen):
  messages = CONVERSATIONS[name]
  min_pixels, max_pixels = 4 * 28 * 28, 64 * 28 * 28
  processor = _ProcessorWithoutVideo.make(qwen, min_pixels, max_pixels)
  images = _images(chat.count_images(messages))
  text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = processor(text=[text], images=images or None, return_tensors="np")

  processed = [image_lib.preprocess_image(im, min_pixels, max_pixels) for im in images]
  grids = [g for _, g in processed]
  got = chat.tokenize_conversation(qwen, messages, grids, add_generation_prompt=gen)
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"][0])
  np.testing.assert_array_equal(got["mm_token_type_ids"], want["mm_token_type_ids"][0])
  if images:
    np.testing.assert_allclose(np.concatenate([pv for pv, _ in processed]),
                               want["pixel_values"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.stack(grids), want["image_grid_thw"])
  assert got["input_ids"].dtype == np.int32
  assert got["loss_mask"].shape == got["input_ids"].shape


def _expected_generated(messages):
  """The text the assistant generates: each assistant content followed by <|im_end|>."""
  out = []
  for m in messages:
    if m["role"] == "assistant":
      c = m["content"]
      body = c if isinstance(c, str) else "".join(p.get("text", "") for p in c)
      out.append(body + "<|im_end|>")
  return out


@pytest.mark.parametrize("which", ["qwen", "small"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_loss_mask_covers_exactly_assistant_output(request, which, name):
  tok = request.getfixturevalue(which)
  messages = CONVERSATIONS[name]
  grids = [[1, 4, 6]] * chat.count_images(messages)
  out = chat.tokenize_conversation(tok, messages, grids)
  ids, mask, mm = out["input_ids"], out["loss_mask"], out["mm_token_type_ids"]
  ids_special = tok_lib.special_token_ids(tok)

  # Ids equal tokenising the whole prompt, pads expanded after.
  whole = tok.encode(chat.render_chat(messages), add_special_tokens=False)
  expanded = [t for w in whole for t in ([w] * 6 if w == ids_special["image_token_id"] else [w])]
  np.testing.assert_array_equal(ids, expanded)

  assert (mm == (ids == ids_special["image_token_id"])).all()
  assert mm.sum() == 6 * len(grids)
  assert not (mask & mm).any()

  # Contiguous runs of mask==1 decode to the assistant turns, each ending in <|im_end|>.
  runs, cur = [], []
  for t, m in zip(ids.tolist(), mask.tolist()):
    if m:
      cur.append(t)
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  want = _expected_generated(messages)
  got = [tok.decode(r) for r in runs]
  assert len(got) == len(want)
  for g, w in zip(got, want):
    # A token that merges the header's "\n" with content starting with newlines
    # carries generated text, so it is trained on (only in "odd_whitespace").
    assert g == w or (name == "odd_whitespace" and g == "\n" + w), (g, w)
  for r in runs:
    assert r[-1] == ids_special["im_end_token_id"]


def test_mask_excludes_header_and_trailing_newline(qwen):
  messages = CONVERSATIONS["string_content"]
  out = chat.tokenize_conversation(qwen, messages, [], add_default_system=False)
  toks = qwen.convert_ids_to_tokens(out["input_ids"].tolist())
  masked = [t for t, m in zip(toks, out["loss_mask"]) if m]
  assert masked[-1] == "<|im_end|>" and masked[0] == "Hello"
  i = len(toks) - 1 - toks[::-1].index("assistant")
  assert toks[i - 1:i + 2] == ["<|im_start|>", "assistant", "Ċ"]
  assert out["loss_mask"][i - 1:i + 2].tolist() == [0, 0, 0]
  assert toks[-1] == "Ċ" and out["loss_mask"][-1] == 0


def test_generation_prompt_has_no_loss(qwen):
  out = chat.tokenize_conversation(qwen, CONVERSATIONS["single_image"], [[1, 2, 2]],
                                   add_generation_prompt=True)
  assert out["loss_mask"].sum() == 0
  assert qwen.decode(out["input_ids"][-3:]) == "<|im_start|>assistant\n"


def test_image_token_counts(small):
  messages = CONVERSATIONS["multi_turn_trajectory"]
  grids = [np.array([1, 4, 6]), [1, 2, 2], (1, 8, 8)]
  out = chat.tokenize_conversation(small, messages, grids)
  image_id = tok_lib.special_token_ids(small)["image_token_id"]
  ids = out["input_ids"]
  starts = np.flatnonzero(ids == tok_lib.special_token_ids(small)["vision_start_token_id"])
  runs = [int(np.argmax(ids[s + 1:] != image_id)) for s in starts]
  assert runs == [6, 1, 16]
  out4 = chat.tokenize_conversation(small, messages, grids, merge_size=1)
  assert out4["mm_token_type_ids"].sum() == 24 + 4 + 64


def test_errors(small):
  messages = CONVERSATIONS["multi_turn_trajectory"]
  with pytest.raises(ValueError, match="3 image placeholder"):
    chat.tokenize_conversation(small, messages, [[1, 2, 2]])
  with pytest.raises(ValueError, match="divisible"):
    chat.tokenize_conversation(small, messages, [[1, 2, 2], [1, 2, 2], [1, 3, 3]])
  with pytest.raises(ValueError, match="3 positive"):
    chat.tokenize_conversation(small, messages, [[1, 2, 2], [1, 2], [1, 2, 2]])
  with pytest.raises(ValueError, match="video"):
    chat.tokenize_conversation(small, [{"role": "user", "content": [{"type": "video"}]}], [])
  with pytest.raises(ValueError, match="literal"):
    chat.tokenize_conversation(small, [{"role": "user", "content": "<|image_pad|>"}], [])
  with pytest.raises(ValueError, match="role"):
    chat.render_chat([{"content": "x"}])
  with pytest.raises(ValueError, match="content"):
    chat.render_chat([{"role": "user", "content": None}])
