"""Token-level stop-string matching that runs on the device.

A stop string such as `</grounding>` may be spelled by several BPE tokens (`</`, `ground`, `ing`, `>`)
or end inside a token (`>\\n`). Checking the decoded tail on the host after every token would need a
host round trip per token, so instead we compile the stop strings into a byte-level Aho-Corasick
automaton and lift it to tokens: `table[state, token]` is the automaton state after reading that
token's bytes from `state`. The decode loop then tracks one int32 state per slot and stops a slot the
step its state becomes `match_state` (absorbing). The table is built once per tokenizer
([states, vocab] int32; about 20 states x 152k tokens = 12 MB for Qwen with the two protocol strings).

Text is matched from the start of each assistant turn (the prompt is not part of it), as vLLM does.
The token that completes a stop string may carry bytes after it; those stay in the token ids (they
are what the model generated and what the cache holds) and are cut from the turn text by
`agent.tools.truncate_at_stop`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from mini_o3_jax.processing import tokenizer as tokenizer_lib


def token_bytes(tokenizer, vocab_size: int | None = None) -> list[bytes]:
  """The bytes each token id decodes to (added tokens: their literal text; ids past the tokenizer: b"")."""
  n = len(tokenizer) if vocab_size is None else vocab_size
  out = [b""] * n
  decoder = {c: b for b, c in tokenizer_lib.byte_to_unicode().items()}
  added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
  for piece, i in tokenizer.get_vocab().items():
    if i >= n:
      continue
    if i in added:
      out[i] = added[i].encode("utf-8")
    elif all(c in decoder for c in piece):
      out[i] = bytes(decoder[c] for c in piece)
    else:  # not a byte-level vocabulary: fall back to the tokenizer's own decoding
      out[i] = tokenizer.decode([i]).encode("utf-8")
  return out


def _byte_automaton(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """Aho-Corasick as a full DFA: delta [nodes, 256] int32 and is_match [nodes] bool."""
  goto: list[dict[int, int]] = [{}]
  match = [False]
  for p in patterns:
    node = 0
    for b in p:
      if b not in goto[node]:
        goto.append({})
        match.append(False)
        goto[node][b] = len(goto) - 1
      node = goto[node][b]
    match[node] = True
  n = len(goto)
  delta = np.zeros((n, 256), np.int32)
  fail = [0] * n
  queue = collections.deque()
  for b in range(256):
    child = goto[0].get(b)
    if child is not None:
      delta[0, b] = child
      queue.append(child)
  while queue:  # breadth first, so a node's fail target is complete before the node
    node = queue.popleft()
    match[node] = match[node] or match[fail[node]]
    for b in range(256):
      child = goto[node].get(b)
      if child is None:
        delta[node, b] = delta[fail[node], b]
      else:
        fail[child] = delta[fail[node], b]
        delta[node, b] = child
        queue.append(child)
  return delta, np.asarray(match)


@dataclasses.dataclass(frozen=True)
class StopMatcher:
  """Per-token transition table of the stop-string automaton.

  table: int32 [states, vocab]; state 0 is the start of a turn, `match_state` means a stop string
  has been completed (it maps every token to itself). match_state is -1 when there are no strings.
  """
  table: np.ndarray
  match_state: int
  stop_strings: tuple[str, ...]

  @classmethod
  def none(cls, vocab_size: int) -> StopMatcher:
    return cls(np.zeros((1, vocab_size), np.int32), -1, ())

  @classmethod
  def from_token_bytes(cls, pieces: Sequence[bytes], stop_strings: Sequence[str]) -> StopMatcher:
    vocab = len(pieces)
    stop_strings = tuple(s for s in stop_strings if s)
    if not stop_strings:
      return cls.none(vocab)
    delta, is_match = _byte_automaton([s.encode("utf-8") for s in stop_strings])
    # Collapse every matching node into one absorbing state (the last id).
    keep = np.flatnonzero(~is_match)
    remap = np.full(len(delta), len(keep), np.int32)
    remap[keep] = np.arange(len(keep), dtype=np.int32)
    n_states = len(keep) + 1
    dfa = np.empty((n_states, 256), np.int32)
    dfa[:-1] = remap[delta[keep]]
    dfa[-1] = n_states - 1
    # Run every token's bytes from every state at once; tokens sorted by length so that step j only
    # touches the tokens that still have a j-th byte.
    lengths = np.fromiter((len(p) for p in pieces), np.int64, vocab)
    order = np.argsort(-lengths, kind="stable")
    max_len = int(lengths.max()) if vocab else 0
    byte_mat = np.zeros((vocab, max(max_len, 1)), np.uint8)
    for i, p in enumerate(pieces):
      if p:
        byte_mat[i, :len(p)] = np.frombuffer(p, np.uint8)
    state = np.broadcast_to(np.arange(n_states, dtype=np.int32)[:, None], (n_states, vocab)).copy()
    sorted_lengths = lengths[order]
    for j in range(max_len):
      count = int(np.searchsorted(-sorted_lengths, -j, side="left"))  # tokens with length > j
      ids = order[:count]
      state[:, ids] = dfa[state[:, ids], byte_mat[ids, j][None, :]]
    return cls(state, n_states - 1, stop_strings)

  @classmethod
  def build(cls, tokenizer, stop_strings: Sequence[str], vocab_size: int | None = None) -> StopMatcher:
    """The matcher for `stop_strings` over `tokenizer`'s vocabulary (padded to the model's `vocab_size`)."""
    return cls.from_token_bytes(token_bytes(tokenizer, vocab_size), stop_strings)

  def run(self, tokens: Sequence[int], state: int = 0) -> int:
    """Host-side reference: the state after `tokens` (stays at match_state once reached)."""
    for t in tokens:
      state = int(self.table[state, t])
    return state
