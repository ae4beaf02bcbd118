"""The polynomial exp an encrypted (CKKS) evaluator runs: a Chebyshev fit, then squarings.

``exp(x) = exp(x / 2^k) ^ (2^k)``: a degree-``d`` Chebyshev interpolant ``q`` of
``exp(x / 2^k)`` on ``[lo, hi]`` followed by ``k`` squarings. Squaring doubles the argument
range a low degree can cover, at one multiplicative level each. Outside ``[lo, hi]`` the
polynomial is not exp (it grows like ``T_d``), so callers count such inputs; nothing here
clips them.

The same coefficients serve the plaintext ``cgf_poly`` softmax (torch, differentiable) and
the encrypted evaluation (``cgf_bert.fhe``), so the two compute the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=64)
def chebyshev_coeffs(degree: int, lo: float, hi: float, squarings: int) -> tuple[float, ...]:
    """Coefficients ``c_i`` of ``q(t) = sum_i c_i T_i(t)``, ``t`` the image of ``x`` in [-1, 1],
    interpolating ``exp(x / 2^squarings)`` at the ``degree + 1`` Chebyshev points of [lo, hi]."""
    scale = 2.0**-squarings
    fit = np.polynomial.chebyshev.Chebyshev.interpolate(lambda x: np.exp(x * scale), degree, domain=[lo, hi])
    return tuple(float(c) for c in fit.coef)


@dataclass(frozen=True)
class PolyExp:
    """exp approximated as ``q(x) ^ (2^squarings)`` with ``q`` of ``degree`` on ``[lo, hi]``."""

    degree: int = 8
    lo: float = -32.0
    hi: float = 32.0
    squarings: int = 5

    def __post_init__(self):
        if self.degree < 1 or self.squarings < 0 or not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.lo >= self.hi:
            raise ValueError(f"bad polynomial exp {self}: need degree >= 1, squarings >= 0, finite lo < hi")

    @property
    def coeffs(self) -> tuple[float, ...]:
        return chebyshev_coeffs(self.degree, self.lo, self.hi, self.squarings)

    def to_unit(self, x):
        """The affine map of [lo, hi] onto [-1, 1] (Chebyshev's domain)."""
        return (2.0 * x - (self.lo + self.hi)) / (self.hi - self.lo)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(x / 2^k)`` by Clenshaw's recurrence on the Chebyshev coefficients (differentiable)."""
        t = self.to_unit(x)
        c = self.coeffs
        b1 = torch.zeros_like(t)
        b2 = torch.zeros_like(t)
        for ci in reversed(c[1:]):
            b1, b2 = 2.0 * t * b1 - b2 + ci, b1
        return t * b1 - b2 + c[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.q(x)
        for _ in range(self.squarings):
            y = y * y
        return y

    def outside(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> int:
        """How many entries of ``x`` (where ``valid``) fall outside [lo, hi]."""
        out = (x < self.lo) | (x > self.hi)
        if valid is not None:
            out = out & valid
        return int(out.sum())

    @property
    def depth(self) -> int:
        """Multiplicative depth under CKKS: the Chebyshev basis up to T_d (ceil(log2 d) levels),
        one for the coefficients, one per squaring. The affine map onto [-1, 1] costs none: it
        is folded into plaintext factors the circuit multiplies by anyway (``fhe.CgfCircuit``)."""
        return math.ceil(math.log2(self.degree)) + 1 + self.squarings
