"""Step 05's metrics (docs/method.md §6) on cases worked out by hand, plus invariants.

Every expected value below is computed in the comment next to it, from the rules in
sparsemm_utils/metrics.py (which follow lmms-eval's code line by line).
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils.metrics import (
    ARTICLES,
    CONTRACTIONS,
    HME_CATEGORY,
    METRICS,
    NUMBER_MAP,
    OCRBENCH_CATEGORIES,
    PUNCTUATIONS,
    MetricInputError,
    UnknownMetricError,
    anls,
    anls_normalize,
    anls_score,
    chartqa_relaxed,
    fold_fullwidth_ascii,
    chartqa_score,
    get_metric,
    levenshtein,
    ocrbench_correct,
    ocrbench_score,
    relaxed_float,
    vqa_accuracy,
    vqa_normalize,
    vqa_process_digit_article,
    vqa_process_punctuation,
    vqa_score,
)

PROPERTY = settings(max_examples=150, deadline=None)
ASCII_TEXT = st.text(alphabet="abcdeXYZ 019.,-'\n", max_size=12)


# ------------------------------------------------------------------------------------------
# Levenshtein
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("", "", 0),
        ("", "abc", 3),  # three insertions
        ("abc", "", 3),  # three deletions
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),  # k->s, e->i, insert g
        ("flaw", "lawn", 2),  # delete f, insert n
        ("ab", "ba", 2),  # no transposition move: two substitutions
        ("abc", "axc", 1),  # one substitution
        ("Abc", "abc", 1),  # case counts: no normalisation inside the distance
    ],
)
def test_levenshtein_hand_cases(a: str, b: str, expected: int) -> None:
    assert levenshtein(a, b) == expected
    assert levenshtein(b, a) == expected


@lru_cache(maxsize=None)
def _naive_levenshtein(a: str, b: str) -> int:
    """The textbook recursion on the last characters, written independently of the module."""
    if not a or not b:
        return len(a) + len(b)
    return min(
        _naive_levenshtein(a[:-1], b) + 1,
        _naive_levenshtein(a, b[:-1]) + 1,
        _naive_levenshtein(a[:-1], b[:-1]) + (a[-1] != b[-1]),
    )


SHORT = st.text(alphabet="abc", max_size=6)


@PROPERTY
@given(SHORT, SHORT, SHORT)
def test_levenshtein_is_a_metric_and_matches_the_recursion(a: str, b: str, c: str) -> None:
    d = levenshtein(a, b)
    assert d == _naive_levenshtein(a, b)
    assert d == levenshtein(b, a)
    assert (d == 0) == (a == b)
    assert abs(len(a) - len(b)) <= d <= max(len(a), len(b))
    assert levenshtein(a, c) <= d + levenshtein(b, c)


def test_levenshtein_rejects_non_strings() -> None:
    with pytest.raises(MetricInputError, match="must be a str"):
        levenshtein("abc", None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# ANLS
# ------------------------------------------------------------------------------------------


def test_anls_normalize() -> None:
    assert anls_normalize("  Hello \t  WORLD\n ") == "hello world"


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # both empty: length 0 -> NL = 0 -> q = 1
        ("", [""], 1.0),
        # one empty: dist 3 over length 3 -> NL 1 -> q 0
        ("", ["abc"], 0.0),
        ("abc", [""], 0.0),
        # case and whitespace are normalised away: dist 0 -> q 1
        (" Hello   World ", ["hello world"], 1.0),
        # dist 1 over length 2 -> NL exactly 0.5 -> q = 0.5, NOT below the threshold: kept
        ("ax", ["ab"], 0.5),
        # dist 2 over length 3 -> q = 1/3 < 0.5 -> 0
        ("axy", ["abc"], 0.0),
        # min over answers: "invoice" vs "invoice no" 3/10, vs "invoices" 1/8 -> q = 1 - 0.125
        ("invoice", ["invoice no", "invoices"], 0.875),
    ],
)
def test_anls_hand_cases(prediction: str, answers: list[str], expected: float) -> None:
    assert anls(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_anls_divides_by_raw_lengths_like_lmms_eval() -> None:
    # gt "  abc  " normalises to "abc"; dist("abc", "abd") = 1.
    # raw (lmms-eval): max(len("  ABC  "), len("ABD")) = 7 -> q = 1 - 1/7 = 6/7
    # normalised:      max(3, 3) = 3                      -> q = 1 - 1/3 = 2/3
    assert anls("abd", ["  abc  "]) == pytest.approx(6 / 7)
    assert anls("abd", ["  abc  "], length_basis="normalized") == pytest.approx(2 / 3)
    # an empty prediction can still score: gt " a " -> dist("a", "") = 1 over raw length 3
    # -> q = 2/3 >= 0.5; with normalised lengths 1/1 -> q = 0
    assert anls("", [" a "]) == pytest.approx(2 / 3)
    assert anls("", [" a "], length_basis="normalized") == 0.0
    # raw lengths are len(s.upper()): "ßx".upper() == "SSX" (3 characters); dist("ßx", "x") = 1
    # raw: 1/3 -> q = 2/3;  normalised: max(2, 1) = 2 -> 1/2 -> q = 0.5
    assert anls("x", ["ßx"]) == pytest.approx(2 / 3)
    assert anls("x", ["ßx"], length_basis="normalized") == 0.5


def test_anls_threshold_option() -> None:
    # "axy" vs "abc": q = 1/3, kept with a threshold of 0.3, dropped with 0.5
    assert anls("axy", ["abc"], threshold=0.3) == pytest.approx(1 / 3)
    assert anls("axy", ["abc"], threshold=0.5) == 0.0


def test_anls_score_is_the_mean() -> None:
    # per question: 0.5 (exact 0.5 distance), 0 (below threshold), 1 (both empty) -> mean 0.5
    assert anls_score(["ax", "axy", ""], [["ab"], ["abc"], [""]]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: anls("abc", "abc"), "wrap one answer"),
        (lambda: anls("abc", []), "is empty"),
        (lambda: anls(None, ["abc"]), "prediction must be a str"),
        (lambda: anls("abc", ["abc", 3]), r"answers\[1\] must be a str"),
        (lambda: anls("abc", ["abc"], threshold=1.5), "threshold"),
        (lambda: anls("abc", ["abc"], length_basis="chars"), "length_basis"),
        (lambda: anls_score(["a", "b"], [["a"]]), "one entry per prediction"),
        (lambda: anls_score([], []), "predictions is empty"),
    ],
)
def test_anls_bad_input(call, message: str) -> None:
    with pytest.raises(MetricInputError, match=message):
        call()


@PROPERTY
@given(st.text(max_size=15), st.lists(st.text(max_size=15), min_size=1, max_size=4))
def test_anls_in_unit_interval_and_identity(prediction: str, answers: list[str]) -> None:
    q = anls(prediction, answers)
    assert 0.0 <= q <= 1.0
    assert q == 0.0 or q >= 0.5
    assert anls(prediction, [prediction]) == 1.0
    # adding a ground truth can only help (q is a max over answers)
    assert anls(prediction, [*answers, prediction]) == 1.0
    assert anls(prediction, answers + ["zzz"]) >= q


# ------------------------------------------------------------------------------------------
# VQA accuracy: EvalAI normalisation
# ------------------------------------------------------------------------------------------


def test_normalisation_tables_match_lmms_eval() -> None:
    # Transcribed from lmms-eval lmms_eval/tasks/_task_utils/vqa_eval_metric.py
    # (EvalAIAnswerProcessor, commit 61e5060b) and checked entry by entry against it; the
    # digests pin the tables (keys, values AND order) against accidental edits.
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj).encode()).hexdigest()

    assert len(CONTRACTIONS) == 120
    assert digest(list(CONTRACTIONS.items())) == (
        "a3b7d35bdb6c2a66fd80906c0c407d778102ea862144226df7cf2dd78ca595e8"
    )
    assert digest(list(NUMBER_MAP.items())) == (
        "2e3a57e12d521df4ddc85349c90010a3672108c1249e7538cbc0fd050fbd3313"
    )
    assert digest(list(PUNCTUATIONS)) == (
        "3b9f2ee76c69e88435f0c6025b28651351f579aa1c9eefc94c702552a2ee7a89"
    )
    assert ARTICLES == ("a", "an", "the")
    # the original's oddities are kept
    assert CONTRACTIONS["somebody'd"] == "somebodyd"
    assert CONTRACTIONS["Im"] == "I'm"
    assert NUMBER_MAP["none"] == "0" and "eleven" not in NUMBER_MAP
    with pytest.raises(TypeError):
        CONTRACTIONS["dont"] = "do not"  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),  # number word -> digit
        ("none", "0"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("a dog", "dog"),  # article dropped
        ("The Two dogs", "2 dogs"),
        ("dont", "don't"),  # contraction restored
        ("Id've", "id've"),  # capitalised table key never matches a lowercased word
        ("1,000", "1000"),  # word_tokenize deletes every comma first
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("3.5.", "3.5"),  # a trailing period goes
        ("Yes?", "yes"),  # "?" deleted by word_tokenize
        ("man's", "man 's"),  # "'s" split off
        ("x-ray", "x ray"),  # "-" not next to a space -> replaced by a space
        ("x - ray", "x ray"),  # "-" next to a space -> deleted; double space collapses
        ("  multi\nline\ttext ", "multi line text"),
        ("." * 40, "." * 8),  # re.UNICODE (32) lands in sub()'s count: 40 - 32 = 8 left
    ],
)
def test_vqa_normalize_hand_cases(text: str, expected: str) -> None:
    assert vqa_normalize(text) == expected


def test_process_punctuation_comma_between_digits_rule() -> None:
    # no digit,digit: "-" is not next to a space -> replaced by a space
    assert vqa_process_punctuation("1000-2") == "1000 2"
    # a comma between digits anywhere -> EVERY punctuation mark is deleted, not spaced
    assert vqa_process_punctuation("1,000-2") == "10002"
    # the rule looks at the input: "(" next to a space is deleted, ")" is not -> spaced
    assert vqa_process_punctuation("f (x)") == "f x "
    assert vqa_process_digit_article("An Apple") == "apple"


def test_vqa_accuracy_leave_one_out_worked_example() -> None:
    # 10 answers, the prediction matches 3 of them.
    answers = ["red"] * 3 + ["blue"] * 7
    # leave out one of the 3 "red": 2 matches among the other 9 -> min(1, 2/3) = 2/3 (3 subsets)
    # leave out one of the 7 "blue": 3 matches -> min(1, 3/3) = 1                    (7 subsets)
    # mean = (3 * 2/3 + 7 * 1) / 10 = 9/10
    assert vqa_accuracy("red", answers) == 0.9
    # k = 1: 9 subsets with 1 match (1/3), 1 with 0 -> 3/10
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == 0.3
    # k = 2: 8 subsets with 2 matches (2/3), 2 with 1 (1/3) -> (16/3 + 2/3) / 10 = 6/10
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == 0.6
    # k = 4: every subset keeps >= 3 matches -> 1
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_accuracy("green", answers) == 0.0
    # a single answer leaves nobody to agree with: always 0 (as in lmms-eval)
    assert vqa_accuracy("red", ["red"]) == 0.0


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("two", "2"),  # number words
        ("2", "Two"),
        ("a dog", "dog"),  # articles
        ("dont", "don't"),  # contractions
        ("1,000", "1000"),  # comma inside a number
        ("Yes.", "yes"),  # case and final period
    ],
)
def test_vqa_accuracy_normalisation_makes_them_equal(prediction: str, answer: str) -> None:
    assert vqa_accuracy(prediction, [answer] * 10) == 1.0


def test_vqav2_protocol_quirks() -> None:
    # vqav2: all ten ground truths identical -> they are NOT normalised at all:
    # gt "1,000" stays "1,000", the prediction "1000" normalises to "1000" -> no match -> 0
    assert vqa_accuracy("1000", ["1,000"] * 10, protocol="vqav2") == 0.0
    assert vqa_accuracy("1000", ["1,000"] * 10, protocol="textvqa") == 1.0
    # ... nor lowercased: ten "X" stay "X" while the prediction "X" becomes "x" -> 0
    assert vqa_accuracy("X", ["X"] * 10, protocol="vqav2") == 0.0
    assert vqa_accuracy("X", ["X"] * 10, protocol="textvqa") == 1.0
    # the ground truths disagree -> punctuation + digit/article on both, but no "'s" split on
    # the ground truths: "man's" stays "man's", the prediction is "man 's" -> 0 matches
    answers = ["man's"] * 9 + ["man"]
    assert vqa_accuracy("man's", answers, protocol="vqav2") == 0.0
    assert vqa_accuracy("man's", answers, protocol="textvqa") == 1.0
    # where the answers disagree the two protocols agree on ordinary cases: 3 of 10 -> 0.9
    assert vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7, protocol="vqav2") == 0.9


def test_vqav2_2025_normalises_both_sides_always() -> None:
    # lmms-eval since mid-2025: punctuation + digits/articles on the prediction and on every
    # ground truth, even when the ten agree: "1000" and "1,000" both become "1000" -> 1
    assert vqa_accuracy("1000", ["1,000"] * 10, protocol="vqav2_2025") == 1.0
    # ... and lowercased by the digit/article step: ten "X" now match "X" (the pre-2025 rule left
    # agreeing ground truths as they were and lowercased only the prediction: 0)
    assert vqa_accuracy("X", ["X"] * 10, protocol="vqav2_2025") == 1.0
    assert vqa_accuracy("X", ["X"] * 10, protocol="vqav2") == 0.0
    # no word tokenizer: "man's" is not split on either side -> equal
    assert vqa_accuracy("man's", ["man's"] * 9 + ["man"], protocol="vqav2_2025") == 1.0
    # newlines and tabs inside the answer become spaces, then strip: "two\tdogs" -> "2 dogs"
    assert vqa_accuracy(" two\tdogs\n", ["2 dogs"] * 3 + ["3"] * 7, protocol="vqav2_2025") == 0.9


def test_fullwidth_folding() -> None:
    assert fold_fullwidth_ascii("\uff21\uff22\uff23\uff11\uff12\uff13") == "ABC123"
    assert fold_fullwidth_ascii("a\u3000b\uff01") == "a b!"
    assert fold_fullwidth_ascii("\u2460\uff5f") == "\u2460\uff5f"  # circled 1 and U+FF5F are left as they are (no NFKC)


def test_ocrbench_2026_rules() -> None:
    # since 2026 the prediction keeps its case in the handwritten-math rule...
    assert ocrbench_correct("\\frac{A}{B}", ["\\frac{A}{B}"], HME_CATEGORY, protocol="lmms_eval_2026")
    assert not ocrbench_correct("X^2", ["x^2"], HME_CATEGORY, protocol="lmms_eval_2026")
    # ... and elsewhere fullwidth characters fold to ASCII on both sides before the lowercase
    fullwidth = "\uff21\uff22\uff23\uff11\uff12\uff13"
    assert ocrbench_correct(fullwidth, ["abc123"], "Regular Text Recognition", protocol="lmms_eval_2026")
    assert not ocrbench_correct(fullwidth, ["abc123"], "Regular Text Recognition")
    assert ocrbench_correct("ABC123", [fullwidth], "Regular Text Recognition", protocol="lmms_eval_2026")


def test_vqa_score_is_the_mean() -> None:
    # 0.9 and 0.3 (worked above) -> 0.6
    preds = ["red", "red"]
    answers = [["red"] * 3 + ["blue"] * 7, ["red"] + ["blue"] * 9]
    assert vqa_score(preds, answers) == pytest.approx(0.6)


def test_vqa_bad_input() -> None:
    with pytest.raises(MetricInputError, match="protocol"):
        vqa_accuracy("a", ["a"] * 10, protocol="gqa")  # type: ignore[arg-type]
    with pytest.raises(MetricInputError, match="is empty"):
        vqa_accuracy("a", [])
    with pytest.raises(MetricInputError, match="wrap one answer"):
        vqa_accuracy("a", "a")
    with pytest.raises(MetricInputError, match="one entry per prediction"):
        vqa_score(["a"], [["a"], ["b"]])


@PROPERTY
@given(
    st.sampled_from(["two", "2", "a dog", "dog", "dont", "x-ray", "Yes.", "3.5"]),
    st.lists(st.sampled_from(["2", "dog", "don't", "x ray", "yes", "3.5", "no"]), min_size=10, max_size=10),
    st.sampled_from(["textvqa", "vqav2"]),
)
def test_vqa_accuracy_takes_the_five_values(prediction: str, answers: list[str], protocol: str) -> None:
    acc = vqa_accuracy(prediction, answers, protocol=protocol)  # type: ignore[arg-type]
    assert acc in {0.0, 0.3, 0.6, 0.9, 1.0}
    # and it is the value the match count k predicts (normalisations of both protocols agree
    # on this vocabulary)
    k = sum(vqa_normalize(a) == vqa_normalize(prediction) for a in answers)
    assert acc == (0.0, 0.3, 0.6, 0.9, 1.0)[min(k, 4)]


@PROPERTY
@given(ASCII_TEXT)
def test_vqa_accuracy_of_the_unanimous_answer_is_one(text: str) -> None:
    assert vqa_accuracy(text, [text] * 10) == 1.0


# ------------------------------------------------------------------------------------------
# OCRBench
# ------------------------------------------------------------------------------------------


def test_ocrbench_substring_rule() -> None:
    cat = "Doc-oriented VQA"
    # both sides lowercased, stripped, newlines -> spaces; then substring
    assert ocrbench_correct("The answer is\nHELLO World.", ["hello world"], cat)
    assert ocrbench_correct("hello world", ["Hello\nWorld"], cat)
    assert not ocrbench_correct("hello", ["hello world"], cat)
    # any of several ground truths
    assert ocrbench_correct("it says 42", ["forty-two", "42"], cat)
    # a single str ground truth is accepted (OCRBench stores either)
    assert ocrbench_correct("it says 42", "42", cat)
    # spaces still matter outside the math subset
    assert not ocrbench_correct("x^2", ["x ^ 2"], cat)
    # an empty ground truth is a substring of anything
    assert ocrbench_correct("anything", [""], cat)


def test_ocrbench_handwritten_math_ignores_spaces_and_newlines() -> None:
    # spaces and newlines removed on both sides: "x^{2}+1" in "x^{2}+1"
    assert ocrbench_correct("x ^ { 2 }\n+ 1", ["x^{2} + 1"], HME_CATEGORY)
    assert ocrbench_correct("x^{2}+1", ["x ^ { 2 } + 1"], HME_CATEGORY, protocol="ocrbench")
    assert not ocrbench_correct("x^{3}+1", ["x^{2}+1"], HME_CATEGORY)


def test_ocrbench_handwritten_math_case_rules() -> None:
    gt_upper = ["\\frac{A}{B}"]
    # lmms-eval lowercases the prediction first: "\frac{a}{b}" never contains "\frac{A}{B}"
    assert not ocrbench_correct("\\frac{A}{B}", gt_upper, HME_CATEGORY)
    # the benchmark authors' script keeps the prediction's case: found
    assert ocrbench_correct("\\frac{A}{B}", gt_upper, HME_CATEGORY, protocol="ocrbench")
    # conversely an uppercase prediction matches a lowercase ground truth only under lmms-eval
    assert ocrbench_correct("X^2", ["x^2"], HME_CATEGORY)
    assert not ocrbench_correct("X^2", ["x^2"], HME_CATEGORY, protocol="ocrbench")


def test_ocrbench_score_counts_correct_over_n() -> None:
    preds = ["hello world", "nope", "x^{2}", "42"]
    answers = [["hello"], ["yes"], ["x ^ {2}"], "42"]
    cats = ["Regular Text Recognition", "Scene Text-centric VQA", HME_CATEGORY, "Key Information Extraction"]
    # correct: yes, no, yes, yes -> 3 / 4
    assert ocrbench_score(preds, answers, cats) == 0.75


def test_ocrbench_bad_input() -> None:
    with pytest.raises(MetricInputError, match="unknown OCRBench category 'HME100k'"):
        ocrbench_correct("a", ["a"], "HME100k")
    with pytest.raises(MetricInputError, match="protocol"):
        ocrbench_correct("a", ["a"], HME_CATEGORY, protocol="other")  # type: ignore[arg-type]
    with pytest.raises(MetricInputError, match="categories must have one entry"):
        ocrbench_score(["a", "b"], [["a"], ["b"]], [HME_CATEGORY])
    assert len(OCRBENCH_CATEGORIES) == 10 and HME_CATEGORY in OCRBENCH_CATEGORIES


@PROPERTY
@given(
    st.text(alphabet="abcXYZ 12\n", max_size=8),
    st.text(alphabet="abcXYZ 12\n", max_size=8),
    st.text(alphabet="abcXYZ 12\n", max_size=8),
    st.sampled_from(OCRBENCH_CATEGORIES),
)
def test_ocrbench_prediction_containing_the_answer_is_correct(
    before: str, gt: str, after: str, category: str
) -> None:
    protocol = "ocrbench" if category == HME_CATEGORY else "lmms_eval"
    assert ocrbench_correct(before + gt + after, [gt], category, protocol=protocol)
    assert ocrbench_correct(before + gt.lower() + after, [gt.lower()], category)


# ------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", 12.0),
        ("12%", 0.12),  # trailing % divides by 100
        ("12%%", 0.12),  # rstrip("%") removes every trailing %
        (" 7 ", 7.0),  # float() tolerates surrounding whitespace
        ("12% ", None),  # ... but then the % is not trailing: refused
        ("1,000", None),
        ("$5", None),
        ("yes", None),
    ],
)
def test_relaxed_float(text: str, expected: float | None) -> None:
    assert relaxed_float(text) == expected


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("12%", "0.12", True),  # 0.12 vs 0.12
        ("0.12", "12%", True),
        ("12", "0.12", False),  # |12 - 0.12| / 0.12 = 99
        ("12%", "0.126", True),  # |0.12 - 0.126| / 0.126 = 0.0476 <= 0.05
        ("12%", "0.127", False),  # 0.0551 > 0.05
        ("105", "100", True),  # 5/100 = 0.05 exactly: <= keeps it
        ("95", "100", True),
        ("106", "100", False),  # 0.06
        ("-104", "-100", True),  # relative to |t|
        ("0", "0", True),  # zero target: exact string match
        ("0.0", "0", False),  # ... so an equal number written differently is wrong
        ("0.001", "0", False),
        ("Yes", "yes", True),  # text: case-insensitive exact match
        (" yes", "yes", False),  # ... without stripping
        ("1,000", "1000", False),  # "1,000" does not parse -> string comparison
        ("abc", "12", False),
    ],
)
def test_chartqa_relaxed_hand_cases(prediction: str, target: str, expected: bool) -> None:
    assert chartqa_relaxed(prediction, target) is expected


def test_chartqa_tolerance_and_score() -> None:
    # 10/100 = 0.1 <= 0.1
    assert chartqa_relaxed("110", "100", tolerance=0.1)
    assert not chartqa_relaxed("110", "100")
    # True, False, True -> 2/3
    assert chartqa_score(["12%", "12", "Yes"], ["0.12", "0.12", "yes"]) == pytest.approx(2 / 3)
    with pytest.raises(MetricInputError, match="tolerance"):
        chartqa_relaxed("1", "1", tolerance=-0.1)
    with pytest.raises(MetricInputError, match="target must be a str"):
        chartqa_relaxed("1", 1)  # type: ignore[arg-type]


@PROPERTY
@given(
    st.floats(min_value=1e-3, max_value=1e6) | st.floats(min_value=-1e6, max_value=-1e-3),
)
def test_chartqa_relative_tolerance(x: float) -> None:
    assert chartqa_relaxed(repr(x), repr(x))
    assert chartqa_relaxed(repr(x * 1.04), repr(x))
    assert not chartqa_relaxed(repr(x * 1.06), repr(x))
    assert chartqa_relaxed(f"{x * 100!r}%", repr(x))  # a percentage is the same number / 100
    assert math.isclose(relaxed_float(f"{x!r}%"), x / 100)


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------


def test_registry_calls_the_metrics() -> None:
    assert set(METRICS) == {
        "anls", "vqa_accuracy", "vqav2_accuracy", "ocrbench_accuracy", "relaxed_accuracy"
    }
    assert get_metric("anls")("ax", ["ab"]) == 0.5  # worked above
    assert get_metric("vqa_accuracy")("red", ["red"] * 3 + ["blue"] * 7) == 0.9
    assert get_metric("vqav2_accuracy")("1000", ["1,000"] * 10) == 0.0
    assert get_metric("ocrbench_accuracy")("x ^ 2", ["x^2"], category=HME_CATEGORY) == 1.0
    assert get_metric("relaxed_accuracy")("12%", ["0.12"]) == 1.0
    assert get_metric("relaxed_accuracy")("12%", "0.12") == 1.0
    with pytest.raises(MetricInputError, match="ONE ChartQA label"):
        get_metric("relaxed_accuracy")("1", ["1", "2"])
    with pytest.raises(TypeError):
        get_metric("ocrbench_accuracy")("a", ["a"])  # category is required


def test_get_metric_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownMetricError, match="unknown metric 'cider'.*'anls'.*'vqa_accuracy'"):
        get_metric("cider")
    with pytest.raises(TypeError):
        METRICS["mine"] = len  # type: ignore[index]
