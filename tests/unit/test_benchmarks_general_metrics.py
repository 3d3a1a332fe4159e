"""The general benchmarks' scorers (GQA exact match, MMBench option matching), on hand cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils.general_metrics import (
    ALL_METRIC_NAMES,
    GENERAL_METRICS,
    exact_match,
    get_scorer,
    mmbench_correct,
    mmbench_infer_choice,
    mmbench_infer_option,
    mmbench_infer_text,
)
from sparsemm_utils.metrics import METRICS, MetricInputError, UnknownMetricError


# ---------------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Yes.", ["yes"], 1.0),  # "Yes." -> lower "yes." -> punctuation deleted "yes"
        ("yes", ["Yes!"], 1.0),  # the answer is normalised the same way
        (" yes", ["yes"], 0.0),  # no stripping: " yes" != "yes"
        ("yes\n", ["yes"], 0.0),  # a newline is whitespace, not punctuation
        ("no", ["yes"], 0.0),
        ("black-and-white", ["blackandwhite"], 1.0),  # "-" is in string.punctuation
        ("the dog", ["dog"], 0.0),  # no article rule (that is VQA accuracy's EvalAI rule)
        ("red", ["blue", "RED"], 1.0),  # any answer counts
    ],
)
def test_exact_match_lmms_eval_gqa_options(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


def test_exact_match_options_switch_each_rule():
    assert exact_match("Yes", ["yes"], ignore_case=False) == 0.0
    assert exact_match("yes.", ["yes"], ignore_punctuation=False) == 0.0
    # digits deleted: "room 12" -> "room ", "room 7" -> "room "
    assert exact_match("room 12", ["room 7"], ignore_numbers=True) == 1.0
    assert exact_match("answer: cat", ["cat"], regexes_to_ignore=[r"^answer: "]) == 1.0


def test_exact_match_bad_input():
    with pytest.raises(MetricInputError, match="wrap one answer"):
        exact_match("yes", "yes")
    with pytest.raises(MetricInputError, match="empty"):
        exact_match("yes", [])
    with pytest.raises(MetricInputError, match="must be a str"):
        exact_match(3, ["3"])


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_exact_match_of_a_string_with_itself_is_one(text):
    assert exact_match(text, [text]) == 1.0


# ---------------------------------------------------------------------------------- MMBench


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),  # one letter standing alone
        ("E", "E"),  # num_choice = 5: A-E
        ("A cat", "A"),  # "A" alone, answer of 2 words (<= 3): taken as the letter
        ("I think A is right", None),  # "A" alone in > 3 words: maybe an article; no pattern matches
        ("A or B", None),  # two letters alone, no pattern
        ("B.", "B"),  # no letter alone; pattern "X."
        ("The answer is (C).", "C"),  # pattern "(X)."
        ("Answer: D", "D"),  # "D" alone
        ("It is :C,", "C"),  # pattern ":X,"
        ("none of them", None),
        ("Failed to obtain answer via API", None),
    ],
)
def test_infer_option(answer, expected):
    assert mmbench_infer_option(answer) == expected


def test_infer_text_and_choice():
    options = {"A": "cat", "B": "dog", "C": None, "D": float("nan")}
    assert mmbench_infer_text("It is a Dog", options) == "B"  # lowercased substring
    assert mmbench_infer_text("cat and dog", options) is None  # two candidates
    assert mmbench_infer_text("a bird", options) is None
    # lmms-eval's build_choices keeps the string "nan" (pd.isna("nan") is False): quirk kept
    assert mmbench_infer_text("banana", {"A": "apple", "D": "nan"}) == "D"
    # can_infer: the letter rules first, then the option texts
    assert mmbench_infer_choice("B", options) == "B"
    assert mmbench_infer_choice("the dog", options) == "B"


def test_mmbench_correct():
    options = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    assert mmbench_correct("B", "B", options=options) == 1.0
    assert mmbench_correct("  B \n", ["B"], options=options) == 1.0  # stripped first, as lmms-eval
    assert mmbench_correct("The answer is C", "C", options=options) == 1.0
    assert mmbench_correct("A", "B", options=options) == 0.0
    assert mmbench_correct("no idea", "B", options=options) == 0.0  # unresolved: wrong (no GPT judge)
    with pytest.raises(MetricInputError, match="ONE option letter"):
        mmbench_correct("B", "dog", options=options)
    with pytest.raises(MetricInputError, match="options must map"):
        mmbench_correct("B", "B", options=["cat", "dog"])


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ABCDEFGH ().,:xyz", max_size=20))
def test_infer_option_returns_a_letter_or_none(answer):
    got = mmbench_infer_option(answer)
    assert got is None or got in "ABCDE"
    if got is not None:
        assert got in answer


# ---------------------------------------------------------------------------------- registry


def test_scorer_registry_spans_both_modules():
    assert set(ALL_METRIC_NAMES) == set(METRICS) | set(GENERAL_METRICS)
    assert get_scorer("anls") is METRICS["anls"]
    assert get_scorer("exact_match") is GENERAL_METRICS["exact_match"]
    with pytest.raises(UnknownMetricError, match="known metrics: .*anls.*exact_match"):
        get_scorer("bleu")
