"""TextCaps' CIDEr-D and the PTB tokenizer in front of it (sparsemm_utils.cider), on hand-worked
cases. The tokenizer probes' expected tokens are what pycocoevalcap 1.2's Java tokenizer (Stanford
CoreNLP 3.4.1, ``-preserveLines -lowerCase``) printed for them, before the punctuation filter;
the differential suite (tests/differential/) compares both on 262 captions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils.cider import PTB_PUNCTUATIONS, CiderCorpus, caption_ngrams, cider_scores, ptb_tokenize
from sparsemm_utils.metrics import MetricInputError

#: line -> the Java tokenizer's output (lower-cased), before the punctuation filter
JAVA = {
    'A sign: "Don\'t Stop" (U.S.)!': "a sign : `` do n't stop '' -lrb- u.s. -rrb- !",
    "Dr. Pepper costs $5.99, 50% off.": "dr. pepper costs $ 5.99 , 50 % off .",
    "It's 12:30pm; the shop's name": "it 's 12:30 pm ; the shop 's name",
    "I cannot go... gonna wait--ok?": "i can not go ... gon na wait -- ok ?",
    "this image.,": "this image. ,",
    "don't.,": "do n't . ,",
    "this image.)": "this image . -rrb-",
    "The '90s style 'vintage' sign": "the '90s style ` vintage ' sign",
}


@pytest.mark.parametrize("line, java", list(JAVA.items()))
def test_tokens_match_the_java_tokenizer(line, java):
    assert ptb_tokenize(line) == " ".join(t for t in java.split() if t not in PTB_PUNCTUATIONS)


def test_brackets_are_kept_and_newlines_are_spaces():
    # "-LRB-" is in the filter list upper case only, and -lowerCase writes "-lrb-": kept
    assert ptb_tokenize("(a)\nb") == "-lrb- a -rrb- b"
    with pytest.raises(MetricInputError, match="must be a str"):
        ptb_tokenize(None)  # type: ignore[arg-type]


def test_ngrams():
    counts = caption_ngrams("a b a b", 2)
    assert counts == {("a",): 2, ("b",): 2, ("a", "b"): 2, ("b", "a"): 1}


def test_identical_caption_in_a_two_image_corpus_scores_ten():
    # two images with disjoint words: every n-gram has df 1, idf log 2 on both sides; the caption
    # equals the one reference: cosine 1 for n = 1..4, length penalty 1 -> mean 1, x 10
    corpus = CiderCorpus([["a b c d"], ["w x y z"]])
    assert corpus.score("a b c d", ["a b c d"]) == pytest.approx(10.0)
    # two words: n = 1, 2 give 1, n = 3, 4 have no n-gram (norm 0) and give 0 -> 10 * 2 / 4
    corpus = CiderCorpus([["a b"], ["w x"]])
    assert corpus.score("a b", ["a b"]) == pytest.approx(5.0)


def test_one_image_corpus_scores_zero():
    # idf = log(1) - log(df) = 0 for every n-gram of the references: all vectors are zero
    assert cider_scores(["a b c d"], [["a b c d"]]) == (0.0, [0.0])


def test_length_penalty_counts_bigrams():
    # hyp "a b c d e" (5 words, 4 bigrams) against ref "a b c d" (3 bigrams), the other image
    # disjoint: idf log 2 everywhere ("e" has df 0 -> max(1, 0) -> also log 2). Cosines per n:
    # n=1: 4 / (sqrt5 * 2); n=2: 3 / (2 * sqrt3); n=3: 2 / (sqrt3 * sqrt2); n=4: 1 / sqrt2.
    # The "length" of the original is the bigram count: delta = 4 - 3 = 1, penalty e^(-1/72).
    cosines = [4 / (2 * math.sqrt(5)), 3 / (2 * math.sqrt(3)), 2 / math.sqrt(6), 1 / math.sqrt(2)]
    expected = sum(cosines) / 4 * math.exp(-1 / 72) * 10
    corpus = CiderCorpus([["a b c d"], ["w x y z"]])
    assert corpus.score("a b c d e", ["a b c d"]) == pytest.approx(expected, rel=1e-12)


def test_scores_average_over_the_references():
    corpus = CiderCorpus([["a b c d", "p q r s"], ["w x y z"]])
    one = CiderCorpus([["a b c d", "p q r s"], ["w x y z"]]).score("a b c d", ["a b c d"])
    assert 0 < corpus.score("a b c d", ["a b c d", "p q r s"]) == pytest.approx(one / 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "dog", "sign", "stop"]), min_size=1, max_size=6), min_size=2, max_size=5))
def test_corpus_score_is_the_mean_and_bounded(words):
    captions = [" ".join(w) for w in words]
    references = [[c, "sign"] for c in captions]
    score, scores = cider_scores(captions, references)
    assert score == pytest.approx(sum(scores) / len(scores))
    assert all(0.0 <= s <= 10.0 + 1e-9 for s in scores)


def test_bad_input():
    with pytest.raises(MetricInputError, match="at least one image"):
        CiderCorpus([])
    with pytest.raises(MetricInputError, match="non-empty list of reference captions"):
        CiderCorpus([[]])
    with pytest.raises(MetricInputError, match="same length"):
        cider_scores(["a"], [["a"], ["b"]])
