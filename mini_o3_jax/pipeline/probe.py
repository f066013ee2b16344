"""Which skill a demo policy lacks: teacher-forced accuracy by kind of token on held-out trajectories.

The scripted cold-start trajectories need four kinds of tokens beyond the protocol's fixed wording:

  goal        copy the target's colour and shape from the question ("I need the digit on the| red| cross");
  box_xy      the tenths digits of a crop's x0 and y0 (where to look, to a tenth of the image or crop);
  box_rest    the other digits of a crop's coordinates (hundredths; x1, y1 follow from x0, y0 and the size);
  read        a digit written outside a box: read off a crop ("... with the digit 7", "... is 7",
              <answer>7</answer>);
  cell        the grid cell a window-first search names before its first crop ("... in cell| 5"), or opens its
              first turn with (`first_crop="cell_reflex"`: "|5 <grounding>...").

Sampled evaluations mix them: a policy that never names the target also never crops it. Running the
model over correct trajectories of the test split (teacher forcing) and scoring its next-token argmax
per kind separates them, so the report says which one is missing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mini_o3_jax.data import coldstart, loader
from mini_o3_jax.train import batch as batch_lib
from mini_o3_jax.train import forward as forward_lib
from mini_o3_jax.train import losses

KINDS = ("goal", "box_xy", "box_rest", "cell", "read", "other")
GOAL_PHRASE = coldstart.GOAL_PREFIX
GOAL_WORDS = 2  # colour, shape
CELL_PHRASE = coldstart.CELL_PHRASE
TURN_START = "<|im_start|>assistant\n"  # a `cell_reflex` first crop opens its turn with the cell


def token_kinds(pieces: Sequence[str], loss_mask: Sequence[int]) -> list[str | None]:
  """The kind of every token (None outside the assistant's turns), from the decoded token strings.

  A goal is the two words after GOAL_PHRASE, whether the phrase is one token or several; a coordinate
  digit is a digit token between '[' and ']' in the assistant's text (the bbox list), box_xy when it is
  the first or second digit that follows a token ending in '.' in that list (x0's and y0's tenths); any
  other digit token ("7" or "7.") is read (but an observation's index), or cell right after CELL_PHRASE or as
  a turn's first token.
  """
  kinds: list[str | None] = []
  text_so_far = ""
  goal_left, in_box, prev, tenths_seen = 0, False, "", 0
  for piece, m in zip(pieces, loss_mask):
    kind = None
    if m:
      if goal_left and piece.strip():
        kind, goal_left = "goal", goal_left - 1
      elif in_box:
        kind = "other"
        if piece.strip().isdigit():
          tenths = prev.endswith(".")
          kind = "box_xy" if tenths and tenths_seen < 2 else "box_rest"
          tenths_seen += tenths
      elif piece.strip().rstrip(".").isdigit() and (text_so_far.rstrip().endswith(CELL_PHRASE)
                                                    or text_so_far.endswith(TURN_START)):
        kind = "cell"  # named in a thought, or a reflex first crop's leading digit
      elif piece.strip().rstrip(".").isdigit() and not prev.endswith("observation_"):
        kind = "read"  # "7" or, where the vocabulary merges them, "7."
      else:
        kind = "other"
    kinds.append(kind)
    text_so_far = (text_so_far + piece)[-256:]
    if m and text_so_far.endswith(GOAL_PHRASE):
      goal_left = GOAL_WORDS
    if not m:
      in_box = False
    elif "[" in piece or "]" in piece:  # a coordinate list opens at the last '[' and closes at ']'
      in_box = piece.rfind("[") > piece.rfind("]")
      tenths_seen = 0
    prev = piece
  return kinds


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  seq_len: int = 768  # one compiled shape: longer trajectories are dropped
  batch_size: int = 16
  patch_multiple: int = 256  # patches pad to a multiple of this (the longest row's need, rounded up)


@functools.lru_cache(maxsize=4)
def correct_fn(graphdef):
  """A jitted (params, inputs, targets) -> [batch, seq - 1] next-token argmax hits, one per graphdef."""
  @jax.jit
  def correct(params, inputs, targets):
    model = nnx.merge(graphdef, params)
    hidden = forward_lib.hidden_states(model, inputs)[:, :-1]
    return forward_lib.head_token_stats(model, hidden, targets, correct=True)["correct"]
  return correct


def kind_accuracy(model, tokenizer, trajectories, example_config: loader.ExampleConfig, model_config,
                  config: ProbeConfig = ProbeConfig()) -> dict[str, float]:
  """Teacher-forced next-token accuracy per kind over `trajectories`.

  Also "n_<kind>" (token counts) and "prior_<kind>": the accuracy of always writing the kind's most
  frequent token, the score of a policy that ignores the question and the image.
  """
  example_config = dataclasses.replace(example_config, max_tokens=config.seq_len)
  examples = [e for e in loader.examples_dataset(trajectories, tokenizer, example_config, drop_long=True)]
  if not examples:
    raise ValueError(f"no trajectory fits the probe's {config.seq_len} tokens")
  # Shapes are forced below (seq_len, num_patches), so the config's buckets are never consulted.
  batch_config = batch_lib.BatchConfig(batch_size=config.batch_size, pad_token_id=model_config.text.pad_token_id)
  need = max(len(e["pixel_values"]) for e in examples)
  num_patches = -(-need // config.patch_multiple) * config.patch_multiple
  graphdef, params = nnx.split(model)
  hits_fn = correct_fn(graphdef)
  hits = {k: 0.0 for k in KINDS}
  counts = {k: 0 for k in KINDS}
  targets_seen = {k: collections.Counter() for k in KINDS}
  for start in range(0, len(examples), config.batch_size):
    chunk = examples[start:start + config.batch_size]
    batch = batch_lib.collate_sft(chunk, model_config, batch_config, seq_len=config.seq_len,
                                  num_patches=num_patches)
    targets, _ = losses.next_token_targets(batch.inputs.input_ids, batch.loss_mask)
    correct = np.asarray(hits_fn(params, batch.inputs, jnp.asarray(targets)))  # [batch, seq - 1]
    for row, ex in enumerate(chunk):
      ids = [int(i) for i in ex["input_ids"]]
      kinds = token_kinds([tokenizer.decode([i]) for i in ids], ex["loss_mask"])
      for t in range(1, len(ids)):  # position t - 1 predicts token t
        if kinds[t] is not None:
          hits[kinds[t]] += float(correct[row, t - 1])
          counts[kinds[t]] += 1
          targets_seen[kinds[t]][ids[t]] += 1
  out = {k: hits[k] / counts[k] for k in KINDS if counts[k]}
  out.update({f"n_{k}": counts[k] for k in KINDS})
  out.update({f"prior_{k}": max(targets_seen[k].values()) / counts[k] for k in KINDS if counts[k]})
  return out
