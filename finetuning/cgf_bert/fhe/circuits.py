"""The encrypted circuits of the attention softmax, one per polynomial softmax kind, built from its spec.

``CIRCUITS`` maps a softmax kind's name (``approx.softmax``) to the circuit that evaluates it, and
``circuit_for(spec)`` builds one from a spec. The spec is the circuit's only source of parameters
and of depth: ``circuit.depth`` is the kind's declared ``spec.depth``, which the tests measure on
levelled slot vectors (``ops.LevelledNumpyOps``) and under CKKS. Each circuit has a float64
reference of the function it computes, tested against the torch softmax of its spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.softmax import SOFTMAX, Normalisation, normalisation
from cgf_bert.approx.spec import Spec
from cgf_bert.fhe.ops import broadcast, chebyshev_series, reciprocal, repeated_squaring, rotsum, row_total
from cgf_bert.fhe.packing import PackedCt
from cgf_bert.fhe.references import _centre, _poly_np, _unit_map, cgf_argument, cgf_reference, exact_reference
from cgf_bert.registry import Registry

CIRCUITS: Registry[type] = Registry("softmax circuit")  # softmax kind name -> the circuit class that evaluates it


def circuit_for(spec: Spec):
    """The circuit that evaluates ``spec``, one layer's plain softmax spec; a clear error for any other."""
    if spec.layers:
        raise CgfBertError(f"softmax {spec.label()} has per-layer overrides; a circuit evaluates one layer's "
                           "softmax (take spec.for_layer(i))")
    if spec.op != SOFTMAX.name or spec.name not in CIRCUITS:
        raise CgfBertError(f"no encrypted circuit evaluates {spec.op} {spec.label()}; the softmax kinds with one: "
                           f"{', '.join(sorted(CIRCUITS))} (a kind with a polynomial form reaches one by "
                           "spec.with_polynomial(poly))")
    return CIRCUITS[spec.name](spec)


def evaluates(kind: str):
    """Class decorator: register the circuit as the evaluator of softmax kind ``kind``, which must declare a depth."""

    def deco(cls):
        if SOFTMAX.kinds.lookup(kind).depth is None:
            raise CgfBertError(f"softmax {kind!r} declares no depth; a circuit's depth is its kind's declaration")
        cls.kind = kind
        return CIRCUITS.register(kind)(cls)

    return deco


@dataclass(frozen=True)
class SoftmaxCircuit:
    """A softmax circuit and the spec it evaluates (its only parameters)."""

    spec: Spec
    kind: ClassVar[str]  # the softmax kind it evaluates (set by ``evaluates``)
    prob_scale: ClassVar[float] = 1.0  # the probability ciphertext holds prob_scale * p (a public factor)

    def __post_init__(self):
        if self.spec.op != SOFTMAX.name or self.spec.name != self.kind or self.spec.layers:
            raise CgfBertError(f"{type(self).__name__} evaluates one layer's plain softmax {self.kind!r}, "
                               f"not {self.spec.op} {self.spec.label()} (circuit_for finds a spec's circuit)")

    @classmethod
    def from_spec(cls, spec: Spec) -> SoftmaxCircuit:
        return cls(spec)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def depth(self) -> int:
        """Levels ``probs`` consumes: the kind's declared depth (``P @ V`` takes ``ops.PV_DEPTH`` more)."""
        return self.spec.depth

    @property
    def poly(self) -> PolyExp:
        v = self.spec.values
        return PolyExp(v["degree"], v["exp_lo"], v["exp_hi"], v["squarings"])


@evaluates("cgf_poly")
class CgfCircuit(SoftmaxCircuit):
    """Encrypted CGF softmax: ``PolyExp(x - c*var) * mask / n``, ``x = (s - mu) * mask``.

    Row statistics take 3 levels (``var = E[s^2] - mu^2``, each row total one level; the affine
    map onto the polynomial's [-1, 1] is folded into the plaintext factors), then the polynomial
    with ``mask * n^(-1/2^k)`` folded into its coefficients, and its ``k`` squarings.
    """

    @property
    def coeff(self) -> float:
        return self.spec.values["coeff"]

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
        """``x - c*var`` (R, K), the polynomial's input, as the torch ``cgf_poly`` computes it."""
        return cgf_argument(scores, mask, self.coeff)

    def reference(self, scores, mask) -> np.ndarray:
        """The circuit in float64: the plaintext ``cgf_poly`` softmax."""
        m = np.broadcast_to(np.asarray(mask, dtype=np.float64), scores.shape)
        return _poly_np(self.poly, self.argument(scores, mask)) * m / m.sum(axis=-1, keepdims=True)

    def references(self, scores, mask) -> dict[str, np.ndarray]:
        """The circuit's own function first, then CGF with the real exp and the exact softmax."""
        return {"cgf_poly": self.reference(scores, mask), "cgf": cgf_reference(scores, mask, self.coeff),
                "exact": exact_reference(scores, mask)}

    def flagged_rows(self, scores, mask) -> tuple[np.ndarray, dict]:
        """(R,) rows with a valid polynomial argument outside [lo, hi], and how many such arguments."""
        arg, m = self.argument(scores, mask), np.broadcast_to(np.asarray(mask, bool), scores.shape)
        out = ((arg < self.poly.lo) | (arg > self.poly.hi)) & m
        return out.any(axis=-1), {"args_outside_poly": int(out.sum())}


@evaluates("exact_poly")
class ExactCircuit(SoftmaxCircuit):
    """Encrypted softmax without a max: ``E = PolyExp(x) * mask``, ``x = (s - mu) * mask``, then
    ``E / sum(E)`` with the reciprocal by Goldschmidt on the spec's ``[sum_lo, sum_hi]`` (bounds on
    the row sum of ``exp(s - mu)`` over valid keys; rows outside get a wrong reciprocal, see
    ``goldschmidt``), with ``iters`` steps or the fewest that reach ``tol``. With ``norm_steps`` h
    the division comes before the last h squarings, each of which is divided by its row sum again
    (``approx.softmax.Normalisation``): the first sum is of ``exp(x / 2^h)``, the later ones of
    ``p^2`` in ``[1/keys, 1]``.

    CKKS error is absolute (about 1e-8 here), so the circuit keeps every value far from 0:
    Goldschmidt runs on ``S' = S / hi`` in ``[r, 1]`` with ``y ~ G / S``, and the probability
    ciphertext holds ``G * p`` (``prob_scale``, a public factor: P @ V folds ``1/G`` into V's
    diagonals and decrypted probabilities are divided by it), ``G = hi`` for one division and
    ``keys`` with steps (a step's square ``G^2 p^2`` then sums to between ``keys`` and ``2 keys^2``). Computing
    ``1/S ~ 1e-3`` or ``E / hi`` in the ciphertext instead costs about three digits.
    """

    @property
    def norm(self) -> Normalisation:
        return normalisation(self.spec.values)

    @property
    def sum_bound(self) -> tuple[float, float]:
        return self.norm.bound

    @property
    def recip_iters(self) -> int:
        return self.norm.iters

    @property
    def prob_scale(self) -> float:
        norm = self.norm
        return float(norm.keys) if norm.steps else norm.bound[1]

    def probs(self, ops, s, pc: PackedCt):
        """Encrypted scores (slots,) -> encrypted probabilities (slots,), times ``prob_scale``."""
        a, b = _unit_map(self.poly)
        mask, inv_n, first = (PackedCt.slots(v) for v in (pc.mask, pc.inv_n, pc.first))
        norm, g = self.norm, self.prob_scale
        mu = row_total(ops, ops.mul_plain(s, mask * inv_n), first, pc.width)  # every slot
        t = ops.add_const(ops.mul_plain(ops.sub(s, mu), mask * a), -b)  # to_unit(x)
        e = repeated_squaring(ops, chebyshev_series(ops, t, self.poly.coeffs, mask), self.poly.squarings - norm.steps)
        p = self._divide(ops, e, first, norm.bound, norm.iters, pc.width)  # g * E / S
        for _ in range(norm.steps):  # g^2 p^2 sums to g^2 sum p^2, in g^2 [1/keys, 1]
            q = ops.square(p)
            p = self._divide(ops, q, first, norm.step_bound(g), norm.step_iters, pc.width)
        return p

    def _divide(self, ops, v, first: np.ndarray, bound: tuple[float, float], iters: int, width: int):
        """``prob_scale * v / (v's row sum)``: the sum on slot ``r*W``, its reciprocal there, broadcast."""
        inv = reciprocal(ops, rotsum(ops, v, width), first, bound, iters, self.prob_scale)
        return ops.mul(v, broadcast(ops, inv, width))

    def row_sums(self, scores, mask) -> np.ndarray:
        """(R,): the true ``sum exp((s - mu) / 2^h)`` over valid keys, which the bound must hold."""
        m, _, _, x = _centre(scores, mask)
        return (np.exp(x / 2.0**self.norm.steps) * m).sum(axis=-1)

    def reference(self, scores, mask) -> np.ndarray:
        """The circuit in float64: same polynomial, same divisions (the plaintext ``exact_poly`` softmax)."""
        m, _, _, x = _centre(scores, mask)
        e = _poly_np(self.poly, x, self.poly.squarings - self.norm.steps)  # exp(x / 2^h)
        return self.norm.apply(e * m, lambda v: v.sum(axis=-1, keepdims=True))

    def references(self, scores, mask) -> dict[str, np.ndarray]:
        """The circuit's own function first, then the exact softmax."""
        return {"exact_circuit": self.reference(scores, mask), "exact": exact_reference(scores, mask)}

    def flagged_rows(self, scores, mask) -> tuple[np.ndarray, dict]:
        """(R,) rows whose true first row sum leaves the bound, with more valid keys than ``keys`` or
        with a centred score outside the polynomial's [lo, hi], and the counts of each."""
        total, (lo, hi) = self.row_sums(scores, mask), self.sum_bound
        m, _, _, x = _centre(scores, mask)
        out = ((x < self.poly.lo) | (x > self.poly.hi)) & (m > 0)
        sums = (total < lo) | (total > hi)
        wide = (m.sum(axis=-1) > self.norm.keys) if self.norm.steps else np.zeros_like(sums)
        return sums | wide | out.any(axis=-1), {"sums_below": int((total < lo).sum()), "sums_above": int((total > hi).sum()),
                                                "rows_over_keys": int(wide.sum()), "args_outside_poly": int(out.sum())}
