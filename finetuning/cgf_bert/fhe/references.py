"""Plaintext float64 references of what the circuits compute."""

from __future__ import annotations

import numpy as np
import torch

from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.reciprocal import goldschmidt  # noqa: F401  (the circuits' reciprocal)


def _unit_map(poly: PolyExp) -> tuple[float, float]:
    """``(a, b)`` with ``to_unit(x) = a*x - b``."""
    return 2.0 / (poly.hi - poly.lo), (poly.lo + poly.hi) / (poly.hi - poly.lo)


def _poly_depth(poly: PolyExp) -> int:
    """Levels of ``chebyshev_series`` (basis + coefficient products) and the squarings."""
    return poly.depth


def _poly_np(poly: PolyExp, x: np.ndarray) -> np.ndarray:
    """The torch ``PolyExp`` itself, in float64 (the plaintext ``cgf_poly`` function)."""
    return poly(torch.as_tensor(x, dtype=torch.float64)).numpy()


def _centre(scores, mask):
    m = np.broadcast_to(np.asarray(mask, dtype=np.float64), scores.shape)
    n = m.sum(axis=-1, keepdims=True)
    mu = (scores * m).sum(axis=-1, keepdims=True) / n
    return m, n, mu, (scores - mu) * m


def cgf_reference(scores, mask, coeff: float = 0.5) -> np.ndarray:
    """The CGF softmax with the real exp."""
    m, n, _, x = _centre(scores, mask)
    var = (x * x).sum(axis=-1, keepdims=True) / n
    return np.exp(x - coeff * var) * m / n


def exact_reference(scores, mask) -> np.ndarray:
    """Standard softmax over the valid keys (masked keys 0)."""
    m = np.broadcast_to(np.asarray(mask, dtype=bool), scores.shape)
    z = np.where(m, scores, -np.inf)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
