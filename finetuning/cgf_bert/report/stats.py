"""Means, standard deviations and paired differences over seeds."""

from __future__ import annotations

import math
from typing import Iterable


def mean_std(xs: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    xs = list(xs)
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt_pm(xs: Iterable[float], scale: float = 100.0, digits: int = 2) -> str:
    """'86.30 ± 0.52' in points; one value has no spread to show, no values give '—'."""
    xs = list(xs)
    if not xs:
        return "—"
    m, s = mean_std(xs)
    if len(xs) == 1:
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


# Two-sided 95% quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df));
# a table, so that the package needs no scipy for the one number it uses.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def t_interval(xs: Iterable[float]) -> tuple[float, float] | None:
    """95% confidence interval of the mean (Student's t); None below two values.

    For paired differences over seeds this says which gaps the seed set can resolve: with 5
    seeds and a 1.5-point spread the interval is about ±1.9 points wide.
    """
    xs = list(xs)
    if len(xs) < 2:
        return None
    m, s = mean_std(xs)
    half = _T95.get(len(xs) - 1, 1.96) * s / math.sqrt(len(xs))  # beyond 30 df, the normal quantile (under 4% short)
    return m - half, m + half


def paired_diff(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """Seed -> ``a[seed] - b[seed]`` over the seeds both have, in seed order of ``a``.

    Same-seed runs share initialisation, data order and dropout draws, so their difference
    removes what the seed explains; the seed set decides the comparison, never the run order.
    """
    return {s: a[s] - b[s] for s in sorted(a) if s in b}
