"""Answer extraction and judging: normalised exact match, option letters, and an LLM-judge hook.

The rule judge is the offline default (say so when reporting); the original scores VisualProbe with
an LLM judge answering "Score: 0/1", which `LLMJudge` reproduces given any text-completion callable.
"""

from __future__ import annotations

import dataclasses
import re
import string
import unicodedata
from typing import Callable, Protocol, Sequence

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


def extract_answer(text: str | None) -> str | None:
  """Content of the last complete `<answer>…</answer>`, stripped; None if missing or empty."""
  if not text:
    return None
  end = text.rfind(ANSWER_CLOSE)
  if end < 0:
    return None
  start = text.rfind(ANSWER_OPEN, 0, end)
  if start < 0:
    return None
  answer = text[start + len(ANSWER_OPEN):end].strip()
  return answer or None


# --------------------------------------------------------------------------------------------------
# Normalisation and exact match.

_NUMBER_WORDS = {
    w: str(i) for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split())
}
_NUMBER_WORD_RE = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b")
_ARTICLE_RE = re.compile(r"\b(?:a|an|the)\b")
# A standalone number: integer part with optional thousands commas, optional decimal part.
_NUMBER_RE = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?![\w]|[.,]\d)")
_ASCII_PUNCT = frozenset(string.punctuation)


def _canonical_number(match: re.Match[str]) -> str:
  # "1,000" -> "1000", "67.200" -> "67.2", "5.0" -> "5"; the integer part keeps leading zeros
  # because short answers are often codes ("0071").
  integer = match.group(1).replace(",", "")
  fraction = (match.group(2) or "").rstrip("0")
  return f"{integer}.{fraction}" if fraction else integer


def _is_punct(ch: str) -> bool:
  return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def _strip_punctuation(s: str) -> str:
  """Punctuation -> space, except a decimal point between digits."""
  out = []
  for i, ch in enumerate(s):
    keep_decimal = (ch == "." and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit())
    out.append(" " if _is_punct(ch) and not keep_decimal else ch)
  return "".join(out)


def normalize_answer(s: str) -> str:
  """Canonical form of a short free-form answer.

  NFKC, lowercase; numbers canonicalised before punctuation goes ("67.200 LBS" -> "67.2 lbs",
  "1,000" -> "1000"); punctuation becomes spaces ("White." -> "white"); number words up to twenty
  become digits ("six" -> "6"); articles go unless nothing else is left (a bare "A" stays "a");
  whitespace collapses.
  """
  s = unicodedata.normalize("NFKC", s).lower()
  s = _NUMBER_RE.sub(_canonical_number, s)
  s = _strip_punctuation(s)
  s = _NUMBER_WORD_RE.sub(lambda m: _NUMBER_WORDS[m.group(1)], s)
  without_articles = _ARTICLE_RE.sub(" ", s)
  if without_articles.strip():
    s = without_articles
  return " ".join(s.split())


def _same_normalized(a: str, b: str) -> bool:
  # Spacing differences ("6C 71" / "6C71", "left-hand" / "lefthand") do not change a short answer.
  return bool(a) and (a == b or a.replace(" ", "") == b.replace(" ", ""))


def judge_exact(pred: str | None, gold: str | Sequence[str]) -> bool:
  """Normalised exact match against one gold answer or any of several."""
  if pred is None:
    return False
  golds = [gold] if isinstance(gold, str) else list(gold)
  p = normalize_answer(pred)
  return any(_same_normalized(normalize_answer(g), p) for g in golds)


# --------------------------------------------------------------------------------------------------
# Multiple choice.

_CHOICE_PREFIX_RE = re.compile(
    r"^\s*(?:the\s+)?(?:final\s+|correct\s+|best\s+)?(?:answer|option|choice)\b"
    r"\s*(?:is\b)?\s*[:：]?\s*",
    re.IGNORECASE)
_LETTER_ONLY_RE = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:]?$")
_LETTER_TEXT_RE = re.compile(r"^[(\[]?([A-Za-z])(?:[)\]][.:]?|[.:])\s+(.+)$", re.DOTALL)
_STANDALONE_LETTER_RE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def _letter_index(letter: str) -> int:
  return ord(letter.upper()) - ord("A")


def _in_range(letter: str, options: Sequence[str] | None) -> bool:
  return options is None or 0 <= _letter_index(letter) < len(options)


def _matching_options(text: str, options: Sequence[str] | None) -> list[str]:
  if not options:
    return []
  t = normalize_answer(text)
  return [
      chr(ord("A") + i)
      for i, opt in enumerate(options)
      if _same_normalized(normalize_answer(opt), t)
  ]


def parse_choice(pred: str | None, options: Sequence[str] | None = None) -> str | None:
  """The option letter a prediction names, or None if it names none or several.

  Accepted: "B", "b", "(B)", "B.", "B. text", "B) text", "Answer: B", "The answer is (B).", the
  option text itself (normalised), or free text in which exactly one capital letter of the option
  range stands alone ("I think B is correct"); "A" / "I" before a lowercase word are read as English
  words. "B. text" whose text is another option's text or names another letter ("(B) or (C)") is
  ambiguous and rejected.
  """
  if not pred:
    return None
  s = _CHOICE_PREFIX_RE.sub("", pred.strip(), count=1).strip()
  m = _LETTER_ONLY_RE.match(s)
  if m and _in_range(m.group(1), options):
    return m.group(1).upper()
  m = _LETTER_TEXT_RE.match(s)
  if m and _in_range(m.group(1), options):
    letter = m.group(1).upper()
    tail = m.group(2)
    others = (set(_matching_options(tail, options)) | _standalone_letters(tail, options)) - {letter}
    return None if others else letter
  by_text = _matching_options(s, options)
  if by_text:
    return by_text[0] if len(by_text) == 1 else None
  letters = _standalone_letters(s, options)
  return letters.pop() if len(letters) == 1 else None


def _standalone_letters(s: str, options: Sequence[str] | None) -> set[str]:
  """Capital letters of the option range standing alone in `s` ("A"/"I" before a word are words)."""
  letters = set()
  for m in _STANDALONE_LETTER_RE.finditer(s):
    letter = m.group(1)
    if letter in "AI" and re.match(r"\s+[a-z]", s[m.end():]):
      continue
    if _in_range(letter, options):
      letters.add(letter)
  return letters


def canonical_letter(gold_letter: str) -> str:
  """"(b)." -> "B"; raises ValueError if it is not a single letter."""
  letter = gold_letter.strip().strip("().[]: ").upper()
  if len(letter) != 1 or not "A" <= letter <= "Z":
    raise ValueError(f"not an option letter: {gold_letter!r}")
  return letter


def judge_choice(pred: str | None, gold_letter: str, options: Sequence[str] | None = None) -> bool:
  """Whether `pred` names the option `gold_letter` (see `parse_choice` for accepted forms)."""
  letter = parse_choice(pred, options)
  return letter is not None and letter == canonical_letter(gold_letter)


# --------------------------------------------------------------------------------------------------
# Judges.


class Judge(Protocol):
  """Whether a prediction (the extracted answer, None if missing) matches the gold answer."""

  name: str

  def __call__(self,
               question: str,
               prediction: str | None,
               gold: str,
               options: Sequence[str] | None = None) -> bool:
    ...


@dataclasses.dataclass(frozen=True)
class RuleJudge:
  """Offline judge: option letter for multiple choice, normalised exact match otherwise."""

  name: str = "rule"

  def __call__(self,
               question: str,
               prediction: str | None,
               gold: str,
               options: Sequence[str] | None = None) -> bool:
    del question  # Rules do not need it.
    if prediction is None:
      return False
    if options:
      gold_letter = _gold_letter(gold, options)
      if gold_letter is not None:
        return judge_choice(prediction, gold_letter, options)
    return judge_exact(prediction, gold)


def _gold_letter(gold: str, options: Sequence[str]) -> str | None:
  """The gold option's letter, whether `gold` is given as a letter or as the option text."""
  try:
    letter = canonical_letter(gold)
    if _in_range(letter, options):
      return letter
  except ValueError:
    pass
  matches = _matching_options(gold, options)
  return matches[0] if len(matches) == 1 else None


LLM_JUDGE_TEMPLATE = """\
You are grading an answer to a question about an image. Decide whether the model's answer means \
the same as the ground-truth answer. Ignore differences in case, punctuation, articles, units \
written differently and extra words that do not change the meaning; a different object, colour, \
number or text is wrong.

Question: {question}
{options}Ground-truth answer: {gold}
Model answer: {prediction}

Reply with one line: "Score: 1" if the model answer is correct, "Score: 0" otherwise."""

_SCORE_RE = re.compile(r"score\s*\**\s*[:：]\s*\**\s*([01])(?:\.0+)?(?![\d.])", re.IGNORECASE)


def parse_score(reply: str) -> int | None:
  """The last "Score: 0/1" in a judge reply, or None if there is none."""
  matches = _SCORE_RE.findall(reply or "")
  return int(matches[-1]) if matches else None


def llm_judge_prompt(question: str,
                     prediction: str,
                     gold: str,
                     options: Sequence[str] | None = None,
                     template: str = LLM_JUDGE_TEMPLATE) -> str:
  listing = ""
  if options:
    listing = "Options:\n" + "\n".join(
        f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options)) + "\n"
  return template.format(question=question, options=listing, gold=gold, prediction=prediction)


@dataclasses.dataclass(frozen=True)
class LLMJudge:
  """Hook for an LLM judge: `complete` is any `prompt -> reply` callable (API client, local model).

  The reply must contain "Score: 1" or "Score: 0" (the last one counts); a reply without one counts
  as wrong. A missing prediction is wrong without a call. The class makes no network calls itself.
  """

  complete: Callable[[str], str]
  template: str = LLM_JUDGE_TEMPLATE
  name: str = "llm"

  def __call__(self,
               question: str,
               prediction: str | None,
               gold: str,
               options: Sequence[str] | None = None) -> bool:
    if prediction is None:
      return False
    reply = self.complete(llm_judge_prompt(question, prediction, gold, options, self.template))
    return parse_score(reply) == 1
