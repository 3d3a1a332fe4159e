"""TextCaps's metric, CIDEr-D, as lmms-eval computes it (docs/method.md §6).

lmms-eval's ``textcaps`` task (``lmms_eval/tasks/textcaps/utils.py``) hands every caption, the
model's and the references, to pycocoevalcap: ``PTBTokenizer`` (the Stanford CoreNLP 3.4.1
tokenizer, a Java program, run with ``-preserveLines -lowerCase``, then the tokens of a fixed
punctuation list dropped) and ``Cider`` (``cider/cider_scorer.py``). Both are reproduced here in
Python, so that the metric needs neither Java nor the 104 MB pycocoevalcap wheel:

- :func:`ptb_tokenize`: a re-implementation of the tokenizer's rules for caption text (words,
  clitics, numbers, quotes, brackets, symbols, abbreviations), checked token for token against the
  Java tokenizer on the committed differential cases (``tests/differential/``) and the probes of
  ``tests/unit/test_cider.py``; what it does not cover is listed in docs/deviations.md.
- :class:`CiderCorpus`: CIDEr-D rule for rule: n-grams 1..4, document frequencies over the
  references of every image of the run, idf ``log(#images) - log(max(1, df))``, clipped tf-idf
  cosine per n, the Gaussian length penalty with sigma 6 whose "length" is, as in the original,
  the number of BIGRAMS of each caption (``if n == 1: length += term_freq`` with 0-based n), the
  mean over n, divided by the number of references, times 10. The corpus score is the numpy mean
  of the per-image scores, in the run's order.

A question's CIDEr therefore depends on the references of the whole run: :class:`CiderCorpus` is
built once from them, and :meth:`CiderCorpus.score` gives one image's score, the mean of which
over the run is lmms-eval's ``textcaps_CIDEr``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from .metrics import MetricInputError

__all__ = ["PTB_PUNCTUATIONS", "ptb_tokenize", "caption_ngrams", "CiderCorpus", "cider_scores"]

#: pycocoevalcap's ``PUNCTUATIONS``: tokens dropped after tokenizing. The bracket names are
#: upper case, but ``-lowerCase`` makes the tokenizer write "-lrb-": brackets are never dropped.
PTB_PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
#: Abbreviations the tokenizer keeps with their period, as CoreNLP 3.4.1 does on the probes of
#: tests/unit/test_cider.py (titles, company words, months and weekdays, a few others); "No.",
#: "approx.", "lbs.", "kg." and the like are NOT kept: their period is a token of its own.
_ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof st jr sr messrs mt ft gen gov sen rep col capt lt sgt rev hon inc co corp ltd bros vs
    etc jan feb mar apr jun jul aug sep sept oct nov dec dept est univ ave blvd rd cf al sq tel ext mon tue wed
    thu fri""".split()
)
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}

_TOKEN = re.compile(
    r"""
    (?P<email>[\w.+-]+@[\w-]+(?:\.[\w-]+)+)
  | (?P<url>(?:https?://|www\.)[^\s"<>]*[^\s"<>.,;:!?')\]])
  | (?P<sgml><[a-z/][^<>\s]*>)
  | (?P<acronym>(?:[^\W\d_]\.){2,})
  | (?P<decade>'\d\ds\b)
  | (?P<number>\d+(?:[-.,:/]\d+)+)
  | (?P<word>[^\W_](?:&[a-z]+;|[\w&]|[-'/](?=[^\W_])|\.(?=[^\W\d_]\.))*)
  | (?P<ellipsis>\.\.\.)
  | (?P<dashes>--+)
  | (?P<marks>[?!]+)
  | (?P<quotes>``|''|["'`])
  | (?P<other>\S)
    """,
    re.VERBOSE,
)


def _split_clitics(word: str) -> list[str]:
    """``"don't"`` -> ["do", "n't"]; ``"it's"`` -> ["it", "'s"]; ``"can't"`` -> ["ca", "n't"]."""
    lower = word.lower()
    if lower in _SPLIT_WORDS:
        first, second = _SPLIT_WORDS[lower]
        return [word[: len(first)], word[len(first) :]]
    for clitic in _CLITICS:
        if lower.endswith(clitic) and len(word) > len(clitic):
            return [*_split_clitics(word[: -len(clitic)]), word[-len(clitic) :]]
    return [word]


def _tokens(line: str) -> list[str]:
    """The tokenizer's tokens of one line, before lower-casing and the punctuation filter."""
    out: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(line):
        if match.start() < pos:  # the period an abbreviation (or "word.,") took along
            continue
        kind, text = match.lastgroup, match.group()
        if line[pos : match.start()].strip():  # pragma: no cover - every non-space character matches
            raise AssertionError(f"untokenized text {line[pos:match.start()]!r}")
        pos = match.end()
        if kind == "word":
            if text.endswith(".") or "." in text:
                out.append(text)
                continue
            follows = line[match.end() : match.end() + 1]
            if follows == "." and text.lower() in _ABBREVIATIONS:
                # an abbreviation keeps its period; at the end of the line CoreNLP adds a sentence-final "."
                out.append(text + ".")
                pos = match.end() + 1
                continue
            after = line[match.end() + 1 : match.end() + 2]
            pieces = _split_clitics(text)
            if follows == "." and after in (",", ";", ":") and len(pieces) == 1:
                # "image.," -> "image." ","; a word with a clitic splits as usual ("do n't . ,")
                out.append(text + ".")
                pos = match.end() + 1
                continue
            out.extend(pieces)
        elif kind == "quotes":
            opening = match.start() == 0 or line[match.start() - 1].isspace() or line[match.start() - 1] in "([{"
            if text == '"':
                out.append("``" if opening else "''")
            elif text == "'":
                out.append("`" if opening else "'")
            else:
                out.append(text)
        elif kind == "other" and text in _BRACKETS:
            out.append(_BRACKETS[text])
        else:
            out.append(text)
    return out


def ptb_tokenize(caption: str) -> str:
    """One caption as pycocoevalcap's ``PTBTokenizer`` leaves it: newlines -> spaces, the Stanford
    tokenizer's tokens lower-cased, the tokens of :data:`PTB_PUNCTUATIONS` dropped, joined by
    single spaces. ``'A sign: "Don't Stop" (U.S.)!'`` -> ``"a sign do n't stop -lrb- u.s. -rrb-"``.

    A re-implementation for caption text (module docstring): the token rules of Stanford
    CoreNLP 3.4.1's PTBTokenizer that captions exercise."""
    if not isinstance(caption, str):
        raise MetricInputError(f"a caption must be a str, got {type(caption).__name__}")
    tokens = [t.lower() for t in _tokens(caption.replace("\n", " "))]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS)


def caption_ngrams(tokenized: str, n: int = 4) -> Counter:
    """pycocoevalcap's ``precook``: counts of every 1..n-gram of the whitespace-split caption."""
    words = tokenized.split()
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderCorpus:
    """The references of one run (one entry per image, each a non-empty list of captions) and the
    document frequencies CIDEr-D takes from them (module docstring).

    Args:
        references: (images,) lists of reference captions, raw (they are tokenized here).
        n: largest n-gram (4); sigma: the length penalty's width (6.0).
    """

    def __init__(self, references: Sequence[Sequence[str]], *, n: int = 4, sigma: float = 6.0):
        if isinstance(references, str) or len(references) == 0:
            raise MetricInputError("CIDEr needs the reference captions of at least one image")
        self.n, self.sigma = n, sigma
        self.document_frequency: Counter = Counter()
        for refs in references:
            if isinstance(refs, str) or len(refs) == 0:
                raise MetricInputError(f"each image needs a non-empty list of reference captions, got {refs!r:.80}")
            cooked = [caption_ngrams(ptb_tokenize(r), n) for r in refs]
            self.document_frequency.update({g for c in cooked for g in c})
        self.n_images = len(references)
        self.ref_len = float(np.log(float(self.n_images)))

    def _vector(self, counts: Counter) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            df = np.log(max(1.0, self.document_frequency.get(gram, 0.0)))
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (self.ref_len - df)
            norm[k] += pow(vec[k][gram], 2)
            if k == 1:  # the original counts bigrams as the caption's length
                length += tf
        return vec, [float(np.sqrt(v)) for v in norm], length

    def _similarity(self, hyp: tuple, ref: tuple) -> np.ndarray:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        delta = float(len_h - len_r)
        val = np.array([0.0] * self.n)
        for k in range(self.n):
            for gram in vec_h[k]:
                r = vec_r[k].get(gram, 0.0)
                val[k] += min(vec_h[k][gram], r) * r
            if norm_h[k] != 0 and norm_r[k] != 0:
                val[k] /= norm_h[k] * norm_r[k]
            if math.isnan(val[k]):  # pragma: no cover - the original asserts it never happens
                raise MetricInputError("CIDEr produced NaN")
            val[k] *= np.e ** (-(delta**2) / (2 * self.sigma**2))
        return val

    def score(self, caption: str, references: Sequence[str]) -> float:
        """CIDEr-D of one image's caption against its references (which must be one of the
        corpus's entries for the score to be lmms-eval's)."""
        if isinstance(references, str) or len(references) == 0:
            raise MetricInputError("an image needs a non-empty list of reference captions")
        hyp = self._vector(caption_ngrams(ptb_tokenize(caption), self.n))
        total = np.array([0.0] * self.n)
        for ref in references:
            total += self._similarity(hyp, self._vector(caption_ngrams(ptb_tokenize(ref), self.n)))
        return float(np.mean(total) / len(references) * 10.0)


def cider_scores(captions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """lmms-eval's ``textcaps_CIDEr`` of a run: (corpus score, per-image scores). ``captions``:
    (images,) the model's captions; ``references``: (images,) their reference lists."""
    if isinstance(captions, str) or len(captions) != len(references):
        raise MetricInputError("captions and references must be lists of the same length (one entry per image)")
    corpus = CiderCorpus(references)
    scores = [corpus.score(c, r) for c, r in zip(captions, references, strict=True)]
    return float(np.mean(np.array(scores))), scores
