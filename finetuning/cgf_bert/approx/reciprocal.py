"""The reciprocal an encrypted evaluator runs: a linear first guess on a bound, then Goldschmidt steps.

Plain arithmetic only, so the same function serves numpy (the circuits' float64 references) and
torch (the plaintext ``exact_poly`` softmax).
"""

from __future__ import annotations

import math


def linear_guess(bound: tuple[float, float]) -> tuple[float, float]:
    """``(alpha, beta)``: ``alpha - beta*s`` minimises max |1 - s*y0| on ``[r, 1]``, r = lo/hi."""
    r = bound[0] / bound[1]
    beta = 8.0 / ((1.0 + r) ** 2 + 4.0 * r)
    return beta * (1.0 + r), beta


def goldschmidt_iters(bound: tuple[float, float], tol: float) -> int:
    """The fewest Goldschmidt steps whose relative error is at most ``tol`` everywhere inside ``bound``."""
    alpha, beta = linear_guess(bound)
    r = bound[0] / bound[1]
    e0 = 1.0 - r * (alpha - beta * r)  # the largest |e0| on the bound (equioscillation)
    return max(0, math.ceil(math.log2(math.log(tol) / math.log(e0))))


def goldschmidt(total, bound: tuple[float, float], iters: int):
    """``1/total`` for ``total`` in ``bound`` (an array or a tensor), as the encrypted circuit runs it.

    ``y0`` is the minimax-relative linear guess on the bound; then ``y <- y (1 + e)``,
    ``e <- e^2`` with ``e = 1 - total*y0``, so the relative error after ``m`` steps is
    ``e0^(2^m)``. Below the bound the error is larger; above it ``|e0|`` exceeds 1 once
    ``total > (1 + r) hi`` roughly, and ``e`` grows like ``e0^(2^m)``: under CKKS that
    overflows the modulus and spoils every slot of the ciphertext, not only that row.
    """
    s = total / bound[1]  # in [r, 1] inside the bound
    alpha, beta = linear_guess(bound)
    y = alpha - beta * s
    e = 1.0 - s * y
    for _ in range(iters):
        y, e = y + y * e, e * e
    return y / bound[1]
