"""Bootstrap intervals (sparsemm_utils.statistics)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils.statistics import StatisticsError, bootstrap_interval, paired_bootstrap_interval


def test_a_constant_has_a_zero_width_interval():
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)


def test_the_interval_is_the_percentiles_of_resampled_means():
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    rng = np.random.default_rng(3)
    means = values[rng.integers(0, 5, size=(400, 5))].mean(axis=1)
    assert bootstrap_interval(values, seed=3, n_resamples=400) == tuple(np.percentile(means, [2.5, 97.5]))


def test_pairing_cancels_what_both_methods_share():
    rng = np.random.default_rng(0)
    hardness = rng.uniform(0, 1, 300)  # questions vary a lot; method a is 0.05 better on every one
    a, b = np.clip(hardness + 0.05, 0, 2), hardness
    low, high = paired_bootstrap_interval(a, b)
    assert low == pytest.approx(0.05) and high == pytest.approx(0.05)
    unpaired = np.subtract(bootstrap_interval(a, seed=1), bootstrap_interval(b, seed=2)[::-1])
    assert unpaired[0] < 0 < unpaired[1]  # unpaired, the same data cannot tell the methods apart


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(0, 10))
def test_the_interval_brackets_values_and_is_ordered(values, seed):
    low, high = bootstrap_interval(values, seed=seed, n_resamples=200)
    assert min(values) - 1e-12 <= low <= high <= max(values) + 1e-12


@pytest.mark.parametrize("a, b, message", [([], [], "non-empty"), ([1.0], [1.0, 2.0], "same questions"), ([np.nan], [1.0], "NaN")])
def test_bad_input_is_refused(a, b, message):
    with pytest.raises(StatisticsError, match=message):
        paired_bootstrap_interval(a, b)
