"""The inputs of the lmms-eval differential suite: per benchmark, dataset rows ("docs", in the hub
schema, without images) and a raw model answer for each, hand-picked and random.

``make_reference.py`` runs lmms-eval's own task code on these cases and stores its answers
beside them in ``reference/<benchmark>.json``; ``test_lmms_eval_differential.py`` runs the
project's code on the same cases and compares. The cases are built here once, deterministically
(``random.Random(seed)``), and committed inside the reference files: the tests read them from
there, never from this module, so a change here cannot silently change what is compared.

Random answers are dressed the way model outputs go wrong: surrounding whitespace and newlines,
case, trailing punctuation, articles and number words, near-miss edits, percent signs, option
letters in every format MMBench's rules know, fullwidth characters, stop strings.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any

#: The benchmarks of the suite, in the order of ``sparsemm_utils.benchmarks.BENCHMARKS``.
BENCHMARKS = ("docvqa", "textvqa", "ocrbench", "chartqa", "mmbench", "gqa", "vqav2", "textcaps")
N_RANDOM = 260
SEED = 22

_WS = ["", "", "", " ", "\n", "  ", " \n", "\n\n", "\t", "\n "]
_WORDS = [
    "yes", "no", "blue", "Red", "cat", "the dog", "man's hat", "t-shirt", "STOP", "exit", "John Smith", "Coca-Cola",
    "two", "2", "ten", "1,000", "3.5", "12%", "$1,250.00", "1998", "March 3, 1998", "N/A", "a cat", "an apple",
    "dont", "don't", "x-ray", "O'Neil", "New York", "U.S.A.", "42", "0", "none", "wooden", "left", "right",
]  # fmt: skip


def _dress(rng: random.Random, text: str) -> str:
    """``text`` with random surrounding whitespace, case and trailing punctuation."""
    r = rng.random()
    if r < 0.15:
        text = text.upper()
    elif r < 0.3:
        text = text.lower()
    elif r < 0.4:
        text = text.title()
    if rng.random() < 0.2:
        text += rng.choice([".", "!", "?", ",", " .", ".\n"])
    return rng.choice(_WS) + text + rng.choice(_WS)


def _edit(rng: random.Random, text: str) -> str:
    """One random character inserted, deleted or substituted."""
    if not text:
        return rng.choice(string.ascii_letters)
    i = rng.randrange(len(text))
    op = rng.random()
    char = rng.choice(string.ascii_letters + string.digits + " ")
    if op < 0.33:
        return text[:i] + char + text[i:]
    if op < 0.66:
        return text[:i] + text[i + 1 :]
    return text[:i] + char + text[i + 1 :]


def _pick(rng: random.Random, gts: list[str], pool: list[str]) -> str:
    """A raw answer: a dressed ground truth, a near miss, or something else."""
    r = rng.random()
    if r < 0.5:
        return _dress(rng, rng.choice(gts))
    if r < 0.75:
        return _dress(rng, _edit(rng, rng.choice(gts)))
    return _dress(rng, rng.choice(pool))


# --------------------------------------------------------------------------------------------
# per benchmark: hand-picked cases, then a random case generator


def _docvqa(rng: random.Random, i: int) -> dict[str, Any]:
    gts = rng.sample(_WORDS, rng.randint(1, 3))
    if rng.random() < 0.15:
        gts[0] = " " + gts[0] + "  "
    return {"doc": {"questionId": str(50000 + i), "question": f"What is written in box {i}?", "answers": gts}, "raw": _pick(rng, gts, _WORDS)}


_DOCVQA_HAND = [
    ({"questionId": "1", "question": "Which year?", "answers": ["1998"]}, "1999 \n"),  # the case: 0.75
    ({"questionId": "2", "question": "Which year?", "answers": ["1998"]}, "1998"),
    ({"questionId": "3", "question": "Name?", "answers": ["  abc  "]}, "abd"),  # raw length 7 on the gt side
    ({"questionId": "4", "question": "Amount?", "answers": ["$1,250.00", "1250"]}, " 1250\n"),
    ({"questionId": "5", "question": "Empty?", "answers": ["x"]}, "\n\n"),
    ({"questionId": "6", "question": "Case?", "answers": ["JOHN"]}, "john"),
    ({"questionId": "7", "question": "Half?", "answers": ["ab"]}, "ac"),  # exactly 0.5 is kept
]


def _textvqa(rng: random.Random, i: int) -> dict[str, Any]:
    pool = rng.sample(_WORDS, 4)
    answers = [rng.choice(pool) for _ in range(10)]
    return {
        "doc": {"question_id": 30000 + i, "question": f"what does the sign {i} say?", "answers": answers, "image_id": f"img{i}"},
        "raw": _pick(rng, answers, _WORDS),
    }


_TEXTVQA_HAND = [
    ({"question_id": 1, "question": "what brand?", "answers": ["coca cola"] * 10, "image_id": "a"}, "Coca-Cola\n"),
    ({"question_id": 2, "question": "how many?", "answers": ["two"] * 3 + ["2"] * 7, "image_id": "b"}, " 2 "),
    ({"question_id": 3, "question": "what word?", "answers": ["stop"] * 10, "image_id": "c"}, "STOP ASSISTANT: go"),
    ({"question_id": 4, "question": "what?", "answers": ["man's"] * 10, "image_id": "d"}, "man's"),
]

_OCR_CATEGORIES = [
    ("Regular Text Recognition", "IIIT5K"), ("Irregular Text Recognition", "CUTE80"),
    ("Artistic Text Recognition", "WordArt"), ("Handwriting Recognition", "IAM"),
    ("Digit String Recognition", "ORAND"), ("Non-Semantic Text Recognition", "NonSemanticText"),
    ("Scene Text-centric VQA", "textVQA"), ("Doc-oriented VQA", "docVQA"),
    ("Key Information Extraction", "FUNSD"), ("Handwritten Mathematical Expression Recognition", "HME100k"),
]  # fmt: skip
_HME = ["\\frac{A}{B}", "x ^ { 2 } + 1", "\\sqrt { 3 }", "a + b = c", "X _ { 1 }", "\\alpha \\times 2"]


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" if c == " " else c for c in text)


def _ocrbench(rng: random.Random, i: int) -> dict[str, Any]:
    category, dataset = rng.choice(_OCR_CATEGORIES)
    if dataset == "HME100k":
        gts = [rng.choice(_HME)]
        core = rng.choice([gts[0], gts[0].replace(" ", ""), gts[0].lower(), gts[0].upper(), rng.choice(_HME)])
        raw = rng.choice(_WS) + rng.choice(["", "The expression is "]) + core + rng.choice(_WS)
    else:
        gts = rng.sample(_WORDS, rng.randint(1, 2))
        core = _pick(rng, gts, _WORDS)
        if rng.random() < 0.15:
            core = _fullwidth(core)
        raw = rng.choice(["", "The text reads ", "Answer: "]) + core
    return {"doc": {"dataset": dataset, "question": f" what is written? {i} ", "question_type": category, "answer": gts}, "raw": raw}


_OCRBENCH_HAND = [
    ({"dataset": "HME100k", "question": "Write the LaTeX", "question_type": _OCR_CATEGORIES[9][0], "answer": ["\\frac{A}{B}"]}, "\\frac{A}{B}"),
    ({"dataset": "HME100k", "question": "Write the LaTeX", "question_type": _OCR_CATEGORIES[9][0], "answer": ["x^{2}"]}, "X^{2}"),
    ({"dataset": "IIIT5K", "question": "read", "question_type": _OCR_CATEGORIES[0][0], "answer": ["ABC123"]}, "ＡＢＣ１２３"),
    ({"dataset": "docVQA", "question": "read", "question_type": _OCR_CATEGORIES[7][0], "answer": ["12%"]}, "12%\n"),
]


def _number(rng: random.Random) -> str:
    value = rng.choice([0, 1, 3.5, 12, 47.3, 100, 1250, 0.05, 88])
    text = f"{value}"
    return text + "%" if rng.random() < 0.2 else text


def _chartqa(rng: random.Random, i: int) -> dict[str, Any]:
    kind = rng.choice(["human_test", "augmented_test"])
    if rng.random() < 0.7:
        answer = _number(rng)
        value = float(answer.rstrip("%")) if answer else 0.0
        core = rng.choice(
            [answer, f"{value * rng.choice([0.94, 0.96, 1.0, 1.04, 1.06]):.4g}", f"{value}%", f"{value / 100}", answer + "%"]
        )
    else:
        answer = rng.choice(["Yes", "No", "Blue", "2019", "Asia"])
        core = rng.choice([answer, answer.lower(), "red"])
    return {"doc": {"type": kind, "question": f"What is the value of bar {i}?", "answer": answer}, "raw": rng.choice(_WS) + core + rng.choice(_WS)}


_CHARTQA_HAND = [
    ({"type": "human_test", "question": "Share?", "answer": "12%"}, "12%\n"),  # the case
    ({"type": "augmented_test", "question": "Zero?", "answer": "0"}, "0.0"),
    ({"type": "augmented_test", "question": "Share?", "answer": "0.12"}, "12%"),
    ({"type": "human_test", "question": "Word?", "answer": "Yes"}, " yes"),
]


def _options(rng: random.Random) -> list[str | None]:
    words = rng.sample(["cat", "dog", "tree", "red car", "two", "blue sky", "a lamp", "Paris", "circle"], 4)
    if rng.random() < 0.3:
        words[3] = None  # type: ignore[call-overload]
    return words


def _mm_answer(rng: random.Random, letter: str, options: dict[str, str | None]) -> str:
    present = [k for k, v in options.items() if v is not None]
    pick = letter if rng.random() < 0.6 else rng.choice(present)
    forms = [
        pick, f"({pick})", f"{pick}.", f"The answer is {pick}.", f"{pick}: {options[pick]}", f"{options[pick]}",
        f"{pick.lower()}", "I am not sure", f"{pick} or {rng.choice(present)}", f"A cat is {pick}",
        f"Option {pick}", f"{pick}\nASSISTANT: B",
    ]  # fmt: skip
    return rng.choice(_WS) + rng.choice(forms) + rng.choice(_WS)


def _mmbench_group(rng: random.Random, i: int) -> list[dict[str, Any]]:
    """A question and 0-3 circular copies (index + k * 1e6, options rotated)."""
    words = _options(rng)
    letters = "ABCD"
    answer_pos = rng.randrange(sum(w is not None for w in words))
    category = rng.choice(["ocr", "attribute_recognition", "spatial_relationship"])
    hint = rng.choice([None, "Look at the picture.", "nan"])
    cases = []
    present = [w for w in words if w is not None]
    for k in range(rng.randint(1, 4)):
        rotated = present[k % len(present) :] + present[: k % len(present)]
        opts = {letters[j]: (rotated[j] if j < len(rotated) else None) for j in range(4)}
        letter = letters[rotated.index(present[answer_pos])]
        doc = {
            "index": i + k * 1_000_000, "question": f"Which object is in picture {i}?", "hint": hint, "answer": letter,
            **opts, "category": category, "L2-category": "perception", "source": "synthetic", "split": "dev", "comment": None,
        }  # fmt: skip
        cases.append({"doc": doc, "raw": _mm_answer(rng, letter, opts)})
    return cases


_GQA_WORDS = ["yes", "no", "left", "right", "blue", "man", "table", "wooden", "on the left"]


def _gqa(rng: random.Random, i: int) -> dict[str, Any]:
    answer = rng.choice(_GQA_WORDS)
    return {
        "doc": {"id": str(200000 + i), "imageId": f"n{i}", "question": f"Is the cup {i} on the table?", "answer": answer, "fullAnswer": f"It is {answer}."},
        "raw": _pick(rng, [answer], _GQA_WORDS),
    }


_GQA_HAND = [
    ({"id": "1", "imageId": "n1", "question": "Is it?", "answer": "yes", "fullAnswer": "Yes, it is."}, "Yes\n"),  # the case
    ({"id": "2", "imageId": "n2", "question": "Which side?", "answer": "left", "fullAnswer": "On the left."}, "Left."),
]


def _vqav2(rng: random.Random, i: int) -> dict[str, Any]:
    pool = rng.sample(["2", "two", "yes", "no", "man's", "t-shirt", "1,000", "1000", "red", "Red ", "a dog", "dog", "tennis"], 3)
    values = [rng.choice(pool) for _ in range(10)]
    if rng.random() < 0.2:
        values = [values[0]] * 10  # all equal: the pre-2025 rule skips the normalisation
    answers = [{"answer": v, "answer_confidence": rng.choice(["yes", "maybe"]), "answer_id": j + 1} for j, v in enumerate(values)]
    doc = {
        "question_type": "how many", "multiple_choice_answer": values[0], "answers": answers, "image_id": 1000 + i,
        "answer_type": "other", "question_id": 900000 + i, "question": f"How many dogs are in picture {i}?",
    }  # fmt: skip
    return {"doc": doc, "raw": _pick(rng, values, _WORDS + ["Two", "two.", "Man's", "1, 000"])}


_CAPTION_SUBJECTS = ["A red sign", "a man", "The bottle", "A book cover", "a store front", "An old clock", "the jersey"]
_CAPTION_TEXTS = ['"STOP"', "'Coca-Cola'", '"Don\'t Walk"', "the number 23", "$5.99", "50% off", "Dr. Pepper", "U.S. Army", "it's open"]
_CAPTION_TAILS = ["", " on it", " in white letters", " (vintage)", ", next to a tree", " at 12:30pm", "; the shop's name", "!!"]


def _caption(rng: random.Random) -> str:
    verb = rng.choice(["says", "reads", "that says", "with the words", "shows"])
    text = f"{rng.choice(_CAPTION_SUBJECTS)} {verb} {rng.choice(_CAPTION_TEXTS)}{rng.choice(_CAPTION_TAILS)}"
    return text + rng.choice(["", ".", " .", "..."])


def _textcaps(rng: random.Random, i: int) -> dict[str, Any]:
    refs = [_caption(rng) for _ in range(5)]
    raw = rng.choice([_caption(rng), rng.choice(refs), "", "I cannot describe this image."])
    return {"doc": {"image_id": f"{i:016x}", "question": "Please carefully observe the image and come up with a caption for the image.", "caption_str": refs}, "raw": _dress(rng, raw) if raw else raw}


_TEXTCAPS_HAND = [
    ({"image_id": "h1", "question": "caption", "caption_str": ["A sign that says STOP.", "a stop sign", "Red sign reading stop"]}, "A red STOP sign.\n"),
    ({"image_id": "h2", "question": "caption", "caption_str": ["The book's title is 'War' (1999)", "a book", "A book called War"]}, ""),
]

_RANDOM: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "docvqa": _docvqa, "textvqa": _textvqa, "ocrbench": _ocrbench, "chartqa": _chartqa, "gqa": _gqa,
    "vqav2": _vqav2, "textcaps": _textcaps,
}  # fmt: skip
_HAND: dict[str, list[tuple[dict[str, Any], str]]] = {
    "docvqa": _DOCVQA_HAND, "textvqa": _TEXTVQA_HAND, "ocrbench": _OCRBENCH_HAND, "chartqa": _CHARTQA_HAND,
    "gqa": _GQA_HAND, "vqav2": [], "textcaps": _TEXTCAPS_HAND,
}  # fmt: skip


def make_cases(benchmark: str, n_random: int = N_RANDOM, seed: int = SEED) -> list[dict[str, Any]]:
    """The cases of ``benchmark``: ``[{"id", "doc", "raw"}]``, hand-picked (ids ``h<k>``) first, then
    random ones (``r<k>``); for MMBench, whole circular groups (about ``n_random`` rows)."""
    rng = random.Random(f"{seed}-{benchmark}")
    if benchmark == "mmbench":
        cases: list[dict[str, Any]] = []
        group = 0
        while len(cases) < n_random:
            for case in _mmbench_group(rng, group):
                cases.append({"id": f"r{len(cases)}", **case})
            group += 1
        return cases
    hand = [{"id": f"h{k}", "doc": doc, "raw": raw} for k, (doc, raw) in enumerate(_HAND[benchmark])]
    return hand + [{"id": f"r{k}", **_RANDOM[benchmark](rng, k)} for k in range(n_random)]


def make_runs(cases: list[dict[str, Any]], seed: int = SEED, n_subsets: int = 6) -> list[dict[str, Any]]:
    """Sets of cases scored together (the aggregates depend on the set): all of them, and random
    subsets of varying size (for MMBench a subset may hold a circular copy without its main
    question, which lmms-eval then leaves out: the suite checks that too)."""
    rng = random.Random(f"{seed}-runs")
    ids = [c["id"] for c in cases]
    runs = [{"name": "all", "cases": ids}]
    for k in range(n_subsets):
        size = rng.randint(1, max(1, len(ids) // 3)) if k else 1
        runs.append({"name": f"subset{k}", "cases": sorted(rng.sample(ids, size), key=ids.index)})
    return runs
