"""Uncertainty of accuracies measured on a finite set of questions: percentile bootstrap intervals.

An accuracy cell (method, budget) is the mean of per-question scores; its 95% interval comes from
resampling the questions with replacement (:func:`bootstrap_interval`). Two methods answered the
SAME questions, so their difference is judged by resampling the questions once for both (paired
bootstrap, :func:`paired_bootstrap_interval`): the question-to-question spread that both share
cancels, which is what makes a difference of a few points detectable on a few hundred questions.
Resampling is seeded, so a rerun gives the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["StatisticsError", "bootstrap_interval", "paired_bootstrap_interval", "N_RESAMPLES", "LEVEL"]

#: Bootstrap resamples and interval level used throughout the project.
N_RESAMPLES = 2000
LEVEL = 0.95


class StatisticsError(ValueError):
    """The values cannot be bootstrapped (empty, unequal lengths, not finite)."""


def _array(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise StatisticsError(f"{what} must be a non-empty 1-D sequence of numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise StatisticsError(f"{what} holds NaN or infinite values")
    return array


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _indices(n: int, seed: int, n_resamples: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, *, seed: int = 0, n_resamples: int = N_RESAMPLES, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one score per question)."""
    array = _array(values, "values")
    if not 0 < level < 1:
        raise StatisticsError(f"level must lie in (0, 1), got {level!r}")
    return _percentiles(array[_indices(array.size, seed, n_resamples)].mean(axis=1), level)


def paired_bootstrap_interval(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)``, where ``a[i]`` and ``b[i]`` are two
    methods' scores on the same question ``i`` (both resampled with the same indices)."""
    first, second = _array(a, "a"), _array(b, "b")
    if first.size != second.size:
        raise StatisticsError(f"a paired interval needs scores on the same questions: {first.size} vs {second.size} values")
    return bootstrap_interval(first - second, seed=seed, n_resamples=n_resamples, level=level)
