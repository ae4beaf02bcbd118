"""Chebyshev interpolants of the functions an encrypted evaluator has to approximate.

A degree-``d`` interpolant of ``f`` at the ``d + 1`` Chebyshev points of ``[lo, hi]`` is within
a small factor of the best uniform polynomial approximation there; outside the interval it is
not ``f`` (it grows like ``T_d``), so callers count such inputs and nothing here clips them.
Evaluation is Clenshaw's recurrence on the coefficients (differentiable, any dtype); for wide
tensors in training, ``tabulated`` reads the same polynomial from a fine table instead (a
degree-128 Clenshaw over a feed-forward's inner states costs a second per layer on one core,
the table a few milliseconds; the two agree to float32 rounding, see ``tabulated``). Under
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

    def tabulated(self, x: torch.Tensor) -> torch.Tensor:
        """The same polynomial read from a table of ``TABLE_POINTS`` + 1 values on [lo, hi], linearly
        interpolated, with its derivative from a table of ``p'`` (not of the interpolant); inputs
        outside the interval get Clenshaw's exact values. The table's error is at most
        ``h^2/8 max|p''|`` (h = (hi - lo) / TABLE_POINTS): about 3e-7 for gelu_poly's fits, below
        float32's rounding of its outputs (the tests check the bound against float64 Clenshaw)."""
        return _Tabulated.apply(x, self)

    @property
    def depth(self) -> int:
        """CKKS levels: the basis up to T_d, then the coefficient products."""
        return math.ceil(math.log2(self.degree)) + 1 if self.degree > 1 else 1

    def max_error(self, points: int = 20001) -> float:
        """The largest |fit - fn| on a fine grid of the interval (float64): what the degree buys."""
        x = np.linspace(self.lo, self.hi, points)
        return float(np.abs(self(torch.from_numpy(x)).numpy() - FUNCTIONS[self.fn](x)).max())


TABLE_POINTS = 1 << 16  # intervals of a tabulated fit: error h^2/8 max|p''|, h = (hi - lo) / 2^16


@lru_cache(maxsize=64)
def _tables(fit: ChebyshevFit, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """p and dp/dx on the table's grid of [lo, hi], from float64 Chebyshev series."""
    series = np.polynomial.chebyshev.Chebyshev(fit.coeffs, domain=[fit.lo, fit.hi])
    grid = np.linspace(fit.lo, fit.hi, TABLE_POINTS + 1)
    return (torch.as_tensor(series(grid), dtype=dtype, device=device),
            torch.as_tensor(series.deriv()(grid), dtype=dtype, device=device))


def _lookup(table: torch.Tensor, fit: ChebyshevFit, x: torch.Tensor) -> torch.Tensor:
    u = (x - fit.lo) * (TABLE_POINTS / (fit.hi - fit.lo))
    i = u.nan_to_num(0.0).floor().clamp(0, TABLE_POINTS - 1)
    w = u - i
    i = i.long()
    return torch.lerp(table[i], table[i + 1], w)


class _Tabulated(torch.autograd.Function):
    """``ChebyshevFit.tabulated``: a table lookup forward, the derivative's table backward, so only
    the input is kept for the backward pass (Clenshaw through autograd keeps every step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fit: ChebyshevFit) -> torch.Tensor:
        ctx.fit = fit
        ctx.save_for_backward(x)
        return _Tabulated._eval(x, fit, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * _Tabulated._eval(x, ctx.fit, 1), None

    @staticmethod
    def _eval(x: torch.Tensor, fit: ChebyshevFit, which: int) -> torch.Tensor:
        table = _tables(fit, x.dtype, str(x.device))[which]
        y = _lookup(table, fit, x)
        outside = (x < fit.lo) | (x > fit.hi) | x.isnan()  # a nan stays nan, through Clenshaw
        if outside.any():  # rare, and never clipped: Clenshaw's own values (or slope) there
            xo = x[outside]
            coeffs = fit.coeffs if which == 0 else tuple(
                np.polynomial.chebyshev.chebder(np.array(fit.coeffs)) * (2.0 / (fit.hi - fit.lo)))
            y = y.masked_scatter(outside, clenshaw(tuple(coeffs), (2.0 * xo - (fit.lo + fit.hi)) / (fit.hi - fit.lo)))
        return y
