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
