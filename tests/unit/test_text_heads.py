"""The text-copy rule (sparsemm_utils.text_heads, docs/method.md §4 "Text-copy heads") on hand-built
ids, offsets and attention tensors: alignment, skips, the query row, the hit, the result's counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemm_utils import text_heads as th
from sparsemm_utils.head_scoring_rule import NoSamplesError
from sparsemm_utils.prompts import QWEN_SYSTEM_PROMPT

# ------------------------------------------------------------------------------ alignment


def test_align_answer_by_hand():
    # position:  0  1  2  3  4  5 | 6  7  8  9
    ids = [9, 5, 6, 5, 7, 8, 5, 6, 7, 3]
    targets, reasons = th.align_answer(ids, source_positions=[1, 2, 3, 4], answer_positions=[6, 7, 8, 9])
    # id 5 sits twice in the source (positions 1 and 3): skipped; 6 and 7 once; 3 never (8 is outside the source)
    assert targets.tolist() == [-1, 2, 4, -1]
    assert reasons == (th.DUPLICATE, th.SCORED, th.SCORED, th.NOT_IN_SOURCE)


def test_align_answer_scores_a_repeated_answer_token_against_its_one_source():
    targets, reasons = th.align_answer([4, 2, 1, 4, 4], source_positions=[0, 1], answer_positions=[3, 4])
    assert targets.tolist() == [0, 0] and reasons == (th.SCORED, th.SCORED)


def test_align_answer_rejects_an_answer_before_its_source():
    with pytest.raises(th.TextHeadsError, match="must come after the source"):
        th.align_answer([1, 2, 3, 4], source_positions=[2, 3], answer_positions=[1])
    with pytest.raises(th.TextHeadsError, match="positions in 0..3"):
        th.align_answer([1, 2, 3, 4], source_positions=[0], answer_positions=[4])


def test_overlapping_tokens_by_hand():
    # tokens of "AB CDE": a zero-width <s>, "AB" [0, 2), " C" [2, 4), "D" [4, 5), "E" [5, 6)
    offsets = [(0, 0), (0, 2), (2, 4), (4, 5), (5, 6)]
    assert th.overlapping_tokens(offsets, (1, 5)).tolist() == [1, 2, 3]  # overlap, not containment
    assert th.overlapping_tokens(offsets, (0, 6), skip=[4]).tolist() == [1, 2, 3]  # zero-width and special left out
    assert th.overlapping_tokens(offsets, (6, 9)).tolist() == []


def test_copy_messages_put_the_text_twice_and_no_image():
    messages = th.copy_messages("AB\nC", "qwen2_vl", QWEN_SYSTEM_PROMPT)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == [{"type": "text", "text": "AB\nC\n\nCopy the text above exactly."}]
    assert messages[2]["content"] == [{"type": "text", "text": "AB\nC"}]
    assert [m["role"] for m in th.copy_messages("x", "llava_next", None)] == ["user", "assistant"]


def test_page_text_joins_lines_in_reading_order():
    document = {
        "doc_id": 3,
        "2_coord": [
            {"chunk": "AB", "coord": [[0, 0], [20, 10]]},
            {"chunk": "CD", "coord": [[30, 0], [50, 10]]},  # same line: joined by a space
            {"chunk": "EF", "coord": [[0, 20], [20, 30]]},  # below: a new line
        ],
    }
    assert th.page_text(document) == "AB CD\nEF"
    assert th.page_text({"doc_id": 4, "2_coord": []}) == ""
    with pytest.raises(th.TextHeadsError, match="step-01 documents"):
        th.page_text({"doc_id": 5, "text": "AB"})


# --------------------------------------------------------------------------- rows and hits


def _attention(n: int, peaks: dict[tuple[int, int, int], int], layers: int = 2, heads: int = 2) -> list[torch.Tensor]:
    """Causal attention (1, H, N, N) per layer, uniform over the allowed keys except where
    ``peaks[(layer, head, query)] = key`` puts most of the row's weight."""
    out = []
    for layer in range(layers):
        a = torch.zeros(1, heads, n, n)
        for q in range(n):
            a[0, :, q, : q + 1] = 1.0 / (q + 1)
        for (l, h, q), key in peaks.items():
            if l == layer:
                a[0, h, q, : q + 1] = 0.1 / (q + 1)
                a[0, h, q, key] += 0.9
        out.append(a)
    return out


def _chat(ids, source, answer) -> th.CopyChat:
    targets, reasons = th.align_answer(ids, source, answer)
    return th.CopyChat(0, "text", np.asarray(ids), np.asarray(source), np.asarray(answer), targets, reasons)


def test_the_hit_reads_the_row_before_the_answer_token():
    """Chat of 8 tokens: source at 1-3 (ids 5, 6, 5), answer at 5-7 (ids 5, 6, 9).

    Answer token 6 (position 6) is produced by query row 5; its source is position 2. Head (0, 1)
    looks there from row 5: a hit. Head (1, 0) looks at position 2 from row 6 (the token's OWN row,
    not the producing one): no hit. Token 5 at position 5 (its id is twice in the source) and token
    9 (not in the source) are skipped, whatever the heads do.
    """
    ids = [1, 5, 6, 5, 2, 5, 6, 9]
    chat = _chat(ids, [1, 2, 3], [5, 6, 7])
    assert chat.query_positions.tolist() == [4, 5, 6]
    attention = _attention(8, {(0, 1, 5): 2, (1, 0, 6): 2, (0, 0, 4): 1, (1, 1, 6): 6})
    argmax = th.rows_argmax(attention, chat.query_positions, heads=2)
    assert argmax.shape == (3, 2, 2)
    assert argmax[1, 0, 1] == 2 and argmax[0, 0, 0] == 1
    sample = th.score_copy_sample(chat, argmax)
    assert chat.reasons == (th.DUPLICATE, th.SCORED, th.NOT_IN_SOURCE)
    np.testing.assert_array_equal(sample.scores, [[0.0, 1.0], [0.0, 0.0]])
    assert sample.hits.sum() == 1 and sample.hits[1, 0, 1] and sample.tokens_scored == 1


def test_rows_argmax_over_all_keys_takes_the_first_maximum():
    # uniform rows: every allowed key ties, the first (position 0) wins, as np.argmax / torch.argmax
    argmax = th.rows_argmax(_attention(5, {}), [0, 4])
    assert argmax.tolist() == [[[0, 0], [0, 0]], [[0, 0], [0, 0]]]


def test_rows_argmax_checks_shapes():
    with pytest.raises(th.TextHeadsError, match="expected \\(1, 3, N, N\\)"):
        th.rows_argmax(_attention(4, {}), [1], heads=3)
    with pytest.raises(th.TextHeadsError, match="rows in 0..3"):
        th.rows_argmax(_attention(4, {}), [4])
    with pytest.raises(th.TextHeadsError, match="output_attentions"):
        th.rows_argmax([], [0])


def test_score_copy_sample_checks_the_token_count():
    chat = _chat([1, 5, 6, 5, 6], [1, 2], [3, 4])
    with pytest.raises(th.TextHeadsError, match="2 tokens"):
        th.score_copy_sample(chat, np.zeros((3, 1, 1), dtype=np.int64))


# -------------------------------------------------------------------------------- result


def _sample(ids, source, answer, argmax) -> th.CopySample:
    return th.score_copy_sample(_chat(ids, source, answer), np.asarray(argmax))


def _result() -> th.TextHeadResult:
    """Two samples of a 1 x 2 model. Sample 1 scores 2 tokens (sources 1, 2), head 0 hits both,
    head 1 one; sample 2 scores 1 token of 2 (source 1) and head 1 hits it."""
    one = _sample([0, 7, 8, 0, 7, 8], [1, 2], [4, 5], [[[1, 1]], [[2, 0]]])
    two = _sample([0, 7, 7, 9, 0, 7, 9], [1, 2, 3], [5, 6], [[[0, 3]], [[0, 3]]])
    return th.TextHeadResult([one, two], doc_ids_without_text=[12])


def test_result_scores_counts_and_hit_rate_by_hand():
    result = _result()
    np.testing.assert_array_equal(result.sample_scores, [[[2.0, 1.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(result.scores, [[1.0, 1.0]])  # mean over the two samples
    assert result.tokens_scored == 3
    np.testing.assert_allclose(result.hit_rate(), [[2 / 3, 2 / 3]])
    assert result.reason_counts() == {th.SCORED: 3, th.DUPLICATE: 1, th.NOT_IN_SOURCE: 0}
    summary = result.summary()
    assert (summary["samples"], summary["answer_tokens"], summary["tokens_scored"]) == (2, 4, 3)
    assert summary["tokens_skipped"] == {th.DUPLICATE: 1, th.NOT_IN_SOURCE: 0}
    assert summary["doc_ids_without_text"] == [12] and summary["samples_with_no_scored_token"] == 0
    assert summary["top_heads"][0] == {"layer": 0, "head": 0, "score": 1.0, "hit_rate": 2 / 3}
    assert summary["top_10pct_share"] == pytest.approx(0.1)  # two equal heads: 10% of them hold 10%


def test_an_empty_result_has_no_scores():
    with pytest.raises(NoSamplesError):
        th.TextHeadResult([], []).sample_scores


def test_the_reference_is_labelled_as_issue_20s_measurement():
    ref = th.SMOLLM2_COPY_HEADS
    assert ref.label == "measured on SmolLM2-135M's own copy heads (issue 20)"
    assert "paper" not in ref.label
    assert ref.layers * ref.heads == 270 and ref.top_share == {0.05: 0.67, 0.10: 0.83}
    assert ref.heads_text() == "L18H6 (0.75), L17H4 (0.70), L23H2 (0.56), L17H5, L17H3, L18H7"
