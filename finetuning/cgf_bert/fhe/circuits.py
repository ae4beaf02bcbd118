"""The encrypted circuits of the attention softmax (CGF, exact), each with its float64 reference."""


from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.reciprocal import goldschmidt, goldschmidt_iters, linear_guess
from cgf_bert.fhe.ops import broadcast, chebyshev_series, repeated_squaring, rotsum, row_total
from cgf_bert.fhe.packing import PackedCt
from cgf_bert.fhe.references import _centre, _poly_depth, _poly_np, _unit_map, cgf_reference, exact_reference

# ---------------------------------------------------------------------------------------------
# Context: engine and keys




# ---------------------------------------------------------------------------------------------
# Slot operations: the same circuit code runs on ciphertexts or on numpy slot vectors






# ---------------------------------------------------------------------------------------------
# Packing (pure numpy)












# ---------------------------------------------------------------------------------------------
# Circuit building blocks (any ops)
























# ---------------------------------------------------------------------------------------------
# Plaintext references. ``scores`` (R, K), ``mask`` (R, K) or (K,) bool; return probs (R, K).












# ---------------------------------------------------------------------------------------------
# Circuits


@dataclass(frozen=True)
class CgfCircuit:
    """Encrypted CGF softmax: ``PolyExp(x - c*var) * mask / n``, ``x = (s - mu) * mask``.

    Levels: row statistics 3 (``var = E[s^2] - mu^2``, each row total one level; the affine
    map onto the polynomial's [-1, 1] is folded into the plaintext factors), then the
    polynomial ``ceil(log2 d) + 1`` with ``mask * n^(-1/2^k)`` folded into its coefficients,
    ``k`` squarings, and P @ V 1.
    """

    poly: PolyExp = PolyExp()
    coeff: float = 0.5
    name: str = "cgf"

    def __post_init__(self):
        if self.coeff < 0:
            raise CgfBertError(f"the CGF coefficient must be >= 0, got {self.coeff}")

    @property
    def depth(self) -> int:
        return 3 + _poly_depth(self.poly) + 1

    prob_scale = 1.0  # the probability ciphertext holds p itself

    def probs(self, ops, s, pc: PackedCt):
        """Encrypted scores (slots,) -> encrypted probabilities (slots,)."""
        a, b = _unit_map(self.poly)
        mask, inv_n, first = (PackedCt.slots(v) for v in (pc.mask, pc.inv_n, pc.first))
        g = math.sqrt(a * self.coeff) if self.coeff > 0 else 1.0
        mu = row_total(ops, ops.mul_plain(s, mask * inv_n), first * g, pc.width)  # g*mu, every slot
        t = ops.sub(ops.mul_plain(s, mask * a), ops.mul_plain(mu, mask * (a / g)))  # a*x
        if self.coeff > 0:
            sq = ops.square(ops.mul_plain(s, mask * np.sqrt(a * self.coeff * inv_n)))  # a c s^2 m/n
            t = ops.sub(t, ops.sub(row_total(ops, sq, first, pc.width), ops.square(mu)))  # - a c var
        t = ops.add_const(t, -b)  # to_unit(x - c var)
        weight = mask * inv_n ** (0.5**self.poly.squarings)  # (q * n^(-1/2^k))^(2^k) = q^(2^k) / n
        return repeated_squaring(ops, chebyshev_series(ops, t, self.poly.coeffs, weight), self.poly.squarings)

    def argument(self, scores, mask) -> np.ndarray:
        """``x - c*var`` (R, K), the polynomial's input."""
        m, n, mu, x = _centre(scores, mask)
        var = (scores * scores * m).sum(axis=-1, keepdims=True) / n - mu * mu  # as the circuit: E[s^2] - mu^2
        return x - self.coeff * var

    def reference(self, scores, mask) -> np.ndarray:
        """The circuit in float64: the plaintext ``cgf_poly`` softmax."""
        m = np.broadcast_to(np.asarray(mask, dtype=np.float64), scores.shape)
        return _poly_np(self.poly, self.argument(scores, mask)) * m / m.sum(axis=-1, keepdims=True)

    def references(self, scores, mask) -> dict[str, np.ndarray]:
        return {"cgf_poly": self.reference(scores, mask), "cgf": cgf_reference(scores, mask, self.coeff),
                "exact": exact_reference(scores, mask)}

    def flagged_rows(self, scores, mask) -> tuple[np.ndarray, dict]:
        """(R,) rows with a valid polynomial argument outside [lo, hi], and how many such arguments."""
        arg, m = self.argument(scores, mask), np.broadcast_to(np.asarray(mask, bool), scores.shape)
        out = ((arg < self.poly.lo) | (arg > self.poly.hi)) & m
        return out.any(axis=-1), {"args_outside_poly": int(out.sum())}


@dataclass(frozen=True)
class ExactCircuit:
    """Encrypted softmax without a max: ``E = PolyExp(x) * mask``, ``x = (s - mu) * mask``, then
    ``E / sum(E)`` with the reciprocal by Goldschmidt on ``sum_bound`` (bounds on the row sum of
    ``exp(s - mu)`` over valid keys; rows outside it get a wrong reciprocal, see ``goldschmidt``).

    ``iters=None`` picks the fewest iterations with relative error <= ``tol`` inside the bound.
    Levels: centring 3, polynomial ``ceil(log2 d) + 1 + k`` (the mask folded into its
    coefficients), linear guess 1, ``e0`` 1, ``iters``, the product with ``E`` 1, and P @ V 1.
    CKKS error is absolute (about 1e-8 here), so the circuit keeps every value far from 0:
    Goldschmidt runs on ``S' = S / hi`` in ``[r, 1]`` with ``y ~ hi / S``, and the probability
    ciphertext holds ``hi * p`` (``prob_scale``, a public factor: P @ V folds ``1/hi`` into V's
    diagonals and decrypted probabilities are divided by it). Computing ``1/S ~ 1e-3`` or
    ``E / hi`` in the ciphertext instead costs about three digits.
    """

    poly: PolyExp = PolyExp()
    sum_bound: tuple[float, float] = (32.0, 65536.0)
    iters: int | None = None
    tol: float = 1e-4
    name: str = "exact"

    def __post_init__(self):
        lo, hi = self.sum_bound
        if not 0 < lo < hi:
            raise CgfBertError(f"the row-sum bound must be 0 < lo < hi, got {self.sum_bound}")

    @property
    def recip_iters(self) -> int:
        if self.iters is not None:
            return self.iters
        return goldschmidt_iters(self.sum_bound, self.tol)

    @property
    def depth(self) -> int:
        return 3 + _poly_depth(self.poly) + 2 + self.recip_iters + 1 + 1

    @property
    def prob_scale(self) -> float:
        return self.sum_bound[1]  # the probability ciphertext holds hi * p

    def probs(self, ops, s, pc: PackedCt):
        """Encrypted scores (slots,) -> encrypted probabilities (slots,)."""
        a, b = _unit_map(self.poly)
        mask, inv_n, first = (PackedCt.slots(v) for v in (pc.mask, pc.inv_n, pc.first))
        mu = row_total(ops, ops.mul_plain(s, mask * inv_n), first, pc.width)  # every slot
        t = ops.add_const(ops.mul_plain(ops.sub(s, mu), mask * a), -b)  # to_unit(x)
        e = repeated_squaring(ops, chebyshev_series(ops, t, self.poly.coeffs, mask), self.poly.squarings)
        inv = broadcast(ops, self._reciprocal(ops, rotsum(ops, e, pc.width), first), pc.width)
        return ops.mul(e, inv)  # hi * E / S

    def _reciprocal(self, ops, total, first: np.ndarray):
        """``y ~ hi / S`` by Goldschmidt on slot ``r*W`` (``total`` there is S); other slots end ~0.

        ``y0 = alpha - beta S'`` and ``e0 = 1 - S' y0 = 1 - alpha S' + beta S'^2`` (``S' = S/hi``)
        are both taken from ``S`` directly, the square written as one of ``sqrt(beta) S'``:
        the same depth as ``1 - S' * y0`` and about ten times less error (no product of two
        noisy ciphertexts before the squarings amplify it).
        """
        alpha, beta = linear_guess(self.sum_bound)
        hi = self.sum_bound[1]
        y = ops.add_plain(ops.mul_plain(total, -beta / hi * first), alpha * first)  # 0 off slot r*W
        quad = ops.square(ops.mul_plain(total, math.sqrt(beta) / hi * first))  # beta S'^2
        e = ops.add(ops.add_plain(ops.mul_plain(total, -alpha / hi * first), first), quad)  # 0 off slot r*W
        for i in range(self.recip_iters):
            y = ops.add(y, ops.mul(y, e))
            if i + 1 < self.recip_iters:
                e = ops.square(e)
        return y

    def row_sums(self, scores, mask) -> np.ndarray:
        """(R,): the true ``sum exp(s - mu)`` over valid keys, which the bound must hold."""
        m, _, _, x = _centre(scores, mask)
        return (np.exp(x) * m).sum(axis=-1)

    def reference(self, scores, mask) -> np.ndarray:
        """The circuit in float64: same polynomial, same Goldschmidt steps."""
        m, _, _, x = _centre(scores, mask)
        e = _poly_np(self.poly, x) * m
        return e * goldschmidt(e.sum(axis=-1, keepdims=True), self.sum_bound, self.recip_iters)

    def references(self, scores, mask) -> dict[str, np.ndarray]:
        return {"exact_circuit": self.reference(scores, mask), "exact": exact_reference(scores, mask)}

    def flagged_rows(self, scores, mask) -> tuple[np.ndarray, dict]:
        """(R,) rows whose true row sum leaves ``sum_bound`` or with a centred score outside
        the polynomial's [lo, hi], and the counts of each."""
        total, (lo, hi) = self.row_sums(scores, mask), self.sum_bound
        m, _, _, x = _centre(scores, mask)
        out = ((x < self.poly.lo) | (x > self.poly.hi)) & (m > 0)
        sums = (total < lo) | (total > hi)
        return sums | out.any(axis=-1), {"sums_below": int((total < lo).sum()), "sums_above": int((total > hi).sum()),
                                         "args_outside_poly": int(out.sum())}


# ---------------------------------------------------------------------------------------------
# Evaluation and report
















