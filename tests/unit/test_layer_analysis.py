"""LLaVA-Mini's category attention (Eq. 4), entropy and the head-level join (docs/method.md §8),
on matrices worked out by hand, plus invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils import category_attention as ca
from sparsemm_utils import token_categories as tc
from sparsemm_utils.token_categories import INSTRUCTION as I
from sparsemm_utils.token_categories import RESPONSE as R
from sparsemm_utils.token_categories import VISION as V

# Five positions: system token, two vision tokens, a user token, one response token.
LABELS = np.array([I, V, V, I, R])
# A causal attention matrix (rows sum to 1, zeros above the diagonal).
A = np.array(
    [
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0],
        [0.2, 0.3, 0.5, 0.0, 0.0],
        [0.1, 0.3, 0.2, 0.4, 0.0],
        [0.1, 0.2, 0.1, 0.2, 0.4],
    ]
)


def test_category_mass_by_hand():
    # row 3: instruction keys 0 and 3 -> 0.1 + 0.4 = 0.5; vision keys 1, 2 -> 0.3 + 0.2 = 0.5; response 0
    # row 4: instruction 0.1 + 0.2 = 0.3; vision 0.2 + 0.1 = 0.3; response 0.4
    mass = ca.category_mass(A, LABELS).numpy()
    np.testing.assert_allclose(mass[3], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(mass[4], [0.3, 0.3, 0.4])
    np.testing.assert_allclose(mass.sum(axis=1), 1.0)


def test_eq4_by_hand_with_its_denominator():
    # Per-row masses (instruction, vision, response):
    #   row0 (I): 1.0, 0.0, 0.0     row1 (V): 0.5, 0.5, 0     row2 (V): 0.2, 0.8, 0
    #   row3 (I): 0.5, 0.5, 0.0     row4 (R): 0.3, 0.3, 0.4
    # I->I = (1.0 + 0.5) / 2 = 0.75
    # I->V = 0.5 / 1 = 0.5: row 0 (before the image) has zero mass on vision and is NOT counted;
    #        a plain mean over both instruction rows would give 0.25.
    # I->R: no instruction row sees the response -> undefined (NaN)
    # V->I = (0.5 + 0.2) / 2 = 0.35, V->V = (0.5 + 0.8) / 2 = 0.65, V->R = NaN
    # R->I = 0.3, R->V = 0.3, R->R = 0.4
    expected = np.array([[0.75, 0.5, np.nan], [0.35, 0.65, np.nan], [0.3, 0.3, 0.4]])
    got = ca.category_attention(A, LABELS)
    np.testing.assert_allclose(got, expected, equal_nan=True)
    attn, rows = ca.eq4_attention(ca.category_mass(A, LABELS), LABELS)
    np.testing.assert_array_equal(rows, [[2, 1, 0], [2, 2, 0], [1, 1, 1]])
    np.testing.assert_allclose(attn, expected, equal_nan=True)


def test_heads_are_averaged_before_eq4():
    # Two heads whose mean is A; Eq. 4 is taken on the mean (LLaVA-Mini: a_ij averaged over heads).
    B = np.eye(5)  # every row on itself (a valid causal attention)
    heads = np.stack([2 * A - B, B])  # mean = A; 2A - B is not a distribution, but the mean is what counts
    np.testing.assert_allclose(ca.category_attention(heads, LABELS), ca.category_attention(A, LABELS), equal_nan=True)


def test_queries_are_the_last_rows_when_the_matrix_is_not_square():
    # Only the response row (a decode step): its query is the last key position.
    got = ca.category_attention(A[4:], LABELS)
    np.testing.assert_allclose(got[R], [0.3, 0.3, 0.4])
    assert np.isnan(got[I]).all() and np.isnan(got[V]).all()


def test_entropy_by_hand():
    # row 3 over vision: weights (0.3, 0.2) -> p = (0.6, 0.4): H = -(0.6 ln 0.6 + 0.4 ln 0.4) = 0.67301
    # row 4 over vision: (0.2, 0.1) -> (2/3, 1/3): H = ln 3 - (2/3) ln 2 = 0.63651
    # row 4 over instruction: (0.1, 0.2) -> (1/3, 2/3): the same 0.63651
    # row 2 over vision: (0.3, 0.5) -> (0.375, 0.625): H = 0.66156; row 1 over vision: one key -> 0
    # row 0 over vision: no mass -> NaN
    ent = ca.category_entropy_rows(A, LABELS).numpy()
    h64 = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    h21 = math.log(3) - 2 / 3 * math.log(2)
    h35 = -(0.375 * math.log(0.375) + 0.625 * math.log(0.625))
    assert ent[3, V] == pytest.approx(h64)
    assert ent[4, V] == pytest.approx(h21)
    assert ent[4, I] == pytest.approx(h21)
    assert ent[2, V] == pytest.approx(h35)
    assert ent[1, V] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(ent[0, V])
    # Per (target, source), averaged over the rows Eq. 4 counts:
    # I->V: row 3 only (row 0 has no mass on vision) = 0.67301; V->V: (0 + 0.66156) / 2
    table = ca.category_entropy(A, LABELS)
    assert table[I, V] == pytest.approx(h64)
    assert table[V, V] == pytest.approx(h35 / 2)
    assert table[R, V] == pytest.approx(h21)
    assert np.isnan(table[I, R])


def test_visible_key_counts_by_hand():
    counts = ca.visible_key_counts(A, LABELS).numpy()
    np.testing.assert_array_equal(counts[0], [1, 0, 0])
    np.testing.assert_array_equal(counts[3], [2, 2, 0])
    np.testing.assert_array_equal(counts[4], [2, 2, 1])


def test_token_categories_by_hand():
    # ids: 7 = image token; prompt of 6 tokens, then 2 generated (one equal to the image id: still response)
    ids = [1, 2, 7, 7, 3, 4, 5, 7]
    np.testing.assert_array_equal(tc.token_categories(ids, 7, prompt_len=6), [I, I, V, V, I, I, R, R])
    # without prompt_len every position is prompt: the last 7 is an image token, 5 is instruction
    np.testing.assert_array_equal(tc.token_categories(torch.tensor([ids]), 7), [I, I, V, V, I, I, I, V])


def test_spearman_by_hand():
    # ranks equal the values; d = (0, -1, 1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert ca.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: ranks x = (1.5, 1.5, 3), y = (1, 2, 3): r = 1.5 / sqrt(1.5 * 2) = 0.8660
    assert ca.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3.0))
    assert math.isnan(ca.spearman([1, 1, 1], [1, 2, 3]))
    assert ca.spearman([1, np.nan, 3, 4], [2, 5, 3, 9]) == pytest.approx(1.0)


def _stats_from_matrix(attn_per_layer: np.ndarray, labels: np.ndarray, prompt_len: int) -> ca.LayerStats:
    """LayerStats built from explicit (L, H, N, N) attention, through the pure functions."""
    t = torch.as_tensor(attn_per_layer)
    mean = t.mean(dim=1)
    return ca.LayerStats(
        labels=labels.astype(np.int8),
        prompt_len=prompt_len,
        mass=ca.category_mass(mean, labels).numpy(),
        entropy=ca.category_entropy_rows(mean, labels).numpy(),
        visible=ca.visible_key_counts(mean, labels).numpy().astype(np.int64),
        head_mass=ca.category_mass(t, labels).numpy().astype(np.float32),
    )


def test_head_share_uses_the_generating_rows():
    # One layer, two heads; prompt = positions 0..3, response = position 4.
    # Generating rows: prompt_len - 1 = 3 and 4 - 1 = 3 .. N - 2 = 3 -> only row 3 here.
    # Head 0 = A: row 3 puts 0.5 on vision. Head 1 = identity: row 3 puts 0 on vision.
    stats = _stats_from_matrix(np.stack([A, np.eye(5)])[None], LABELS, prompt_len=4)
    np.testing.assert_allclose(stats.head_share(V, "generating"), [[0.5, 0.0]])
    # Response rows: row 4 only: head 0 -> 0.3, head 1 -> 0
    np.testing.assert_allclose(stats.head_share(V, "response"), [[0.3, 0.0]])
    table = ca.head_vision_share_table([stats], visual_scores=np.array([[2.0, 1.0]]))
    assert table[["layer", "head"]].values.tolist() == [[0, 0], [0, 1]]
    np.testing.assert_allclose(table["vision_share"], [0.5, 0.0])
    np.testing.assert_allclose(table["visual_score"], [2.0, 1.0])


def test_tables_average_over_samples_and_have_the_contract_columns():
    one = _stats_from_matrix(A[None, None], LABELS, 4)
    two = _stats_from_matrix(np.eye(5)[None, None], LABELS, 4)
    table = ca.category_attention_table([one, two])
    assert list(table.columns[:4]) == ["layer", "target", "source", "attention"]
    assert len(table) == 9
    row = table[(table.target == "instruction") & (table.source == "vision")].iloc[0]
    # sample one: 0.5 (above); sample two (identity): row 3 has no mass on vision, row 0 neither -> undefined
    assert row.attention == pytest.approx(0.5) and row.n_samples == 1
    row = table[(table.target == "response") & (table.source == "response")].iloc[0]
    assert row.attention == pytest.approx((0.4 + 1.0) / 2) and row.n_samples == 2
    ent = ca.entropy_table([one])
    assert {"entropy", "max_entropy"} <= set(ent.columns)
    # R->V: row 4 sees 2 vision keys: uniform entropy ln 2
    assert ent[(ent.target == "response") & (ent.source == "vision")].max_entropy.iloc[0] == pytest.approx(math.log(2))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(tc.CategoryLabelError, match="shape"):
        ca.category_attention(A, LABELS[:4])
    with pytest.raises(tc.CategoryLabelError, match="codes"):
        ca.category_attention(A, np.array([0, 1, 2, 3, 0]))
    with pytest.raises(tc.AttentionShapeError, match=r"\(q, k\) or \(heads, q, k\)"):
        ca.category_attention(np.zeros((1, 1, 5, 5)), LABELS)
    with pytest.raises(tc.CategoryLabelError, match="prompt_len"):
        tc.token_categories([1, 2, 3], 7, prompt_len=4)
    with pytest.raises(tc.AttentionShapeError, match="one sequence"):
        tc.token_categories(np.zeros((2, 3), dtype=int), 7)
    with pytest.raises(tc.AttentionShapeError, match="visual_scores"):
        ca.head_vision_share_table([_stats_from_matrix(A[None, None], LABELS, 4)], np.zeros((2, 2)))
    with pytest.raises(tc.LayerAnalysisError, match="no samples"):
        ca.category_attention_table([])
    with pytest.raises(tc.LayerAnalysisError, match="row selection"):
        _stats_from_matrix(A[None, None], LABELS, 4).head_share(V, "decode")


# ------------------------------------------------------------------------------------ invariants


@st.composite
def causal_attention(draw):
    n = draw(st.integers(2, 9))
    labels = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    logits = np.array(draw(st.lists(st.floats(-4, 4), min_size=n * n, max_size=n * n))).reshape(n, n)
    logits[np.triu_indices(n, 1)] = -np.inf
    attn = np.exp(logits - logits.max(axis=1, keepdims=True))
    attn /= attn.sum(axis=1, keepdims=True)
    return attn, labels


@settings(max_examples=100, deadline=None)
@given(causal_attention())
def test_eq4_numerators_add_up_to_the_rows(case):
    # sum over sources of Attn(t -> s) * rows(t, s) = sum over rows of t of their total mass = |t|
    attn, labels = case
    values, rows = ca.eq4_attention(ca.category_mass(attn, labels), labels)
    totals = np.nansum(values * rows, axis=1)
    np.testing.assert_allclose(totals, np.bincount(labels, minlength=3), atol=1e-9)
    assert np.all((values[~np.isnan(values)] >= 0) & (values[~np.isnan(values)] <= 1 + 1e-12))


@settings(max_examples=100, deadline=None)
@given(causal_attention())
def test_entropy_lies_between_zero_and_uniform(case):
    attn, labels = case
    ent = ca.category_entropy_rows(attn, labels).numpy()
    visible = ca.visible_key_counts(attn, labels).numpy()
    seen = visible > 0
    assert np.all(np.isnan(ent) == ~seen)
    assert np.all(ent[seen] >= 0)
    assert np.all(ent[seen] <= np.log(visible[seen]) + 1e-9)


@settings(max_examples=60, deadline=None)
@given(causal_attention(), st.randoms(use_true_random=False))
def test_eq4_does_not_depend_on_key_order(case, rnd):
    # Eq. 4 sums over key sets: permuting the key columns (and their labels) changes nothing.
    attn, labels = case
    perm = np.arange(labels.size)
    rnd.shuffle(perm)
    mass = ca.category_mass(attn, labels).numpy()
    mass_perm = ca.category_mass(attn[:, perm], labels[perm]).numpy()
    np.testing.assert_allclose(mass, mass_perm, atol=1e-12)
    ent = ca.category_entropy_rows(attn, labels).numpy()
    ent_perm = ca.category_entropy_rows(attn[:, perm], labels[perm]).numpy()
    np.testing.assert_allclose(ent, ent_perm, atol=1e-9, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-400, 400), min_size=3, max_size=20, unique=True))
def test_spearman_is_invariant_under_monotone_maps(xs):
    x = np.array(xs, dtype=np.float64)  # distinct integers stay distinct under exp(x / 4) and x ** 3
    y = np.sin(np.arange(x.size))
    assert ca.spearman(x, y) == pytest.approx(ca.spearman(np.exp(x / 4), y), abs=1e-12)
    assert ca.spearman(x, x**3) == pytest.approx(1.0)
