"""The statistics behind every interval and test the harness prints, against scipy on fixed numbers."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from harness.uncertainty import (
    accuracy_interval,
    distinguishable,
    interval_metrics,
    mean_interval,
    overlaps,
    prediction_interval,
    welch_p,
)


def test_wilson_interval_of_an_accuracy():
    low, high = accuracy_interval(0.78, 10_000)
    ci = stats.binomtest(7800, 10_000).proportion_ci(0.95, method="wilson")
    assert (low, high) == pytest.approx((ci.low, ci.high))
    assert (low, high) == pytest.approx((0.771774, 0.788011), abs=1e-6)
    assert high - low == pytest.approx(0.0162, abs=2e-4)  # 10,000 images: about +-0.8 points
    two_k = accuracy_interval(0.78, 2_000)
    assert two_k[1] - two_k[0] > 2 * (high - low)  # 2,000 images: over twice as wide
    assert accuracy_interval(1.0, 50)[1] == pytest.approx(1.0)  # Wilson stays inside [0, 1]
    assert all(math.isnan(v) for v in accuracy_interval(0.5, 0))
    assert interval_metrics("test_accuracy", 0.78, 10_000) == {
        "test_accuracy_ci_low": low,
        "test_accuracy_ci_high": high,
    }


def test_mean_and_t_interval():
    values = [0.781, 0.774, 0.779]
    s = mean_interval(values)
    low, high = stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=stats.sem(values))
    assert (s.n, s.mean, s.low, s.high) == pytest.approx((3, 0.778, low, high))
    assert s.std == pytest.approx(0.0036056, abs=1e-6)
    one = mean_interval([0.7])
    assert one.n == 1 and one.mean == 0.7 and math.isnan(one.low)
    assert mean_interval([0.7, float("nan"), 0.8]).n == 2  # a run without the metric is left out
    assert "[" in s.text() and "n=1" in one.text()


def test_prediction_interval_is_wider_than_the_mean_interval():
    values = [0.781, 0.774, 0.779]
    s = mean_interval(values)
    low, high = prediction_interval(values)
    half = stats.t.ppf(0.975, 2) * s.std * math.sqrt(1 + 1 / 3)
    assert (low, high) == pytest.approx((s.mean - half, s.mean + half))
    assert low < s.low and high > s.high


def test_welch_test():
    a, b = [0.781, 0.774, 0.779], [0.771, 0.765, 0.769]
    assert welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert distinguishable(welch_p(a, b))
    assert welch_p(a, a) == pytest.approx(1.0) and not distinguishable(welch_p(a, a))
    assert welch_p([0.1, 0.1], [0.1, 0.1]) == 1.0  # no spread and the same: no difference
    assert welch_p([0.1, 0.1], [0.5, 0.5]) == 0.0  # no spread and apart
    assert math.isnan(welch_p([0.1], [0.2, 0.3])) and not distinguishable(math.nan)


def test_overlaps():
    assert overlaps((0.1, 0.3), (0.2, 0.4)) and overlaps((0.1, 0.2), (0.2, 0.3))
    assert not overlaps((0.1, 0.2), (0.25, 0.3))
