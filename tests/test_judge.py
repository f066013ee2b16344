"""Answer extraction, normalisation, exact-match and multiple-choice judging, judge hooks."""

import pytest

from mini_o3_jax.agent import judge


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer>White.</answer>", "White."),
    ("<answer> 6C71 </answer>", "6C71"),
    ("<answer>a</answer> then <answer>b</answer>", "b"),
    ("<answer><answer>inner</answer>", "inner"),
    ("<answer>\nmulti\nline\n</answer>", "multi\nline"),
    ("<answer></answer>", None),
    ("<answer>   </answer>", None),
    ("<answer>unclosed", None),
    ("closed only</answer>", None),
    ("no tags", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
  assert judge.extract_answer(text) == expected


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("White.", "white"),
        ("  The  white one ", "white 1"),
        ("6C71", "6c71"),
        ("67.200 LBS", "67.2 lbs"),
        ("67.2 lbs.", "67.2 lbs"),
        ("1,000", "1000"),
        ("$1,299.00", "1299"),
        ("5.0", "5"),
        ("0071", "0071"),
        ("six", "6"),
        ("A", "a"),  # An answer that is only an article stays.
        ("an apple", "apple"),
        ("Left-hand side!", "left hand side"),
        ("“Quoted”", "quoted"),
        ("ＡＢＣ", "abc"),  # NFKC folds full-width letters.
    ])
def test_normalize_answer(raw, normalized):
  assert judge.normalize_answer(raw) == normalized


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("White.", "white", True),
        ("white", "White.", True),
        ("The white", "White.", True),
        ("6c71", "6C71", True),
        ("6C 71", "6C71", True),
        ("6C7l", "6C71", False),
        ("67.2 LBS", "67.200 LBS", True),
        ("67.200 LBS", "67.200 LBS", True),
        ("67.20 lbs", "67.2 LBS", True),
        ("672 LBS", "67.200 LBS", False),
        ("6.72 lbs", "67.200 LBS", False),
        ("1000", "1,000", True),
        ("6", "six", True),
        ("7", "six", False),
        ("white car", "white", False),  # Exact, not containment: leave leniency to an LLM judge.
        ("lefthand", "left-hand", True),
        ("", "white", False),
        (None, "white", False),
        ("red", ["white", "Red."], True),
    ])
def test_judge_exact(pred, gold, ok):
  assert judge.judge_exact(pred, gold) is ok


OPTIONS = ["red", "blue", "green", "yellow"]


@pytest.mark.parametrize("pred", [
    "B",
    "b",
    "(B)",
    "B.",
    "B)",
    "[B]",
    "B. blue",
    "(B) blue",
    "B: blue",
    "B) Blue.",
    "Answer: B",
    "answer: (b)",
    "The answer is B.",
    "The answer is (B)",
    "Option B",
    "blue",
    "Blue.",
    "The blue",
    "I think B is correct.",
    "It should be B",
    "B. something else entirely",
])
def test_judge_choice_accepts(pred):
  assert judge.judge_choice(pred, "B", OPTIONS), pred
  assert judge.parse_choice(pred, OPTIONS) == "B"


@pytest.mark.parametrize(
    "pred",
    [
        "A",
        "C",
        "red",
        "B or C",
        "B and C",
        "(B) or (C)",
        "B, C",
        "Between B and C, I pick B",
        "B. red",  # The letter and the text name different options: ambiguous.
        "E",
        "purple",
        "",
        None,
        "none of them",
        "bluish",
    ])
def test_judge_choice_rejects(pred):
  assert not judge.judge_choice(pred, "B", OPTIONS), pred


def test_parse_choice_letters_out_of_range_and_articles():
  assert judge.parse_choice("C", ["yes", "no"]) is None
  assert judge.parse_choice("A red car", ["red car", "blue car"]) == "A"  # By the option text.
  assert judge.parse_choice("A red one",
                            ["blue car", "green car"]) is None  # "A" is an article here.
  assert judge.parse_choice("I see B", OPTIONS) == "B"  # "I" is a pronoun here.
  assert judge.parse_choice("Z", None) == "Z"  # Without options any letter is a letter.


def test_canonical_letter():
  assert judge.canonical_letter("(b).") == "B"
  with pytest.raises(ValueError):
    judge.canonical_letter("AB")


def test_rule_judge():
  rule = judge.RuleJudge()
  assert rule.name == "rule"
  assert rule("What colour?", "White.", "white")
  assert not rule("What colour?", None, "white")
  assert rule("Which?", "(B)", "B", OPTIONS)
  assert rule("Which?", "blue", "blue", OPTIONS)  # Gold given as the option text.
  assert not rule("Which?", "A", "B", OPTIONS)


@pytest.mark.parametrize("reply, score", [
    ("Score: 1", 1),
    ("The answer matches.\nScore: 0", 0),
    ("score:1", 1),
    ("**Score:** 1", 1),
    ("Score: 1.0", 1),
    ("Score: 0 ... on reflection Score: 1", 1),
    ("Score: 10", None),
    ("I think it is correct.", None),
    ("", None),
])
def test_parse_score(reply, score):
  assert judge.parse_score(reply) == score


def test_llm_judge_hook():
  prompts_seen = []

  def fake_llm(prompt: str) -> str:
    prompts_seen.append(prompt)
    return "Reasoning...\nScore: 1" if "Model answer: ivory" in prompt else "Score: 0"

  llm = judge.LLMJudge(fake_llm)
  assert llm.name == "llm"
  assert llm("What colour is the cup?", "ivory", "White.")
  assert not llm("What colour is the cup?", "red", "White.")
  assert not llm("What colour is the cup?", None, "White.")  # No call for a missing answer.
  assert len(prompts_seen) == 2
  assert "Question: What colour is the cup?" in prompts_seen[0]
  assert "Ground-truth answer: White." in prompts_seen[0]
  assert "Score: 1" in prompts_seen[0]
  llm("Which?", "B", "B", ["cat", "dog"])
  assert "Options:\nA. cat\nB. dog\n" in prompts_seen[-1]
  assert not judge.LLMJudge(lambda p: "no verdict")("Q", "x", "x")


def test_judges_satisfy_protocol():
  judges: list[judge.Judge] = [judge.RuleJudge(), judge.LLMJudge(lambda p: "Score: 1")]
  assert all(j("Q", "x", "x") for j in judges)
