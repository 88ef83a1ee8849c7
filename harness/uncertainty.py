"""How sure an accuracy is: the intervals and tests behind every ranking the harness prints.

All from scipy.stats (docs/uncertainty.md says what each one means and when it applies):
- one run's accuracy on n images: Wilson's binomial interval (`accuracy_interval`);
- a configuration retrained with several seeds: the mean with Student's t interval
  (`mean_interval`), and the interval a further seed would fall in (`prediction_interval`);
- two configurations' seeds: Welch's t-test (`welch_p`), no equal-variance assumption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


def accuracy_interval(accuracy: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's interval for an accuracy measured on `n` images (correct = round(accuracy * n))."""
    if n <= 0 or not math.isfinite(accuracy):
        return math.nan, math.nan
    ci = stats.binomtest(int(round(accuracy * n)), n).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def interval_metrics(name: str, accuracy: float, n: int) -> dict[str, float]:
    """`name`'s interval as the two metrics logged beside it: `<name>_ci_low`, `<name>_ci_high`."""
    low, high = accuracy_interval(accuracy, n)
    return {f"{name}_ci_low": low, f"{name}_ci_high": high}


@dataclass(frozen=True)
class Summary:
    """Seeds of one configuration: their mean and Student's t interval of it."""

    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan for one value
    low: float
    high: float

    def text(self, digits: int = 4) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_interval(values, confidence: float = CONFIDENCE) -> Summary:
    """The mean of `values` with its t interval (nan bounds below two values)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def prediction_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Where one more seed's value falls with `confidence`: mean +- t * s * sqrt(1 + 1/n)."""
    s = mean_interval(values, confidence)
    if s.n < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, s.n - 1)) * s.std * math.sqrt(1 + 1 / s.n)
    return s.mean - half, s.mean + half


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test that `a` and `b` have the same mean.

    Seeds that all agree (zero variance on both sides) give no t statistic: then the means are
    either equal (p = 1) or apart with no spread at all (p = 0). Fewer than two values: nan.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if a.std() == 0 and b.std() == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def distinguishable(p: float, alpha: float = ALPHA) -> bool:
    """A difference is claimed only at p < alpha; nan (too few seeds) is never a claim."""
    return math.isfinite(p) and p < alpha


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two intervals share a point: a quick screen of single runs, not a test."""
    return not (a[1] < b[0] or b[1] < a[0])
