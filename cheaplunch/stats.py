"""Statistics of a bake-off: mean and Student-t confidence interval over seeds, and the verdict of a
method against its baseline from the interval of their seed-paired differences (never from the means).

With n seeds the interval is mean +- t_{(1+level)/2, n-1} x sd / sqrt(n) (sd with n - 1 degrees of
freedom). A paired difference (method seed k minus baseline seed k: the same data subset, the same
fine-tuning noise where the seeds match) removes the seed-to-seed variation the two arms share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

BETTER, TIE, WORSE = "better", "tie", "worse"


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    sd: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """'12.3 ± 1.4' (scaled, e.g. x100 for AP); a single seed has no interval: '12.3 (1 seed)'."""
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f} (1 seed)"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and two-sided Student-t confidence interval of `values` (one per seed).

    One value gives a zero-width interval marked by n=1 (no spread can be estimated)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, mean, mean, 1, 0.0)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(_scipy_stats.t.ppf((1 + level) / 2, df=n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def paired_difference(method: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> Interval:
    """Interval of method - baseline over seeds paired by position (seed k with seed k)."""
    if len(method) != len(baseline):
        raise ValueError(f"paired difference needs as many seeds on both sides ({len(method)} vs {len(baseline)})")
    return t_interval([float(a) - float(b) for a, b in zip(method, baseline)], level)


def verdict(difference: Interval) -> str:
    """better / worse when the whole interval of the difference lies above / below 0, else tie.

    A single seed has no interval, so it can never be better or worse than its baseline."""
    if difference.n < 2:
        return TIE
    if difference.low > 0:
        return BETTER
    if difference.high < 0:
        return WORSE
    return TIE
