"""Step 05's benchmark metrics, computed exactly as lmms-eval computes them (docs/method.md §6).

Every function here is pure: strings in, a number out. They reproduce lmms-eval's scoring code
(EvolvingLMMs-Lab/lmms-eval) rule for rule, quirks included, because the paper's numbers were
produced by it. Where lmms-eval differs from the benchmark authors' own script, or where docs/method.md
section 6 reads differently from the code, the lmms-eval behaviour is the default and the other
reading is a named option (docs/method.md: "reproduce the quirk as the default, never silently"):

- ``anls`` (DocVQA): ``lmms_eval/api/metrics.py::anls``. The normalised distance is divided by the
  length of the RAW strings (``len(s.upper())``), not of the normalised ones: option
  ``length_basis="normalized"``.
- ``vqa_accuracy`` (TextVQA, VQAv2): ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py``
  (``EvalAIAnswerProcessor``, copied by lmms-eval from facebookresearch/mmf, itself from the
  official VQA evaluation script) with ``textvqa/utils.py`` (default) or ``vqav2/utils.py``
  (``protocol="vqav2"``), which normalise the ground truths differently; lmms-eval rewrote the
  VQAv2 normalisation in mid-2025 (``protocol="vqav2_2025"``).
- ``ocrbench_correct`` (OCRBench): ``lmms_eval/tasks/ocrbench/utils.py``. lmms-eval up to 2026
  lowercases the prediction before the handwritten-math rule, so that rule is case-sensitive only
  on the ground truth side; the benchmark authors' script (Yuliang-Liu/MultimodalOCR) keeps the
  prediction's case: ``protocol="ocrbench"``; lmms-eval since 2026 keeps it too and folds
  fullwidth characters to ASCII in the other categories: ``protocol="lmms_eval_2026"``.
- ``chartqa_relaxed`` (ChartQA): ``lmms_eval/tasks/chartqa/utils.py::relaxed_correctness``
  (from QwenLM/Qwen-VL's ``evaluate_vqa.py``).

Which lmms-eval version's rules apply end to end (answer stripping, these protocols, the
per-benchmark aggregation) is :mod:`sparsemm_utils.lmms_protocol`'s choice.

The per-question scorers are also reachable by name through :data:`METRICS` / :func:`get_metric`
with one calling convention, ``fn(prediction, answers, **fields) -> float`` (see
:func:`get_metric`), so that step 05 can loop over benchmarks without a table of its own.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Literal

from .validate import check_choice, check_fraction

__all__ = [
    "MetricInputError",
    "UnknownMetricError",
    "levenshtein",
    "anls_normalize",
    "anls",
    "anls_score",
    "CONTRACTIONS",
    "NUMBER_MAP",
    "ARTICLES",
    "PUNCTUATIONS",
    "PERIOD_STRIP",
    "COMMA_STRIP",
    "VQA_PROTOCOLS",
    "OCRBENCH_PROTOCOLS",
    "vqa_word_tokenize",
    "vqa_process_punctuation",
    "vqa_process_digit_article",
    "vqa_normalize",
    "vqa_accuracy",
    "vqa_score",
    "OCRBENCH_CATEGORIES",
    "HME_CATEGORY",
    "fold_fullwidth_ascii",
    "ocrbench_correct",
    "ocrbench_score",
    "relaxed_float",
    "chartqa_relaxed",
    "chartqa_score",
    "METRICS",
    "get_metric",
]

LengthBasis = Literal["raw", "normalized"]
VqaProtocol = Literal["textvqa", "vqav2", "vqav2_2025"]
OcrBenchProtocol = Literal["lmms_eval", "lmms_eval_2026", "ocrbench"]
VQA_PROTOCOLS: tuple[str, ...] = ("textvqa", "vqav2", "vqav2_2025")
OCRBENCH_PROTOCOLS: tuple[str, ...] = ("lmms_eval", "lmms_eval_2026", "ocrbench")


class MetricInputError(ValueError):
    """A metric got input it cannot score (wrong type, empty answer list, unknown option or
    category, mismatched lengths); the message says what was wrong and what to pass instead."""


class UnknownMetricError(LookupError):
    """:func:`get_metric` got a name that is not in :data:`METRICS`; the message lists the names."""


# --------------------------------------------------------------------------------------------
# input checks shared by every metric
# --------------------------------------------------------------------------------------------


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise MetricInputError(
            f"{what} must be a str, got {type(value).__name__} ({value!r:.60}); decode the model "
            f"output / read the dataset field as text before scoring."
        )
    return value


def _check_answers(answers: object, what: str = "answers") -> list[str]:
    """A non-empty list of ground-truth strings (a bare str is refused: it would be iterated
    character by character)."""
    if isinstance(answers, str):
        raise MetricInputError(
            f"{what} must be a list of strings, got a single str {answers!r:.60}; wrap one answer "
            f"as [answer]."
        )
    if not isinstance(answers, Sequence):
        raise MetricInputError(
            f"{what} must be a list of strings, got {type(answers).__name__}."
        )
    if len(answers) == 0:
        raise MetricInputError(
            f"{what} is empty: a question needs at least one ground-truth answer to be scored "
            f"(drop unanswerable questions before scoring)."
        )
    for i, answer in enumerate(answers):
        _check_text(answer, f"{what}[{i}]")
    return list(answers)


def _check_same_length(predictions: Sequence[object], *others: tuple[str, Sequence[object]]) -> None:
    if isinstance(predictions, str):
        raise MetricInputError("predictions must be a list of strings (one per question), got a str.")
    if len(predictions) == 0:
        raise MetricInputError("predictions is empty: there is nothing to average over.")
    for name, seq in others:
        if isinstance(seq, str) or len(seq) != len(predictions):
            got = "a str" if isinstance(seq, str) else f"{len(seq)} entries"
            raise MetricInputError(
                f"{name} must have one entry per prediction ({len(predictions)}), got {got}."
            )


def _mean(values: Sequence[float]) -> float:
    """lmms-eval's ``mean`` aggregation, ``sum(arr) / len(arr)`` (same float rounding)."""
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------
# Levenshtein distance
# --------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance between ``a`` and ``b``: the least number of single-character insertions,
    deletions and substitutions (each cost 1) that turn one into the other.

    Two-row dynamic programme over the shorter string, O(len(a) * len(b)) time, O(min) memory;
    the same recurrence as lmms-eval's ``levenshtein_distance``. Characters are Python code
    points (no Unicode normalisation), as in lmms-eval.
    """
    _check_text(a, "a")
    _check_text(b, "b")
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))  # distance from a[:i] to b[:0] is i
    for j, char_b in enumerate(b, start=1):
        current = [j]  # distance from a[:0] to b[:j] is j
        for i, char_a in enumerate(a, start=1):
            current.append(
                min(
                    previous[i] + 1,  # delete char_b
                    current[i - 1] + 1,  # insert char_b
                    previous[i - 1] + (char_a != char_b),  # substitute (free if equal)
                )
            )
        previous = current
    return previous[-1]


# --------------------------------------------------------------------------------------------
# ANLS (DocVQA)
# --------------------------------------------------------------------------------------------


def anls_normalize(text: str) -> str:
    """ANLS's normalisation (docs/method.md §6): ``" ".join(text.strip().lower().split())``:
    lowercase, whitespace runs collapsed to one space, ends trimmed."""
    return " ".join(_check_text(text, "text").strip().lower().split())


def anls(
    prediction: str,
    answers: Sequence[str],
    threshold: float = 0.5,
    *,
    length_basis: LengthBasis = "raw",
) -> float:
    """Average-normalised-Levenshtein similarity of one question (docs/method.md §6, DocVQA).

    For every ground truth g: NL(g) = levenshtein(norm(g), norm(pred)) / max(len(g), len(pred)),
    0 when that length is 0; q = 1 - min_g NL(g); q is set to 0 when q < ``threshold`` (so a
    normalised distance of exactly 0.5 keeps q = 0.5).

    Lengths. docs/method.md §6 says "max(len(raw gt), len(raw pred))" and lmms-eval indeed divides by the
    lengths of the RAW, un-normalised strings, measured as ``len(s.upper())`` (``"ß".upper()`` is
    ``"SS"``, so that length can even exceed ``len(s)``), while the distance is taken between the
    normalised strings. Extra whitespace therefore lowers NL: gt ``"  abc  "`` vs pred ``"abd"``
    scores 1 - 1/7, not 1 - 1/3. ``length_basis="raw"`` (default) reproduces that;
    ``"normalized"`` divides by the normalised lengths (the textbook ANLS).

    Args:
        prediction: the model's answer, one string.
        answers: the question's ground truths, a non-empty list of strings.
        threshold: tau in [0, 1]; lmms-eval and the DocVQA challenge use 0.5.
        length_basis: ``"raw"`` (lmms-eval) or ``"normalized"``.

    Returns:
        q in [0, 1].
    """
    _check_text(prediction, "prediction")
    gts = _check_answers(answers)
    check_choice("length_basis", length_basis, ("raw", "normalized"), error=MetricInputError)
    threshold = check_fraction("threshold", threshold, error=MetricInputError)
    pred_norm = anls_normalize(prediction)
    distances = []
    for gt in gts:
        gt_norm = anls_normalize(gt)
        dist = levenshtein(gt_norm, pred_norm)
        if length_basis == "raw":
            length = max(len(gt.upper()), len(prediction.upper()))
        else:
            length = max(len(gt_norm), len(pred_norm))
        distances.append(0.0 if length == 0 else float(dist) / float(length))
    q = 1 - min(distances)
    return 0.0 if q < threshold else q


def anls_score(
    predictions: Sequence[str],
    answers_list: Sequence[Sequence[str]],
    threshold: float = 0.5,
    *,
    length_basis: LengthBasis = "raw",
) -> float:
    """Mean of :func:`anls` over questions (lmms-eval's ``mean`` aggregation).

    Args:
        predictions: (N,) one answer per question.
        answers_list: (N,) the ground-truth list of each question.
    """
    _check_same_length(predictions, ("answers_list", answers_list))
    return _mean(
        [
            anls(p, a, threshold, length_basis=length_basis)
            for p, a in zip(predictions, answers_list, strict=True)
        ]
    )


# --------------------------------------------------------------------------------------------
# VQA accuracy (TextVQA, VQAv2): the EvalAI answer normalisation
# --------------------------------------------------------------------------------------------

# The tables below are lmms-eval's EvalAIAnswerProcessor tables (same keys, values and order as
# the official VQA evaluation script), including their oddities: the capitalised keys "Id've",
# "Im", "Ive" can never match (words are lowercased first), and "somebody'd" maps to "somebodyd".
CONTRACTIONS: Mapping[str, str] = MappingProxyType(
    {
        "aint": "ain't",
        "arent": "aren't",
        "cant": "can't",
        "couldve": "could've",
        "couldnt": "couldn't",
        "couldn'tve": "couldn't've",
        "couldnt've": "couldn't've",
        "didnt": "didn't",
        "doesnt": "doesn't",
        "dont": "don't",
        "hadnt": "hadn't",
        "hadnt've": "hadn't've",
        "hadn'tve": "hadn't've",
        "hasnt": "hasn't",
        "havent": "haven't",
        "hed": "he'd",
        "hed've": "he'd've",
        "he'dve": "he'd've",
        "hes": "he's",
        "howd": "how'd",
        "howll": "how'll",
        "hows": "how's",
        "Id've": "I'd've",
        "I'dve": "I'd've",
        "Im": "I'm",
        "Ive": "I've",
        "isnt": "isn't",
        "itd": "it'd",
        "itd've": "it'd've",
        "it'dve": "it'd've",
        "itll": "it'll",
        "let's": "let's",
        "maam": "ma'am",
        "mightnt": "mightn't",
        "mightnt've": "mightn't've",
        "mightn'tve": "mightn't've",
        "mightve": "might've",
        "mustnt": "mustn't",
        "mustve": "must've",
        "neednt": "needn't",
        "notve": "not've",
        "oclock": "o'clock",
        "oughtnt": "oughtn't",
        "ow's'at": "'ow's'at",
        "'ows'at": "'ow's'at",
        "'ow'sat": "'ow's'at",
        "shant": "shan't",
        "shed've": "she'd've",
        "she'dve": "she'd've",
        "she's": "she's",
        "shouldve": "should've",
        "shouldnt": "shouldn't",
        "shouldnt've": "shouldn't've",
        "shouldn'tve": "shouldn't've",
        "somebody'd": "somebodyd",
        "somebodyd've": "somebody'd've",
        "somebody'dve": "somebody'd've",
        "somebodyll": "somebody'll",
        "somebodys": "somebody's",
        "someoned": "someone'd",
        "someoned've": "someone'd've",
        "someone'dve": "someone'd've",
        "someonell": "someone'll",
        "someones": "someone's",
        "somethingd": "something'd",
        "somethingd've": "something'd've",
        "something'dve": "something'd've",
        "somethingll": "something'll",
        "thats": "that's",
        "thered": "there'd",
        "thered've": "there'd've",
        "there'dve": "there'd've",
        "therere": "there're",
        "theres": "there's",
        "theyd": "they'd",
        "theyd've": "they'd've",
        "they'dve": "they'd've",
        "theyll": "they'll",
        "theyre": "they're",
        "theyve": "they've",
        "twas": "'twas",
        "wasnt": "wasn't",
        "wed've": "we'd've",
        "we'dve": "we'd've",
        "weve": "we've",
        "werent": "weren't",
        "whatll": "what'll",
        "whatre": "what're",
        "whats": "what's",
        "whatve": "what've",
        "whens": "when's",
        "whered": "where'd",
        "wheres": "where's",
        "whereve": "where've",
        "whod": "who'd",
        "whod've": "who'd've",
        "who'dve": "who'd've",
        "wholl": "who'll",
        "whos": "who's",
        "whove": "who've",
        "whyll": "why'll",
        "whyre": "why're",
        "whys": "why's",
        "wont": "won't",
        "wouldve": "would've",
        "wouldnt": "wouldn't",
        "wouldnt've": "wouldn't've",
        "wouldn'tve": "wouldn't've",
        "yall": "y'all",
        "yall'll": "y'all'll",
        "y'allll": "y'all'll",
        "yall'd've": "y'all'd've",
        "y'alld've": "y'all'd've",
        "y'all'dve": "y'all'd've",
        "youd": "you'd",
        "youd've": "you'd've",
        "you'dve": "you'd've",
        "youll": "you'll",
        "youre": "you're",
        "youve": "you've",
    }
)
"""Contraction written without its apostrophe -> with it (applied word by word, last)."""

NUMBER_MAP: Mapping[str, str] = MappingProxyType(
    {
        "none": "0",
        "zero": "0",
        "one": "1",
        "two": "2",
        "three": "3",
        "four": "4",
        "five": "5",
        "six": "6",
        "seven": "7",
        "eight": "8",
        "nine": "9",
        "ten": "10",
    }
)
"""Number word -> digits (only zero..ten, and "none" -> "0")."""

ARTICLES: tuple[str, ...] = ("a", "an", "the")
"""Words dropped after number mapping."""

PUNCTUATIONS: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip
"""Characters removed or spaced out by :func:`vqa_process_punctuation`. Not in the list: the
apostrophe (contractions keep it), the period (handled by :data:`PERIOD_STRIP`), ``:``, ``%``,
``#``, ``$``, ``&``, ``*``, ``'``, ``|``, ``~``, ``^``."""

PERIOD_STRIP: re.Pattern[str] = re.compile(r"(?!<=\d)(\.)(?!\d)")
"""A period NOT followed by a digit. ``(?!<=\\d)`` is, as in the original, a negative LOOKAHEAD
for the two characters "<=" + digit (a typo for a lookbehind), so it never blocks anything: "3.5"
keeps its period only because a digit follows it, "5." loses it."""

COMMA_STRIP: re.Pattern[str] = re.compile(r"(?<=\d)(\,)+(?=\d)")
"""Commas between two digits ("1,000"): when present anywhere, punctuation is deleted rather than
replaced by spaces (the regex is only searched for, never substituted)."""

_PERIOD_STRIP_COUNT = int(re.UNICODE)
"""lmms-eval calls ``PERIOD_STRIP.sub("", text, re.UNICODE)``: the flag lands in the ``count``
argument, so at most ``int(re.UNICODE) == 32`` periods are removed per string."""


def vqa_word_tokenize(text: str) -> str:
    """EvalAI ``word_tokenize``: lowercase; delete every "," and "?"; "'s" -> " 's"; strip."""
    text = text.lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def vqa_process_punctuation(text: str) -> str:
    """EvalAI ``processPunctuation``.

    For each character p of :data:`PUNCTUATIONS`, in order: if the INPUT text has p next to a
    space (``p + " "`` or ``" " + p``) or contains a comma between digits (:data:`COMMA_STRIP`),
    every p is deleted; otherwise every p becomes a space. Then periods not followed by a digit
    are deleted (:data:`PERIOD_STRIP`, at most 32 of them). Examples (worked by hand):
    ``"x-ray"`` -> ``"x ray"``; ``"x - ray"`` -> ``"x  ray"``; ``"1,000-2"`` -> ``"10002"``.
    """
    out = text
    comma_between_digits = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """EvalAI ``processDigitArticle``: lowercase and split on whitespace; map number words to
    digits (:data:`NUMBER_MAP`); drop articles (:data:`ARTICLES`); then restore contractions
    (:data:`CONTRACTIONS`); join with single spaces. ``"The Two dogs dont"`` -> ``"2 dogs don't"``.
    """
    words = [NUMBER_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def vqa_normalize(text: str) -> str:
    """The full EvalAI answer processor (``EvalAIAnswerProcessor.__call__``):
    :func:`vqa_word_tokenize`, newlines and tabs to spaces, strip,
    :func:`vqa_process_punctuation`, :func:`vqa_process_digit_article`.

    Because the first step already deletes every comma, "1,000" -> "1000" here and the
    comma-between-digits rule never fires on this path (it does in the VQAv2 protocol, which
    applies the last two steps alone to the ground truths).
    """
    text = vqa_word_tokenize(_check_text(text, "text"))
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = vqa_process_punctuation(text)
    return vqa_process_digit_article(text)


def _tabs_to_spaces(text: str) -> str:
    """lmms-eval's vqav2 preprocessing of an answer: newlines and tabs -> spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """mean over i of min(1, #{j != i : answers[j] == prediction} / 3) (strings already
    normalised). ``statistics.mean`` as in lmms-eval (exact rational mean, one rounding)."""
    n_match = sum(answer == prediction for answer in answers)
    per_subset = [
        min(1, float(n_match - (answer == prediction)) / 3) for answer in answers
    ]
    return statistics.mean(per_subset)


def vqa_accuracy(
    prediction: str,
    answers: Sequence[str],
    *,
    protocol: VqaProtocol = "textvqa",
) -> float:
    """VQA accuracy of one question (docs/method.md §6): the mean, over the leave-one-out subsets
    of the ground truths (10 subsets of 9 for the usual 10 answers), of min(1, matches / 3).

    With k of 10 answers equal to the prediction: k = 0 -> 0; k = 1 -> 9 subsets with 1 match
    and 1 with 0 -> 9 * (1/3) / 10 = 0.3; k = 2 -> 0.6; k = 3 -> 7 * 1 + 3 * (2/3) -> 0.9;
    k >= 4 -> 1.

    Normalisation (``protocol``):
        ``"textvqa"`` (default; lmms-eval's textvqa task): :func:`vqa_normalize` on the
        prediction and on every ground truth.
        ``"vqav2"`` (lmms-eval's vqav2 task up to v0.4, after the official VQA script): the
        prediction gets :func:`vqa_normalize`; the ground truths get newlines/tabs -> spaces and
        strip; only when they are not all equal do both the ground truths and the (already
        normalised) prediction go through :func:`vqa_process_punctuation` +
        :func:`vqa_process_digit_article` (no lowercasing of the ground truths otherwise, no "'s"
        split for them: gt "man's" never equals a prediction normalised to "man 's").
        ``"vqav2_2025"`` (lmms-eval's vqav2 task since commits b439d82 and 28ea9a1, July and
        August 2025): the prediction and every ground truth get newlines/tabs -> spaces, strip,
        :func:`vqa_process_punctuation` and :func:`vqa_process_digit_article`, always, and
        nothing else (no :func:`vqa_word_tokenize`: "?" becomes a space, "'s" is not split).

    Args:
        prediction: the model's answer.
        answers: the annotators' answers (10 for TextVQA / VQAv2), non-empty; leave-one-out by
            position (lmms-eval's vqav2 drops the dict equal to the held-out one, which is the
            same thing for answers with distinct ``answer_id``). A single answer always scores 0.

    Returns:
        accuracy in [0, 1].
    """
    _check_text(prediction, "prediction")
    gts = _check_answers(answers)
    check_choice("protocol", protocol, VQA_PROTOCOLS, error=MetricInputError)
    if protocol == "vqav2_2025":
        pred, *gts = [vqa_process_digit_article(vqa_process_punctuation(_tabs_to_spaces(t))) for t in (prediction, *gts)]
        return _leave_one_out_accuracy(pred, gts)
    pred = vqa_normalize(prediction)
    if protocol == "textvqa":
        gts = [vqa_normalize(gt) for gt in gts]
    else:
        gts = [_tabs_to_spaces(gt) for gt in gts]
        if len(set(gts)) > 1:
            gts = [vqa_process_digit_article(vqa_process_punctuation(gt)) for gt in gts]
            pred = vqa_process_digit_article(vqa_process_punctuation(pred))
    return _leave_one_out_accuracy(pred, gts)


def vqa_score(
    predictions: Sequence[str],
    answers_list: Sequence[Sequence[str]],
    *,
    protocol: VqaProtocol = "textvqa",
) -> float:
    """Mean of :func:`vqa_accuracy` over questions. predictions: (N,); answers_list: (N,) lists."""
    _check_same_length(predictions, ("answers_list", answers_list))
    return _mean(
        [
            vqa_accuracy(p, a, protocol=protocol)
            for p, a in zip(predictions, answers_list, strict=True)
        ]
    )


# --------------------------------------------------------------------------------------------
# OCRBench
# --------------------------------------------------------------------------------------------

OCRBENCH_CATEGORIES: tuple[str, ...] = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
"""OCRBench's ``question_type`` values (1000 questions: 6 x 50 recognition, 3 x 200 VQA/KIE,
100 handwritten math)."""

HME_CATEGORY = "Handwritten Mathematical Expression Recognition"
"""The category scored with the math rule. lmms-eval selects those rows by ``dataset ==
"HME100k"``; in OCRBench the two coincide (the 100 HMER questions are the HME100k rows)."""


def fold_fullwidth_ascii(text: str) -> str:
    """Fullwidth ASCII forms U+FF01..U+FF5E -> their ASCII characters (code point - 0xFEE0) and the
    ideographic space U+3000 -> " ", nothing else (no NFKC): lmms-eval's OCRBench
    ``_fold_fullwidth_ascii`` (2026). ``"ＡＢＣ１２３"`` -> ``"ABC123"``."""
    return "".join(
        chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else " " if c == "\u3000" else c for c in text
    )


def ocrbench_correct(
    prediction: str,
    answers: str | Sequence[str],
    category: str,
    *,
    protocol: OcrBenchProtocol = "lmms_eval",
) -> bool:
    """OCRBench's rule for one question (docs/method.md §6): correct when some ground truth, after
    normalisation, is a substring of the normalised prediction.

    - every category but :data:`HME_CATEGORY`: both sides lowercased, stripped, newlines -> spaces;
    - :data:`HME_CATEGORY`: both sides stripped, then every space and newline removed, no
      lowercasing of the ground truth. With ``protocol="lmms_eval"`` (default) the prediction has
      already been lowercased and stripped (lmms-eval does ``pred = results[0].lower().strip()``
      before either rule), so an uppercase letter in the ground truth can never be matched
      ("\\frac{A}{B}" is never found) and "X" in the prediction matches "x" in the ground truth.
      ``protocol="ocrbench"`` is the benchmark authors' script: the prediction keeps its case,
      i.e. the fully case-sensitive reading of docs/method.md §6. ``protocol="lmms_eval_2026"``
      is lmms-eval since commits f54dd28 and bbddc79 (April and July 2026): the prediction keeps
      its case as in ``"ocrbench"``, and in every other category both sides first go through
      :func:`fold_fullwidth_ascii` ("１２３" matches "123").

    An empty (or all-space) ground truth is a substring of anything, hence correct, as in both
    originals.

    Args:
        prediction: the model's answer.
        answers: one ground truth or a non-empty list of them (OCRBench stores either).
        category: the question's ``question_type``, one of :data:`OCRBENCH_CATEGORIES`.
        protocol: ``"lmms_eval"``, ``"lmms_eval_2026"`` or ``"ocrbench"``.
    """
    _check_text(prediction, "prediction")
    gts = [_check_text(answers, "answers")] if isinstance(answers, str) else _check_answers(answers)
    check_choice("protocol", protocol, OCRBENCH_PROTOCOLS, error=MetricInputError)
    if category not in OCRBENCH_CATEGORIES:
        raise MetricInputError(
            f"unknown OCRBench category {category!r}; pass the row's question_type, one of "
            f"{list(OCRBENCH_CATEGORIES)}."
        )
    pred = prediction.lower().strip() if protocol == "lmms_eval" else prediction
    if category == HME_CATEGORY:
        predict = pred.strip().replace("\n", " ").replace(" ", "")
        return any(gt.strip().replace("\n", " ").replace(" ", "") in predict for gt in gts)
    fold = fold_fullwidth_ascii if protocol == "lmms_eval_2026" else str
    predict = fold(pred).lower().strip().replace("\n", " ")
    return any(fold(gt).lower().strip().replace("\n", " ") in predict for gt in gts)


def ocrbench_score(
    predictions: Sequence[str],
    answers_list: Sequence[str | Sequence[str]],
    categories: Sequence[str],
    *,
    protocol: OcrBenchProtocol = "lmms_eval",
) -> float:
    """Fraction of questions :func:`ocrbench_correct` accepts: correct / N. On the full benchmark
    (N = 1000) this is lmms-eval's ``Final_score / 1000``.

    Args:
        predictions: (N,) answers; answers_list: (N,) ground truths; categories: (N,)
        question_type of each question.
    """
    _check_same_length(predictions, ("answers_list", answers_list), ("categories", categories))
    correct = [
        float(ocrbench_correct(p, a, c, protocol=protocol))
        for p, a, c in zip(predictions, answers_list, categories, strict=True)
    ]
    return _mean(correct)


# --------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# --------------------------------------------------------------------------------------------


def relaxed_float(text: str) -> float | None:
    """lmms-eval's ``_to_float``: ``float(text)``, or ``float(text.rstrip("%")) / 100`` when the
    text ends with "%"; ``None`` when Python's ``float`` refuses it. Python's ``float`` accepts
    surrounding whitespace, "1e3", "1_000", "inf", "nan"; it refuses "1,000" and "$5"; and
    "12% " (trailing space) is not a percentage: it is refused."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def chartqa_relaxed(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed correctness (docs/method.md §6; lmms-eval ``relaxed_correctness``).

    Both strings go through :func:`relaxed_float`. When the prediction parses and the target
    parses to a NON-ZERO number t: correct iff |p - t| / |t| <= ``tolerance``. Otherwise
    (target not numeric, target zero, or prediction not numeric): correct iff
    ``prediction.lower() == target.lower()``, without stripping. So a zero target needs the
    exact same string ("0.0" vs "0" is wrong), and "12%" vs "0.12" is right (0.12 vs 0.12).

    Args:
        prediction: the model's answer (not stripped, as in lmms-eval).
        target: the single ChartQA label.
        tolerance: maximal relative error, 0.05 in ChartQA.
    """
    _check_text(prediction, "prediction")
    _check_text(target, "target")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise MetricInputError(f"tolerance must be a finite number >= 0, got {tolerance!r}.")
    pred_value = relaxed_float(prediction)
    target_value = relaxed_float(target)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= tolerance
    return prediction.lower() == target.lower()


def chartqa_score(predictions: Sequence[str], targets: Sequence[str], tolerance: float = 0.05) -> float:
    """Relaxed accuracy: the fraction of questions :func:`chartqa_relaxed` accepts.
    predictions, targets: (N,) strings."""
    _check_same_length(predictions, ("targets", targets))
    return _mean(
        [float(chartqa_relaxed(p, t, tolerance)) for p, t in zip(predictions, targets, strict=True)]
    )


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def _anls_metric(prediction: str, answers: Sequence[str]) -> float:
    return anls(prediction, answers)


def _vqa_metric(prediction: str, answers: Sequence[str]) -> float:
    return vqa_accuracy(prediction, answers, protocol="textvqa")


def _vqav2_metric(prediction: str, answers: Sequence[str], *, protocol: VqaProtocol = "vqav2") -> float:
    return vqa_accuracy(prediction, answers, protocol=protocol)


def _ocrbench_metric(
    prediction: str, answers: str | Sequence[str], *, category: str, protocol: OcrBenchProtocol = "lmms_eval"
) -> float:
    return float(ocrbench_correct(prediction, answers, category, protocol=protocol))


def _relaxed_metric(prediction: str, answers: str | Sequence[str]) -> float:
    if isinstance(answers, str):
        target = answers
    else:
        if isinstance(answers, Sequence) and len(answers) != 1:
            raise MetricInputError(
                f"relaxed_accuracy scores against ONE ChartQA label, got {len(answers)} answers; "
                f"pass the row's 'answer' string (or a one-element list)."
            )
        target = _check_answers(answers)[0]
    return float(chartqa_relaxed(prediction, target))


METRICS: Mapping[str, Callable[..., float]] = MappingProxyType(
    {
        "anls": _anls_metric,
        "vqa_accuracy": _vqa_metric,
        "vqav2_accuracy": _vqav2_metric,
        "ocrbench_accuracy": _ocrbench_metric,
        "relaxed_accuracy": _relaxed_metric,
    }
)
"""Metric name -> per-question scorer ``fn(prediction, answers, **fields) -> float`` in [0, 1];
a benchmark's score is the mean over its questions. Names: ``anls`` (DocVQA), ``vqa_accuracy``
(TextVQA protocol), ``vqav2_accuracy`` (VQAv2 protocol; ``protocol=`` picks the version),
``ocrbench_accuracy`` (needs ``category=``; ``protocol=`` as :func:`ocrbench_correct`),
``relaxed_accuracy`` (ChartQA; one label). The defaults are lmms-eval v0.3.4's."""


def get_metric(name: str) -> Callable[..., float]:
    """The per-question scorer registered under ``name`` in :data:`METRICS`.

    Raises:
        UnknownMetricError: ``name`` is not registered; the message lists the known names.
    """
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise UnknownMetricError(
            f"unknown metric {name!r}; known metrics: {sorted(METRICS)}."
        ) from None
