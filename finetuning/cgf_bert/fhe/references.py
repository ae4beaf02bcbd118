"""Plaintext float64 references of what the circuits compute. ``scores`` (R, K), ``mask`` (R, K) or (K,) bool; probs (R, K)."""

from __future__ import annotations

import numpy as np
import torch

from cgf_bert.approx.polyexp import PolyExp


def _unit_map(poly: PolyExp) -> tuple[float, float]:
    """``(a, b)`` with ``to_unit(x) = a*x - b``."""
    return 2.0 / (poly.hi - poly.lo), (poly.lo + poly.hi) / (poly.hi - poly.lo)


def _poly_np(poly: PolyExp, x: np.ndarray, squarings: int | None = None) -> np.ndarray:
    """The torch ``PolyExp`` itself, in float64 (the plaintext ``cgf_poly`` function); with ``squarings``,
    its fit followed by that many of its squarings only."""
    if squarings is None:
        return poly(torch.as_tensor(x, dtype=torch.float64)).numpy()
    y = poly.q(torch.as_tensor(x, dtype=torch.float64)).numpy()
    for _ in range(squarings):
        y = y * y
    return y


def _centre(scores, mask):
    """(mask as floats (R, K), n (R, 1), row mean of the valid scores (R, 1), centred scores, masked entries 0)."""
    m = np.broadcast_to(np.asarray(mask, dtype=np.float64), scores.shape)
    n = m.sum(axis=-1, keepdims=True)
    mu = (scores * m).sum(axis=-1, keepdims=True) / n
    return m, n, mu, (scores - mu) * m


def cgf_argument(scores, mask, coeff: float) -> np.ndarray:
    """``x - c*var`` (R, K), CGF's exp argument, with ``var`` the mean of the centred squares as the
    torch softmaxes compute it (``softmax.centred``). The circuit forms ``E[s^2] - mu^2`` instead:
    the same number in exact arithmetic, one level less (``CgfCircuit.probs``)."""
    _, n, _, x = _centre(scores, mask)
    return x - coeff * (x * x).sum(axis=-1, keepdims=True) / n


def cgf_reference(scores, mask, coeff: float = 0.5) -> np.ndarray:
    """The CGF softmax with the real exp."""
    m = np.broadcast_to(np.asarray(mask, dtype=np.float64), scores.shape)
    return np.exp(cgf_argument(scores, mask, coeff)) * m / m.sum(axis=-1, keepdims=True)


def exact_reference(scores, mask) -> np.ndarray:
    """Standard softmax over the valid keys (masked keys 0)."""
    m = np.broadcast_to(np.asarray(mask, dtype=bool), scores.shape)
    z = np.where(m, scores, -np.inf)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
