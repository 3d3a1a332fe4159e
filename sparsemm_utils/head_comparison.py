"""Comparing two head-score matrices: do the same heads come out on top?

Two (L, H) score matrices of one model (e.g. step 03's visual scores S, docs/method.md §4, and
the text-copy scores of :mod:`sparsemm_utils.text_heads`) are compared three ways:

- :func:`top_overlap`: the share of the top ``fraction`` of heads the two have in common,
  ``|top(A) ∩ top(B)| / k`` with ``k`` = :func:`top_count` heads, beside what chance gives (two
  random sets of k heads out of n share k / n of their heads on average) and the one-sided
  hypergeometric probability of an overlap at least this large by chance. The top k of each
  matrix are its k highest heads, ties broken in layer-major order (as
  :func:`~sparsemm_utils.head_scoring_rule.top_heads` orders them); :attr:`TopOverlap.ties_at_cut`
  says when that order decided who is in.
- :func:`rank_correlation`: Spearman's rho over all heads (average ranks for ties; Pearson's
  correlation of the ranks), with a permutation p-value (the ranks of one matrix shuffled,
  ``permutations`` times, from a fixed seed).
- :func:`concentration`: the share of a matrix's score mass held by its top 5% and 10% of heads
  (:func:`~sparsemm_utils.head_scoring_rule.top_share`, read off the cumulative curve).

Everything here is pure numpy on arrays; nothing depends on how the scores were made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .head_scoring_rule import HeadScoreShapeError, top_heads, top_share, validate_head_scores
from .validate import check_fraction, check_int

__all__ = [
    "CONCENTRATION_FRACTIONS",
    "top_count",
    "TopOverlap",
    "top_overlap",
    "hypergeometric_tail",
    "spearman",
    "RankCorrelation",
    "rank_correlation",
    "concentration",
    "compare_head_scores",
]

#: The fractions of heads whose share of the score the paper reports (docs/method.md §4).
CONCENTRATION_FRACTIONS: tuple[float, ...] = (0.05, 0.10)


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a = validate_head_scores(a, source="the first head scores")
    b = validate_head_scores(b, source="the second head scores")
    if a.shape != b.shape:
        raise HeadScoreShapeError(
            f"the two head-score matrices have shapes {a.shape} and {b.shape}: compare scores of one model "
            "(same layers x query heads)"
        )
    return a, b


def top_count(n_heads: int, fraction: float) -> int:
    """k, the number of heads in the top ``fraction`` of ``n_heads``: ``fraction * n_heads``
    rounded half up, at least 1 (10% of 270 heads: 27; 10% of 32 heads: 3; 5% of 30: 2)."""
    n_heads = check_int("n_heads", n_heads, 1)
    fraction = check_fraction("fraction", fraction)
    return max(1, min(n_heads, math.floor(fraction * n_heads + 0.5)))


def _ties_at_cut(scores: np.ndarray, k: int) -> bool:
    """Whether the k-th and (k+1)-th highest scores are equal (the layer-major order picked)."""
    flat = np.sort(scores.ravel())[::-1]
    return bool(k < flat.size and flat[k - 1] == flat[k])


def hypergeometric_tail(shared: int, k: int, n: int) -> float:
    """P(X >= shared) for X, the overlap of two sets of ``k`` items drawn at random out of ``n``
    (hypergeometric: C(k, i) C(n - k, k - i) / C(n, k), summed over i >= shared)."""
    n = check_int("n", n, 1)
    k = check_int("k", k, 1, n)
    shared = check_int("shared", shared, 0, k)
    total = math.comb(n, k)
    return float(sum(math.comb(k, i) * math.comb(n - k, k - i) for i in range(shared, k + 1)) / total)


@dataclass(frozen=True)
class TopOverlap:
    """The top ``k`` heads (top ``fraction`` of ``n_heads``) of two score matrices and the heads
    they share, as (layer, head) pairs, each list in descending order of its own matrix."""

    fraction: float
    k: int
    n_heads: int
    top_a: tuple[tuple[int, int], ...]
    top_b: tuple[tuple[int, int], ...]
    ties_at_cut: bool

    @property
    def shared(self) -> tuple[tuple[int, int], ...]:
        """The heads in both top sets, in the order of ``top_a``."""
        in_b = set(self.top_b)
        return tuple(head for head in self.top_a if head in in_b)

    @property
    def overlap(self) -> float:
        """|top(A) ∩ top(B)| / k."""
        return len(self.shared) / self.k

    @property
    def chance(self) -> float:
        """The overlap two random sets of k heads have on average: k / n."""
        return self.k / self.n_heads

    @property
    def p_value(self) -> float:
        """One-sided: the probability that two random sets of k heads share at least as many."""
        return hypergeometric_tail(len(self.shared), self.k, self.n_heads)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "k": self.k,
            "n_heads": self.n_heads,
            "shared": [f"L{l}H{h}" for l, h in self.shared],
            "overlap": self.overlap,
            "chance": self.chance,
            "p_value": self.p_value,
            "ties_at_cut": self.ties_at_cut,
        }


def top_overlap(a: Any, b: Any, fraction: float = 0.10) -> TopOverlap:
    """The top-``fraction`` overlap of two (L, H) score matrices (see the module docstring)."""
    a, b = _pair(a, b)
    k = top_count(a.size, fraction)
    return TopOverlap(
        fraction=float(fraction),
        k=k,
        n_heads=int(a.size),
        top_a=tuple((l, h) for l, h, _ in top_heads(a, k)),
        top_b=tuple((l, h) for l, h, _ in top_heads(b, k)),
        ties_at_cut=_ties_at_cut(a, k) or _ties_at_cut(b, k),
    )


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1 = lowest; tied values share the mean of their ranks)."""
    return pd.Series(values.ravel()).rank(method="average").to_numpy(dtype=np.float64)


def _pearson_rows(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson's r of ``x`` (n,) with each row of ``ys`` (m, n)."""
    xc = x - x.mean()
    yc = ys - ys.mean(axis=-1, keepdims=True)
    return (yc @ xc) / (np.sqrt((yc**2).sum(axis=-1)) * np.sqrt((xc**2).sum()))


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation of two (L, H) score matrices over their heads (average ranks
    for ties). NaN when either matrix is constant (its ranks carry no order)."""
    a, b = _pair(a, b)
    ra, rb = _ranks(a), _ranks(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(_pearson_rows(ra, rb[None])[0])


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's ``rho`` over ``n`` heads and its two-sided permutation ``p_value``
    ((1 + #{|rho_perm| >= |rho|}) / (1 + permutations)); both NaN when a matrix is constant."""

    rho: float
    n: int
    p_value: float
    permutations: int

    def to_dict(self) -> dict[str, Any]:
        nan = math.isnan(self.rho)
        return {
            "rho": None if nan else self.rho,
            "n": self.n,
            "p_value": None if nan else self.p_value,
            "permutations": self.permutations,
        }


def rank_correlation(a: Any, b: Any, *, permutations: int = 10_000, seed: int = 0) -> RankCorrelation:
    """Spearman's rho of two (L, H) score matrices with a permutation test (see the module
    docstring): ``permutations`` shuffles of the second matrix's ranks from ``seed``."""
    permutations = check_int("permutations", permutations, 1)
    seed = check_int("seed", seed, 0)
    rho = spearman(a, b)
    a, b = _pair(a, b)
    if math.isnan(rho):
        return RankCorrelation(rho, int(a.size), float("nan"), permutations)
    ra, rb = _ranks(a), _ranks(b)
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.broadcast_to(rb, (permutations, rb.size)), axis=1)
    null = _pearson_rows(ra, shuffled)
    extreme = int(np.count_nonzero(np.abs(null) >= abs(rho) - 1e-12))
    return RankCorrelation(rho, int(a.size), (1 + extreme) / (1 + permutations), permutations)


def concentration(scores: Any, fractions: Sequence[float] = CONCENTRATION_FRACTIONS) -> dict[float, float] | None:
    """fraction -> share of the score mass held by the top ``fraction`` of heads; None when all
    scores are zero (there is no mass to share)."""
    scores = validate_head_scores(scores)
    if not scores.sum() > 0:
        return None
    return {float(f): top_share(scores, f) for f in fractions}


def compare_head_scores(a: Any, b: Any, fraction: float = 0.10, *, permutations: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Both comparisons of ``a`` with ``b`` as JSON-ready values: ``top_overlap``
    (:meth:`TopOverlap.to_dict`) and ``rank_correlation`` (:meth:`RankCorrelation.to_dict`)."""
    return {
        "top_overlap": top_overlap(a, b, fraction).to_dict(),
        "rank_correlation": rank_correlation(a, b, permutations=permutations, seed=seed).to_dict(),
    }
