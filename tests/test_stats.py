"""Bake-off statistics against scipy.stats and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from cheaplunch.stats import BETTER, TIE, WORSE, paired_difference, t_interval, verdict


@pytest.mark.parametrize("values", [[0.21, 0.25, 0.19], [1.0, 2.0, 4.0, 8.0, 16.0], [5.0, 5.5]])
def test_t_interval_matches_scipy(values):
    got = t_interval(values)
    low, high = stats.t.interval(0.95, df=len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert got.mean == pytest.approx(np.mean(values))
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-12)
    assert got.sd == pytest.approx(np.std(values, ddof=1))


def test_t_interval_hand_case():
    # values 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302652729911275 -> half width 4.3027 / sqrt(3)
    got = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (got.low, got.high) == pytest.approx((2 - half, 2 + half), rel=1e-9)
    assert got.format(scale=10) == f"20.0 ± {half * 10:.1f}"


def test_paired_difference_is_scipy_paired_t():
    method, base = [0.30, 0.34, 0.29], [0.25, 0.27, 0.26]
    d = paired_difference(method, base)
    diffs = np.subtract(method, base)
    low, high = stats.t.interval(0.95, df=2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (d.low, d.high) == pytest.approx((low, high), rel=1e-12)
    # the interval excludes 0 exactly when the paired t-test rejects at 5%
    assert (stats.ttest_rel(method, base).pvalue < 0.05) == (d.low > 0 or d.high < 0)
    assert verdict(d) == BETTER


def test_verdicts():
    assert verdict(paired_difference([0.20, 0.22, 0.21], [0.25, 0.26, 0.27])) == WORSE
    assert verdict(paired_difference([0.20, 0.30, 0.25], [0.25, 0.26, 0.24])) == TIE
    assert verdict(paired_difference([0.9], [0.1])) == TIE  # one seed: no interval, no claim
    with pytest.raises(ValueError, match="as many seeds"):
        paired_difference([1.0, 2.0], [1.0])
