"""Comparing two head-score matrices (sparsemm_utils.head_comparison): top-fraction overlap with its
chance level, Spearman's rho with a permutation test, concentration; hand-worked and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsemm_utils import head_comparison as hc
from sparsemm_utils.head_scoring_rule import HeadScoreShapeError, InvalidHeadScoresError, top_share


@pytest.mark.parametrize(
    ("n", "fraction", "k"),
    [(270, 0.10, 27), (270, 0.05, 14), (32, 0.10, 3), (32, 0.05, 2), (30, 0.05, 2), (20, 0.05, 1), (5, 0.0, 1), (4, 1.0, 4)],
)
def test_top_count_rounds_half_up_and_keeps_one(n, fraction, k):
    assert hc.top_count(n, fraction) == k


def test_top_overlap_by_hand():
    a = np.array([[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]])
    b = np.array([[0.0, 4.0, 3.0], [2.0, 1.0, 5.0]])
    overlap = hc.top_overlap(a, b, fraction=0.5)  # k = 3 of 6 heads
    assert overlap.top_a == ((0, 0), (0, 1), (0, 2))
    assert overlap.top_b == ((1, 2), (0, 1), (0, 2))
    assert overlap.shared == ((0, 1), (0, 2)) and overlap.overlap == pytest.approx(2 / 3)
    assert overlap.chance == 0.5 and not overlap.ties_at_cut
    # P(X >= 2), X the overlap of two random 3-sets of 6: (C(3,2) C(3,1) + C(3,3) C(3,0)) / C(6,3) = 10 / 20
    assert overlap.p_value == pytest.approx(0.5)
    assert overlap.to_dict()["shared"] == ["L0H1", "L0H2"]


def test_top_overlap_ties_are_broken_layer_major_and_reported():
    a = np.array([[1.0, 2.0], [2.0, 2.0]])  # three heads tie for the top two places
    b = np.array([[0.0, 0.0], [0.0, 3.0]])
    overlap = hc.top_overlap(a, b, fraction=0.5)
    assert overlap.top_a == ((0, 1), (1, 0)) and overlap.ties_at_cut
    assert overlap.top_b == ((1, 1), (0, 0))  # the zeros tie too: layer-major order picks L0H0
    assert overlap.shared == ()


def test_hypergeometric_tail_by_hand():
    assert hc.hypergeometric_tail(0, 3, 6) == 1.0
    assert hc.hypergeometric_tail(3, 3, 6) == pytest.approx(1 / 20)
    assert hc.hypergeometric_tail(2, 2, 20) == pytest.approx(1 / 190)
    with pytest.raises(ValueError, match="shared"):
        hc.hypergeometric_tail(4, 3, 6)


def test_spearman_by_hand():
    assert hc.spearman([[1, 2], [3, 4]], [[10, 20], [30, 40]]) == pytest.approx(1.0)
    assert hc.spearman([[1, 2], [3, 4]], [[4, 3], [2, 1]]) == pytest.approx(-1.0)
    # ties get the mean rank: a -> 1, 2.5, 2.5, 4; b -> 1, 3, 2, 4; rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert hc.spearman([[1, 2], [2, 3]], [[1, 3], [2, 4]]) == pytest.approx(3 / math.sqrt(10))
    assert math.isnan(hc.spearman(np.zeros((2, 2)), [[1, 2], [3, 4]]))


def test_rank_correlation_permutation_test():
    a = np.arange(12.0).reshape(3, 4)
    strong = hc.rank_correlation(a, a**2, permutations=2000, seed=1)
    assert strong.rho == pytest.approx(1.0) and strong.n == 12
    # a perfect order out of 12! is never matched by 2000 shuffles: p = 1 / 2001
    assert strong.p_value == pytest.approx(1 / 2001)
    assert hc.rank_correlation(a, a**2, permutations=2000, seed=1) == strong  # seeded: reproducible
    rng = np.random.default_rng(0)
    noise = hc.rank_correlation(rng.random((6, 5)), rng.random((6, 5)), permutations=2000)
    assert 0.05 < noise.p_value <= 1.0
    constant = hc.rank_correlation(np.ones((2, 2)), a[:2, :2])
    assert math.isnan(constant.rho) and constant.to_dict()["rho"] is None and constant.to_dict()["p_value"] is None


def test_concentration_reuses_top_share():
    scores = np.full((4, 5), 2 / 9)
    scores[1, 2], scores[2, 0] = 12.0, 4.0
    assert hc.concentration(scores) == {0.05: pytest.approx(0.6), 0.10: pytest.approx(0.8)}
    assert hc.concentration(scores, (0.25,)) == {0.25: top_share(scores, 0.25)}
    assert hc.concentration(np.zeros((2, 2))) is None


def test_compare_head_scores_is_json_ready():
    a = np.array([[3.0, 2.0], [1.0, 0.0]])
    out = hc.compare_head_scores(a, a, 0.5, permutations=100)
    assert out["top_overlap"]["overlap"] == 1.0 and out["top_overlap"]["k"] == 2
    assert out["rank_correlation"]["rho"] == pytest.approx(1.0) and out["rank_correlation"]["permutations"] == 100


def test_bad_input_is_named():
    with pytest.raises(HeadScoreShapeError, match=r"shapes \(2, 2\) and \(2, 3\)"):
        hc.top_overlap(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(InvalidHeadScoresError, match="finite and >= 0"):
        hc.spearman(np.array([[1.0, -1.0]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="fraction"):
        hc.top_overlap(np.ones((2, 2)), np.ones((2, 2)), fraction=1.5)


scores_2d = hnp.arrays(
    np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=st.floats(0, 100, allow_nan=False, width=32)
)


@settings(max_examples=60, deadline=None)
@given(scores_2d, st.floats(0.0, 1.0), st.data())
def test_overlap_properties(a, fraction, data):
    b = data.draw(hnp.arrays(np.float64, a.shape, elements=st.floats(0, 100, allow_nan=False, width=32)))
    overlap = hc.top_overlap(a, b, fraction)
    assert 1 <= overlap.k <= a.size and len(overlap.top_a) == len(overlap.top_b) == overlap.k
    assert 0.0 <= overlap.overlap <= 1.0 and 0.0 < overlap.p_value <= 1.0 + 1e-12
    assert hc.top_overlap(a, a, fraction).overlap == 1.0
    assert len(hc.top_overlap(a, b, fraction).shared) == len(hc.top_overlap(b, a, fraction).shared)


@settings(max_examples=60, deadline=None)
@given(scores_2d, st.data())
def test_spearman_properties(a, data):
    b = data.draw(hnp.arrays(np.float64, a.shape, elements=st.floats(0, 100, allow_nan=False, width=32)))
    rho = hc.spearman(a, b)
    if np.ptp(a) > 0 and np.ptp(b) > 0:
        assert -1.0 - 1e-9 <= rho <= 1.0 + 1e-9
        assert rho == pytest.approx(hc.spearman(b, a))
        assert hc.spearman(a, a) == pytest.approx(1.0)
        assert hc.spearman(a, 4 * a) == pytest.approx(1.0)  # ranks only (x 4: exact in floating point)
    else:
        assert math.isnan(rho)
