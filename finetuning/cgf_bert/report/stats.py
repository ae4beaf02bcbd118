"""Means, standard deviations, paired differences over seeds, their intervals and equivalence tests."""

from __future__ import annotations

import math
from typing import Iterable

from scipy import stats


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


def t_interval(xs: Iterable[float], level: float = 0.95) -> tuple[float, float] | None:
    """``level`` confidence interval of the mean (Student's t, ``scipy.stats``); None below two values.

    For paired differences over seeds this says which gaps the seed set can resolve: with 5
    seeds and a 1.5-point spread the 95 % interval is about ±1.9 points wide.
    """
    xs = list(xs)
    if len(xs) < 2:
        return None
    m, s = mean_std(xs)
    half = float(stats.t.ppf(0.5 + level / 2, len(xs) - 1)) * s / math.sqrt(len(xs))
    return m - half, m + half


def equivalence(diffs: Iterable[float], margin: float, alpha: float = 0.05) -> dict | None:
    """Two one-sided t-tests (TOST) that the mean of paired ``diffs`` lies within ``(-margin, margin)``.

    H0a: mean <= -margin, H0b: mean >= margin, each tested at ``alpha``; the means are equivalent
    when both are rejected, i.e. when p = max(p_a, p_b) < alpha, which is the same as the
    (1 - 2 alpha) interval lying inside the margin. None below two values or with no spread (a
    test needs a variance). Identical diffs give a degenerate t: refused rather than guessed.
    """
    xs = list(diffs)
    if len(xs) < 2:
        return None
    m, s = mean_std(xs)
    if s <= 1e-12 * max(1.0, abs(m)):  # identical values (up to rounding): no variance to test with
        return None
    se, df = s / math.sqrt(len(xs)), len(xs) - 1
    p_low = float(stats.t.sf((m + margin) / se, df))  # against mean <= -margin
    p_high = float(stats.t.cdf((m - margin) / se, df))  # against mean >= +margin
    p = max(p_low, p_high)
    return {"margin": margin, "alpha": alpha, "n": len(xs), "p_lower": p_low, "p_upper": p_high, "p": p, "equivalent": p < alpha}


def paired_diff(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """Seed -> ``a[seed] - b[seed]`` over the seeds both have, in seed order of ``a``.

    Same-seed runs share initialisation, data order and dropout draws, so their difference
    removes what the seed explains; the seed set decides the comparison, never the run order.
    """
    return {s: a[s] - b[s] for s in sorted(a) if s in b}
