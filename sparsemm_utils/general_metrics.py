"""Scorers of the general benchmarks (GQA, MMBench) and of the offline reading benchmark, as
lmms-eval computes them (docs/method.md §6 lists these tasks but gives no metric; the OCR metrics
live in :mod:`sparsemm_utils.metrics`).

- ``exact_match`` (GQA; the offline benchmark): lmms-eval's ``exact_match_hf_evaluate``
  (``lmms_eval/api/metrics.py``, ported from HF ``evaluate``) with the options GQA's task YAML
  sets, ``ignore_case: true`` and ``ignore_punctuation: true``: both strings lowercased, every
  ASCII punctuation character (``string.punctuation``) deleted, then compared with ``==``.
  Whitespace is NOT stripped (``"yes "`` is not ``"yes"``), as in lmms-eval.
- ``mmbench_choice`` (MMBench): the option letter a free-form answer names, found by the
  rule-based part of lmms-eval's ``MMBench_Evaluator.can_infer`` (``tasks/mmbench/mmbench_evals.py``),
  compared with the ground-truth letter. lmms-eval asks a GPT judge when the rules find no
  letter; no judge is reachable offline, so such an answer counts as wrong and the prediction
  record says it was unresolved (:func:`mmbench_infer_choice` returns ``None``). With answers
  that are a bare letter, which is what MMBench's post-prompt asks for, the two agree. (The
  circular grouping lmms-eval reports is :func:`sparsemm_utils.lmms_protocol.mmbench_circular_hits`.)
- ``textcaps_cider`` (TextCaps): one image's CIDEr-D within the corpus of a run's references
  (:mod:`sparsemm_utils.cider`); the corpus is a scoring field (``corpus=``), built once per
  benchmark (:func:`sparsemm_utils.lmms_protocol.scoring_context`).

Both follow :mod:`sparsemm_utils.metrics`' calling convention ``fn(prediction, answers, **fields)
-> float`` and are registered in :data:`GENERAL_METRICS`; :func:`get_scorer` looks a name up in
both registries.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .cider import CiderCorpus
from .metrics import METRICS, MetricInputError, UnknownMetricError, _check_answers, _check_text

__all__ = [
    "MMBENCH_LETTERS",
    "exact_match",
    "mmbench_infer_option",
    "mmbench_infer_text",
    "mmbench_infer_choice",
    "mmbench_correct",
    "textcaps_cider",
    "GENERAL_METRICS",
    "ALL_METRIC_NAMES",
    "get_scorer",
]

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)

#: The option letters lmms-eval's MMBench evaluator considers (``can_infer_option(num_choice=5)``).
MMBENCH_LETTERS: str = "ABCDE"


def exact_match(
    prediction: str,
    answers: Sequence[str],
    *,
    ignore_case: bool = True,
    ignore_punctuation: bool = True,
    ignore_numbers: bool = False,
    regexes_to_ignore: Sequence[str] = (),
) -> float:
    """1.0 when the normalised prediction equals a normalised answer, else 0.0 (module docstring).

    Normalisation, in lmms-eval's order: delete each regex of ``regexes_to_ignore``; lowercase
    (``ignore_case``); delete ``string.punctuation`` (``ignore_punctuation``); delete digits
    (``ignore_numbers``). No stripping. lmms-eval compares with the ONE target of the question;
    with several answers any one suffices (the offline and GQA questions have one).

    Example: ``exact_match("Yes.", ["yes"]) == 1.0``; ``exact_match(" yes", ["yes"]) == 0.0``.
    """
    _check_text(prediction, "prediction")
    gts = _check_answers(answers)

    def norm(text: str) -> str:
        for pattern in regexes_to_ignore:
            text = re.sub(pattern, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(_PUNCTUATION_TABLE)
        if ignore_numbers:
            text = text.translate(str.maketrans("", "", string.digits))
        return text

    pred = norm(prediction)
    return float(any(norm(gt) == pred for gt in gts))


def _missing(value: Any) -> bool:
    """``pd.isna`` for the scalars a dataset row holds: None and float NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def mmbench_infer_option(answer: str, num_choice: int = 5) -> str | None:
    """The letter an answer names by itself (lmms-eval ``can_infer_option``), or None.

    Words are ``answer.split()``. A letter among the first ``num_choice`` (A-E) counts when it is
    the only such letter standing alone as a word, unless "A" stands alone in an answer of more
    than three words ("A" may be an article there); otherwise the first of the patterns "X.",
    "X,", "X:", "X)", "X).", "(X)", "(X).", ":X", ":X,", ":X.", ":X)", ":X)." that matches exactly
    one letter decides. Examples: ``"B"`` -> B; ``"The answer is (C)."`` -> C; ``"A cat"`` -> A;
    ``"A or B"`` -> None (two letters); ``"I think A is right"`` -> None (article rule)."""
    _check_text(answer, "answer")
    choices = MMBENCH_LETTERS[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return None

    def count(splits: list[str], letters: str, prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in splits for c in letters)

    splits = [x.strip() for x in answer.split()]
    if count(splits, choices) == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break
            if ch in splits:
                return ch
    patterns = (
        ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"),
        ("(", ")."), (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
    )  # fmt: skip
    for prefix, suffix in patterns:
        if count(splits, choices, prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return None


def mmbench_infer_text(answer: str, options: Mapping[str, Any]) -> str | None:
    """The letter whose option text occurs in the answer (lmms-eval ``can_infer_text``), or None.

    Both lowercased; options A-D whose value is missing (None / NaN) are left out, as
    ``build_choices`` does; exactly one option text must be a substring of the answer.
    Example: options ``{"A": "cat", "B": "dog"}``, answer ``"It is a Dog"`` -> B."""
    _check_text(answer, "answer")
    low = answer.lower()
    found = [k for k in "ABCD" if k in options and not _missing(options[k]) and str(options[k]).lower() in low]
    return found[0] if len(found) == 1 else None


def mmbench_infer_choice(answer: str, options: Mapping[str, Any]) -> str | None:
    """lmms-eval's ``can_infer``: :func:`mmbench_infer_option`, else :func:`mmbench_infer_text`."""
    return mmbench_infer_option(answer) or mmbench_infer_text(answer, options)


def mmbench_correct(prediction: str, answers: str | Sequence[str], *, options: Mapping[str, Any]) -> float:
    """1.0 when the letter inferred from ``prediction`` is the ground-truth letter.

    lmms-eval strips the model response first (``results[0].strip()``). ``answers``: the row's
    ``answer`` letter (or a one-element list); ``options``: the row's ``{"A": ..., "B": ..., ...}``.
    An answer no rule resolves scores 0 (no GPT judge offline; module docstring)."""
    gts = [_check_text(answers, "answers")] if isinstance(answers, str) else _check_answers(answers)
    if len(gts) != 1 or gts[0] not in MMBENCH_LETTERS:
        raise MetricInputError(
            f"mmbench_choice scores against ONE option letter in {list(MMBENCH_LETTERS)}, got {gts!r}; pass the "
            f"row's 'answer' column."
        )
    if not isinstance(options, Mapping):
        raise MetricInputError(f"options must map option letters to texts, got {type(options).__name__}")
    choice = mmbench_infer_choice(_check_text(prediction, "prediction").strip(), options)
    return float(choice == gts[0])


def textcaps_cider(prediction: str, answers: Sequence[str], *, corpus: CiderCorpus) -> float:
    """CIDEr-D of one caption against its image's reference captions, with the document
    frequencies of ``corpus`` (the references of every image of the run, which must include
    ``answers`` for the score to be lmms-eval's). Not bounded by 1 (at most 10)."""
    if not isinstance(corpus, CiderCorpus):
        raise MetricInputError(f"corpus must be a CiderCorpus of the run's references, got {type(corpus).__name__}")
    return corpus.score(_check_text(prediction, "prediction"), _check_answers(answers))


GENERAL_METRICS: Mapping[str, Callable[..., float]] = MappingProxyType(
    {
        "exact_match": exact_match,
        "mmbench_choice": mmbench_correct,
        "textcaps_cider": textcaps_cider,
    }
)
"""Metric name -> per-question scorer, same convention as :data:`sparsemm_utils.metrics.METRICS`."""

_OVERLAP = set(GENERAL_METRICS) & set(METRICS)
if _OVERLAP:  # pragma: no cover - a programming error caught at import
    raise RuntimeError(f"metric names registered twice: {sorted(_OVERLAP)}")

#: Every metric name a benchmark spec may use.
ALL_METRIC_NAMES: tuple[str, ...] = tuple(sorted({*METRICS, *GENERAL_METRICS}))


def get_scorer(name: str) -> Callable[..., float]:
    """The per-question scorer ``name`` from :data:`sparsemm_utils.metrics.METRICS` or
    :data:`GENERAL_METRICS`; :class:`~sparsemm_utils.metrics.UnknownMetricError` lists both."""
    if isinstance(name, str):
        if name in METRICS:
            return METRICS[name]
        if name in GENERAL_METRICS:
            return GENERAL_METRICS[name]
    raise UnknownMetricError(f"unknown metric {name!r}; known metrics: {list(ALL_METRIC_NAMES)}.")
