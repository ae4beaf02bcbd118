"""Chebyshev interpolants of the functions an encrypted evaluator has to approximate.

A degree-``d`` interpolant of ``f`` at the ``d + 1`` Chebyshev points of ``[lo, hi]`` is within
a small factor of the best uniform polynomial approximation there; outside the interval it is
not ``f`` (it grows like ``T_d``), so callers count such inputs and nothing here clips them.
Evaluation is Clenshaw's recurrence on the coefficients (differentiable, any dtype). Under
CKKS the Chebyshev basis up to ``T_d`` costs ``ceil(log2 d)`` levels and the coefficients one
more; the affine map onto [-1, 1] folds into the plaintext weights of the linear layer before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.special import erf


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


# The functions fitted, by name (a name keeps fits hashable and cacheable).
FUNCTIONS = {"exp": np.exp, "gelu": _gelu, "tanh": np.tanh, "rsqrt": lambda v: 1.0 / np.sqrt(v)}


@lru_cache(maxsize=256)
def coefficients(fn: str, degree: int, lo: float, hi: float) -> tuple[float, ...]:
    """``c_i`` of ``sum_i c_i T_i(t)``, ``t`` the image of ``x`` in [-1, 1], interpolating ``fn`` on [lo, hi]."""
    fit = np.polynomial.chebyshev.Chebyshev.interpolate(FUNCTIONS[fn], degree, domain=[lo, hi])
    return tuple(float(c) for c in fit.coef)


def clenshaw(coeffs: tuple[float, ...], t: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i T_i(t)`` by Clenshaw's recurrence."""
    b1 = torch.zeros_like(t)
    b2 = torch.zeros_like(t)
    for ci in reversed(coeffs[1:]):
        b1, b2 = 2.0 * t * b1 - b2 + ci, b1
    return t * b1 - b2 + coeffs[0]


@dataclass(frozen=True)
class ChebyshevFit:
    """``fn`` approximated on ``[lo, hi]`` by its degree-``degree`` Chebyshev interpolant."""

    fn: str
    degree: int
    lo: float
    hi: float

    def __post_init__(self):
        if self.fn not in FUNCTIONS or self.degree < 1 or not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.lo >= self.hi:
            raise ValueError(f"bad Chebyshev fit {self}: need a known function, degree >= 1, finite lo < hi")

    @property
    def coeffs(self) -> tuple[float, ...]:
        return coefficients(self.fn, self.degree, self.lo, self.hi)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = (2.0 * x - (self.lo + self.hi)) / (self.hi - self.lo)
        return clenshaw(self.coeffs, t)

    @property
    def depth(self) -> int:
        """CKKS levels: the basis up to T_d, then the coefficient products."""
        return math.ceil(math.log2(self.degree)) + 1 if self.degree > 1 else 1

    def max_error(self, points: int = 20001) -> float:
        """The largest |fit - fn| on a fine grid of the interval (float64): what the degree buys."""
        x = np.linspace(self.lo, self.hi, points)
        return float(np.abs(self(torch.from_numpy(x)).numpy() - FUNCTIONS[self.fn](x)).max())
