"""The paired statistics against scipy's own tests on known cases."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from cgf_bert.report.stats import equivalence, t_interval


def test_t_interval_uses_the_exact_quantile():
    xs = [0.4, -1.2, 0.9, 2.1, -0.3, 0.0, 1.7]
    lo, hi = t_interval(xs)
    ref = stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / len(xs), scale=stats.sem(xs))
    assert lo == pytest.approx(ref[0], abs=1e-12) and hi == pytest.approx(ref[1], abs=1e-12)


@pytest.mark.parametrize("diffs, margin, equivalent", [
    ([0.1, -0.2, 0.3, 0.0, -0.1, 0.2, 0.1, -0.3, 0.2, 0.0], 1.0, True),  # tight around 0: inside ±1
    ([-0.15 + d for d in (1.2, -1.5, 0.4, 2.0, -1.9)], 1.0, False),  # the five-seed CGF gap's spread: not resolved
    ([1.5, 1.8, 1.2, 1.6, 1.4], 1.0, False),  # clearly above the margin
    ([0.5, 0.7, 0.6, 0.4, 0.8, 0.5], 1.0, True),  # off 0 but inside the margin
])
def test_equivalence_is_two_one_sided_tests(diffs, margin, equivalent):
    got = equivalence(diffs, margin)
    low = stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue
    high = stats.ttest_1samp(diffs, margin, alternative="less").pvalue
    assert got["p_lower"] == pytest.approx(low, rel=1e-10) and got["p_upper"] == pytest.approx(high, rel=1e-10)
    assert got["p"] == pytest.approx(max(low, high), rel=1e-10) and got["equivalent"] is equivalent
    # the same verdict as the 90 % interval lying inside the margin
    lo, hi = t_interval(diffs, level=0.90)
    assert (-margin < lo and hi < margin) is equivalent


def test_equivalence_needs_two_values_and_a_spread():
    assert equivalence([0.3], 1.0) is None and equivalence([0.2, 0.2, 0.2], 1.0) is None
    assert math.isclose(equivalence([0.0, 1.0], 10.0)["margin"], 10.0)
