"""The visual-head rule of docs/method.md §4 on hand-built attention patterns: token matching
(substring and char_box), argmax and top-k selection, 1/|R| per hit, at most one increment per
(token, head), mean over samples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils import head_scoring_rule as rule
from sparsemm_utils.head_scoring_rule import GeneratedTokens, TokenMatch

# ---------------------------------------------------------------------------- fixtures

#: image_token_start 10; chunk regions in relative positions (absolute = + 10).
RECORD = {
    "doc_id": 7,
    "model_type": "qwen2_vl",
    "image_token_start": 10,
    "num_image_tokens": 20,
    "chunks": [
        {"chunk": "AB", "positions": [0, 1]},  # absolute {10, 11}
        {"chunk": "CD E", "positions": [2, 3, 4]},  # absolute {12, 13, 14}
        {"chunk": "F", "positions": []},  # box step 02 could not map
        {"chunk": "BX", "positions": [5]},  # absolute {15}
    ],
    "chars": [],
}


def rows_with_argmax(targets: np.ndarray, n_keys: int, peak: float = 0.5) -> np.ndarray:
    """(L, H, n_keys) rows whose maximum is at targets[l, h]; the rest spread evenly."""
    layers, heads = targets.shape
    rows = np.full((layers, heads, n_keys), (1 - peak) / (n_keys - 1))
    for l in range(layers):
        for h in range(heads):
            rows[l, h, targets[l, h]] = peak
    return rows


# -------------------------------------------------------------------------- matching


def test_substring_match_by_hand():
    tokens = GeneratedTokens.from_texts(["A", "B", "D", " ", "Z", "F", "</s>"], stop=[0, 0, 0, 0, 0, 0, 1])
    matches = rule.SubstringMatch().match(tokens, RECORD)
    # "A": only in "AB" -> chunk 0, absolute {10, 11}
    # "B": in "AB" and "BX" -> ambiguous; "D": only "CD E" -> {12, 13, 14}
    # " ": only "CD E" has a space -> matched to chunk 1 (the original's literal substring test)
    # "Z": nowhere; "F": chunk 2 whose region is empty; "</s>": stop token, never scored
    assert [m.reason for m in matches] == [
        rule.MATCHED, rule.AMBIGUOUS, rule.MATCHED, rule.MATCHED, rule.NO_MATCH, rule.EMPTY_REGION, rule.END_OF_SEQUENCE,
    ]
    assert matches[0].region.tolist() == [10, 11] and matches[0].source == (0,)
    assert matches[1].source == (0, 3)
    assert matches[2].region.tolist() == [12, 13, 14]
    assert matches[3].source == (1,)


def test_substring_word_boundary_marker_is_kept():
    # LLaVA's convert_ids_to_tokens keeps "▁": "▁CD" is not a substring of "CD E" (the original's quirk)
    tokens = GeneratedTokens.from_texts(["\u2581CD", "CD"])
    assert [m.reason for m in rule.SubstringMatch().match(tokens, RECORD)] == [rule.NO_MATCH, rule.MATCHED]


CHAR_RECORD = {
    "doc_id": 3,
    "image_token_start": 5,
    "chunks": [{"chunk": "AB", "positions": [0, 1]}, {"chunk": "CA", "positions": [2, 3, 4]}],
    "chars": [
        {"char": "A", "chunk_index": 0, "positions": [0]},  # absolute {5}
        {"char": "B", "chunk_index": 0, "positions": [1]},  # {6}
        {"char": "C", "chunk_index": 1, "positions": [2]},  # {7}
        {"char": "A", "chunk_index": 1, "positions": [3, 4]},  # {8, 9}
    ],
}


def test_char_box_alignment_by_hand():
    # generated "AB XCA": aligned to the document's "ABCA" as AB|AB, X unaligned, CA|CA
    tokens = GeneratedTokens.from_texts(["A", "B", " ", "X", "C", "A", "</s>"], stop=[0, 0, 0, 0, 0, 0, 1])
    matches = rule.CharBoxMatch().match(tokens, CHAR_RECORD)
    assert [m.reason for m in matches] == [
        rule.MATCHED, rule.MATCHED, rule.WHITESPACE, rule.UNALIGNED, rule.MATCHED, rule.MATCHED, rule.END_OF_SEQUENCE,
    ]
    assert [m.region.tolist() for m in matches if m.matched] == [[5], [6], [7], [8, 9]]
    # the second "A" goes to the second box: the substring rule calls it ambiguous
    assert matches[5].source == (3,)
    assert rule.SubstringMatch().match(GeneratedTokens.from_texts(["A"]), CHAR_RECORD)[0].reason == rule.AMBIGUOUS


def test_char_box_multi_character_tokens_take_the_union():
    tokens = GeneratedTokens.from_texts(["AB", " CA"])
    matches = rule.CharBoxMatch().match(tokens, CHAR_RECORD)
    assert matches[0].region.tolist() == [5, 6] and matches[0].source == (0, 1)
    assert matches[1].region.tolist() == [7, 8, 9] and matches[1].source == (2, 3)


def test_char_box_without_character_boxes_is_reported():
    tokens = GeneratedTokens.from_texts(["A", " "])
    matches = rule.CharBoxMatch().match(tokens, RECORD)  # RECORD has chars == []
    assert [m.reason for m in matches] == [rule.NO_CHAR_BOXES, rule.WHITESPACE]


def test_make_matcher_rejects_unknown_names():
    assert isinstance(rule.make_matcher("char_box"), rule.CharBoxMatch)
    with pytest.raises(rule.HeadScoringConfigError, match="substring"):
        rule.make_matcher("fuzzy")


# ----------------------------------------------------------------------------- scoring


def test_argmax_scores_by_hand():
    tokens = GeneratedTokens.from_texts(["A", "B", "D", "Z", "F", "</s>"], stop=[0, 0, 0, 0, 0, 1])
    matches = rule.SubstringMatch().match(tokens, RECORD)
    # argmax key of (layer, head) per token; keys 0..29 (prompt 30 tokens, growing)
    targets = [
        [[10, 3], [11, 12]],  # "A", R = {10, 11}: L0H0 hit, L0H1 text key, L1H0 hit, L1H1 other chunk
        [[10, 10], [10, 10]],  # "B": ambiguous, not scored however good the heads look
        [[14, 12], [0, 13]],  # "D", R = {12, 13, 14}: L0H0 hit, L0H1 hit, L1H0 miss, L1H1 hit
        [[12, 12], [12, 12]],  # "Z": no match
        [[12, 12], [12, 12]],  # "F": empty region
        [[12, 12], [12, 12]],  # end of sequence
    ]
    rows = [rows_with_argmax(np.array(t), 30 + i) for i, t in enumerate(targets)]
    scores = rule.score_attention_rows(rows, matches, "argmax")
    # L0H0: 1/2 + 1/3 = 5/6; L0H1: 1/3; L1H0: 1/2; L1H1: 1/3
    np.testing.assert_allclose(scores, [[5 / 6, 1 / 3], [1 / 2, 1 / 3]])


def test_topk_counts_one_hit_per_token_and_head():
    matches = [TokenMatch(rule.MATCHED, np.array([10, 11]))]
    # L0H0: top-3 = 10, 11, 3 -> two keys in R but ONE increment of 1/2
    # L0H1: top-3 = 3, 4, 11 -> the third key hits: 1/2 with k = 3, 0 with k = 2 and with argmax
    row = np.zeros((1, 2, 20))
    row[0, 0, [10, 11, 3]] = [0.5, 0.3, 0.1]
    row[0, 1, [3, 4, 11]] = [0.5, 0.3, 0.1]
    np.testing.assert_allclose(rule.score_attention_rows([row], matches, "topk", 3), [[0.5, 0.5]])
    np.testing.assert_allclose(rule.score_attention_rows([row], matches, "topk", 2), [[0.5, 0.0]])
    np.testing.assert_allclose(rule.score_attention_rows([row], matches, "argmax"), [[0.5, 0.0]])


def test_argmax_takes_the_first_maximum_and_topk_breaks_ties_by_position():
    row = np.zeros((1, 1, 6))
    row[0, 0, [4, 2]] = 0.5  # tie between keys 2 and 4
    assert rule.select_positions([row], "argmax").ravel().tolist() == [2]
    assert rule.select_positions([row], "topk", 3).ravel().tolist() == [2, 4, 0]


def test_topk_rows_shorter_than_k_are_padded():
    row = np.array([[[0.7, 0.3]]])
    assert rule.select_positions([row], "topk", 4).ravel().tolist() == [0, 1, -1, -1]


def test_gqa_scores_are_per_query_head():
    # Qwen-style GQA: 4 query heads on 2 KV heads (heads 0, 1 share KV head 0). Shared keys do not
    # mean shared scores: each query head has its own row and its own argmax.
    matches = [TokenMatch(rule.MATCHED, np.array([2, 3]))]
    targets = np.array([[2, 4, 5, 3]])  # heads 0 and 1 (same KV head) land at 2 (in R) and 4 (not)
    scores = rule.score_attention_rows([rows_with_argmax(targets, 8)], matches)
    np.testing.assert_allclose(scores, [[0.5, 0.0, 0.0, 0.5]])


def test_mean_over_samples_by_hand():
    s = np.array([[[1.0, 0.0]], [[0.0, 0.5]], [[0.5, 0.5]]])  # 3 samples, 1 layer, 2 heads
    np.testing.assert_allclose(rule.mean_over_samples(s), [[0.5, 1 / 3]])
    with pytest.raises(rule.NoSamplesError):
        rule.mean_over_samples(np.zeros((0, 1, 2)))


def test_score_sample_checks_lengths():
    with pytest.raises(ValueError, match="2 token matches"):
        rule.score_sample([TokenMatch(rule.NO_MATCH)] * 2, np.zeros((3, 1, 1, 1), dtype=int))


# ------------------------------------------------------------------------- invariants


@st.composite
def scored_samples(draw):
    layers, heads = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    steps = draw(st.integers(1, 6))
    n_keys = 12
    rows, matches = [], []
    for _ in range(steps):
        values = draw(st.permutations(list(range(n_keys))))  # distinct weights: no ties
        base = np.array(values, dtype=float)
        shifts = draw(st.lists(st.integers(0, n_keys - 1), min_size=layers * heads, max_size=layers * heads))
        row = np.stack([np.roll(base, s) for s in shifts]).reshape(layers, heads, n_keys)
        rows.append(row / row.sum(-1, keepdims=True))
        if draw(st.booleans()):
            region = draw(st.sets(st.integers(0, n_keys - 1), min_size=1, max_size=5))
            matches.append(TokenMatch(rule.MATCHED, np.array(sorted(region))))
        else:
            matches.append(TokenMatch(rule.NO_MATCH))
    return rows, matches


@settings(max_examples=100, deadline=None)
@given(scored_samples(), st.integers(1, 4))
def test_scores_bounded_and_topk_dominates_argmax(sample, k):
    rows, matches = sample
    argmax = rule.score_attention_rows(rows, matches, "argmax")
    topk = rule.score_attention_rows(rows, matches, "topk", k)
    ceiling = sum(1 / m.region.size for m in matches if m.matched)
    assert (argmax >= 0).all() and (argmax <= ceiling + 1e-12).all()
    assert (topk >= argmax - 1e-12).all() and (topk <= ceiling + 1e-12).all()
    if k == 1:  # without ties, top-1 is the argmax
        np.testing.assert_allclose(topk, argmax)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="abc ", min_size=0, max_size=5), min_size=1, max_size=5),
       st.lists(st.text(alphabet="abc ", min_size=0, max_size=2), min_size=1, max_size=8))
def test_substring_matches_exactly_the_unique_chunk(chunk_texts, token_texts):
    record = {"image_token_start": 0, "chunks": [{"chunk": c, "positions": [i]} for i, c in enumerate(chunk_texts)]}
    for tau, m in zip(token_texts, rule.SubstringMatch().match(GeneratedTokens.from_texts(token_texts), record)):
        containing = [i for i, c in enumerate(chunk_texts) if tau in c]
        assert m.matched == (len(containing) == 1)
        if m.matched:
            assert m.region.tolist() == containing


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ABC", min_size=1, max_size=12), st.text(alphabet="ABCX ", min_size=0, max_size=12))
def test_char_box_regions_point_at_equal_characters(truth, generated):
    record = {
        "image_token_start": 100,
        "chunks": [{"chunk": truth, "positions": []}],
        "chars": [{"char": c, "chunk_index": 0, "positions": [i]} for i, c in enumerate(truth)],
    }
    tokens = GeneratedTokens.from_texts(list(generated))
    used = []
    for tau, m in zip(generated, rule.CharBoxMatch().match(tokens, record)):
        if m.matched:
            (index,) = m.source
            assert truth[index] == tau and m.region.tolist() == [100 + index]
            used.append(index)
    assert used == sorted(set(used))  # alignment is monotone and one-to-one
