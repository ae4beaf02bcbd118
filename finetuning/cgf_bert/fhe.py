"""Encrypted (CKKS, ``desilofhe``) evaluation of one attention layer's softmax and its product with V.

Two circuits, each with a float64 plaintext reference that computes the same function:

* ``CgfCircuit``: the CGF softmax ``exp(s - mu - c*var) * mask / n`` with the polynomial exp of
  ``polyexp.PolyExp`` (same Chebyshev coefficients as the plaintext ``cgf_poly`` softmax), so
  decrypt(encrypted) matches the torch ``PolyExp`` to CKKS precision.
* ``ExactCircuit``: standard softmax without a max: centre by the row mean, polynomial exp,
  row sum, reciprocal by Goldschmidt iterations on an assumed sum bound, times exp.

Layout. A row of scores is padded to a power-of-two width ``W`` (>= its number of keys); a
ciphertext holds ``slots / W`` rows, row ``r`` in slots ``[r*W, (r+1)*W)``. Key masks, ``1/n``
and V are public (plaintext), scores are encrypted. Row sums are ``log2 W`` rotate-and-add
steps (left rotations; slot ``r*W`` then holds the row's total), a multiplication by a mask on
slot ``r*W`` (one level), and ``log2 W`` right rotations that copy it over the row's W slots.

P @ V (plaintext V): ``o[r, i] = sum_k p[r, k] V[k, i]`` is a sum over diagonals,
``o = sum_j M_j * rot_j(p)`` with ``j = k - i`` in ``[-(D-1), W-1]`` and ``M_j[r*W + i] =
V_r[i + j, i]`` (zero where ``i + j`` leaves the row, so nothing crosses rows), evaluated
baby-step giant-step: ``sum_g rot_{gB}(sum_b rot_{-gB}(M_{gB+b}) * rot_b(p))``, i.e. ``B - 1``
baby and about ``(W + D) / B`` giant rotations and ``W + D - 1`` plaintext products, one level.
The output lands in slots ``r*W + i``, ``i < D``. (An encrypted V would use the same diagonals
as ciphertexts: ciphertext products instead of plaintext ones, at the same depth.)

Every circuit is written once against a small set of slot operations, run either on
ciphertexts (``FheOps``) or on plain numpy slot vectors (``NumpyOps``, rotate = ``np.roll``),
so the packing and the rotations are testable without encryption.

Depth (levels, no bootstrapping): ``CgfCircuit(PolyExp(8, -32, 32, 5))`` 13, so a ring of 2^15
(16384 slots, 128 rows of W=128 per ciphertext); ``ExactCircuit`` with the same polynomial and
a row-sum bound (32, 65536) at relative error 1e-4 (12 Goldschmidt steps) 28, a ring of 2^16.

Usage::

    circuit = CgfCircuit(PolyExp(8, -32, 32, 5), coeff=0.5)
    ctx = FheContext.for_circuits(circuit)  # keys once; reuse it for every layer
    outs, probs, report = encrypted_attention(blocks, circuit, ctx=ctx, width=128)
    print(report.summary())  # levels, times, errors vs cgf_poly / cgf / exact

``desilofhe`` is an optional dependency (``pip install -e ".[fhe]"``): it is imported only when
an ``FheContext`` is made; the packing, the references and the numpy simulation need only numpy.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import CgfBertError
from .polyexp import PolyExp

Block = tuple  # (scores (Q, K) float64, valid (K,) bool, V (K, D) float64): one (example, head)


# ---------------------------------------------------------------------------------------------
# Context: engine and keys


class FheContext:
    """A desilofhe CKKS engine with its secret, public and relinearization keys, made once.

    ``max_level`` fixes the ring: desilofhe picks the ring size from it (levels 1-2: ring 2^13,
    3-7: 2^14, 8-17: 2^15, 18-36: 2^16 in desilofhe 2.0). A value must stay below about 1e7 at
    level 0 (far more at higher levels) or it wraps around the modulus and spoils every slot.

    Rotation keys are made on first use, one fixed key per rotation step, at the level it is
    first needed (a key made at level l serves ciphertexts at level <= l; a low-level key is a
    fraction of a top-level one's size and time; desilofhe's all-steps key would be ~700 MB at
    ring 2^15 and rotate twice as slowly). No bootstrapping keys: circuits must fit in ``max_level``.
    """

    def __init__(self, max_level: int, *, thread_count: int | None = None, mode: str = "cpu"):
        import desilofhe  # optional dependency

        start = time.perf_counter()
        self.engine = desilofhe.Engine(max_level=max_level, mode=mode, thread_count=thread_count)
        self.secret_key = self.engine.create_secret_key()
        self.public_key = self.engine.create_public_key(self.secret_key)
        self.relin_key = self.engine.create_relinearization_key(self.secret_key)
        self.keygen_s = time.perf_counter() - start  # secret, public and relinearization keys
        self.rotation_keygen_s = 0.0  # grows as rotation keys are made on first use
        self._rotation_keys: dict[int, object] = {}

    @classmethod
    def for_circuits(cls, *circuits, **kw) -> "FheContext":
        """The smallest context whose levels hold every circuit (the ring follows from the depth)."""
        return cls(max(c.depth for c in circuits), **kw)

    @property
    def slots(self) -> int:
        return int(self.engine.slot_count)

    @property
    def ring_size(self) -> int:
        return 2 * self.slots  # CKKS packs N/2 complex slots in a ring of degree N

    @property
    def max_level(self) -> int:
        return int(self.engine.max_level)

    @property
    def rotation_key_count(self) -> int:
        return len(self._rotation_keys)

    @property
    def key_bytes(self) -> int:
        keys = [self.public_key, self.relin_key, *self._rotation_keys.values()]
        return int(sum(k.nbytes for k in keys))

    def rotation_key(self, delta: int, level: int):
        """The fixed rotation key for a left rotation by ``delta`` slots, usable at ``level``."""
        key = self._rotation_keys.get(delta)
        if key is None or key.level < level:
            start = time.perf_counter()
            key = self.engine.create_fixed_rotation_key(self.secret_key, delta, level)
            self.rotation_keygen_s += time.perf_counter() - start
            self._rotation_keys[delta] = key
        return key

    def encrypt(self, slots: np.ndarray):
        """Encrypt a (slots,) float64 vector with the public key at the top level."""
        return self.engine.encrypt(np.ascontiguousarray(slots, dtype=np.float64), self.public_key)

    def decrypt(self, ct) -> np.ndarray:
        return np.asarray(self.engine.decrypt(ct, self.secret_key))  # (slots,)


# ---------------------------------------------------------------------------------------------
# Slot operations: the same circuit code runs on ciphertexts or on numpy slot vectors


class FheOps:
    """Slot operations on desilofhe ciphertexts (rescaling and level alignment are automatic)."""

    def __init__(self, ctx: FheContext):
        self.ctx, self.e, self.rlk = ctx, ctx.engine, ctx.relin_key

    def level(self, x) -> int:
        return int(x.level)

    def mul_plain(self, x, v: np.ndarray):  # one level
        return self.e.multiply(x, np.ascontiguousarray(v, dtype=np.float64))

    def add_plain(self, x, v: np.ndarray):
        return self.e.add(x, np.ascontiguousarray(v, dtype=np.float64))

    def add_const(self, x, c: float):
        return self.e.add(x, float(c))

    def mul(self, x, y):  # one level
        return self.e.multiply(x, y, self.rlk)

    def square(self, x):  # one level
        return self.e.square(x, self.rlk)

    def add(self, x, y):
        return self.e.add(x, y)

    def sub(self, x, y):
        return self.e.subtract(x, y)

    def neg(self, x):
        return self.e.negate(x)

    def rotate(self, x, k: int):
        """Left rotation: slot ``s`` receives slot ``s + k``."""
        return x if k == 0 else self.e.rotate(x, self.ctx.rotation_key(k, x.level))

    def cheb_basis(self, t, degree: int) -> list:
        """``[T_1(t), ..., T_d(t)]``; ``T_i`` costs ``ceil(log2 i)`` levels (desilofhe's own basis)."""
        # A product with a plaintext array leaves the ciphertext in NTT form, which the basis
        # refuses; intt converts it (and leaves a coefficient-form ciphertext as it is).
        return list(self.e.make_chebyshev_basis(self.e.intt(t), degree, self.rlk))


class NumpyOps:
    """The same operations on plain (slots,) float64 vectors: a slot-exact simulation."""

    def level(self, x):
        return None

    def mul_plain(self, x, v):
        return x * v

    def add_plain(self, x, v):
        return x + v

    def add_const(self, x, c):
        return x + c

    def mul(self, x, y):
        return x * y

    def square(self, x):
        return x * x

    def add(self, x, y):
        return x + y

    def sub(self, x, y):
        return x - y

    def neg(self, x):
        return -x

    def rotate(self, x, k):
        return np.roll(x, -k)  # left rotation, as desilofhe's rotate

    def cheb_basis(self, t, degree):
        return list(np.polynomial.chebyshev.chebvander(t, degree).T[1:])  # (d, slots)


# ---------------------------------------------------------------------------------------------
# Packing (pure numpy)


@dataclass(frozen=True)
class Placement:
    """Rows ``q0:q1`` of block ``block`` sit in ciphertext rows ``row:row + q1 - q0``."""

    block: int
    q0: int
    q1: int
    row: int


def plan_packing(block_rows: Sequence[int], rows_per_ct: int) -> list[list[Placement]]:
    """Assign blocks' rows to ciphertexts in order, each ciphertext filled to capacity.

    A block may be split between ciphertexts: every row carries its own mask, 1/n and V
    diagonals (``pack``), so nothing ties a block's rows together, and keeping blocks whole
    would leave rows empty (two 70-row blocks do not fit 128 rows; at W=128 on MRPC that
    wasted 40 % of the ciphertexts). Returns one list of placements per ciphertext.
    """
    cts: list[list[Placement]] = [[]]
    used = 0  # rows filled in the last ciphertext
    for b, q in enumerate(block_rows):
        q0 = 0
        while q0 < q:
            if used == rows_per_ct:
                cts.append([])
                used = 0
            take = min(q - q0, rows_per_ct - used)
            cts[-1].append(Placement(b, q0, q0 + take, used))
            q0, used = q0 + take, used + take
    return cts if cts[0] else []


@dataclass
class PackedCt:
    """One ciphertext's rows as (rows, W) arrays, and the public slot vectors the circuits use."""

    placements: list[Placement]
    scores: np.ndarray  # (R, W) float64, 0 in padding
    mask: np.ndarray  # (R, W) float64, 1 for a valid key
    values: np.ndarray  # (R, W, D) float64: V of each row's block, 0 in padding

    @property
    def width(self) -> int:
        return self.scores.shape[1]

    @property
    def inv_n(self) -> np.ndarray:
        """(R, W): 1/n of each row broadcast over its slots; 0 for empty rows."""
        n = self.mask.sum(axis=1, keepdims=True)
        return np.broadcast_to(np.divide(1.0, n, out=np.zeros_like(n), where=n > 0), self.mask.shape)

    @property
    def first(self) -> np.ndarray:
        """(R, W): 1 on the first slot of each non-empty row (where a row total is gathered)."""
        e0 = np.zeros_like(self.mask)
        e0[:, 0] = self.mask.any(axis=1)
        return e0

    @staticmethod
    def slots(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float64).ravel()  # (R, W) -> (R*W,)


def pack(blocks: Sequence[Block], placements: list[Placement], rows: int, width: int, dim: int) -> PackedCt:
    """Lay the placed rows of ``blocks`` into one ciphertext's (rows, W) arrays."""
    scores, mask = np.zeros((rows, width)), np.zeros((rows, width))
    values = np.zeros((rows, width, dim))
    for p in placements:
        s, valid, v = blocks[p.block]
        k, rs = s.shape[1], slice(p.row, p.row + p.q1 - p.q0)
        scores[rs, :k] = np.where(valid, s[p.q0 : p.q1], 0.0)  # masked scores never enter the circuit
        mask[rs, :k] = valid
        values[rs, :k, : v.shape[1]] = v
    return PackedCt(placements, scores, mask, values)


def unpack(rows: np.ndarray, placements: list[Placement], blocks: Sequence[Block], out: list[np.ndarray], ncols) -> None:
    """Copy decrypted (R, W) rows back into the per-block arrays ``out`` (first ``ncols(b)`` columns)."""
    for p in placements:
        out[p.block][p.q0 : p.q1] = rows[p.row : p.row + p.q1 - p.q0, : ncols(p.block)]


# ---------------------------------------------------------------------------------------------
# Circuit building blocks (any ops)


def rotsum(ops, x, width: int):
    """``log2 W`` left rotate-and-add steps: slot ``r*W`` ends with row r's total (others: garbage)."""
    step = 1
    while step < width:
        x = ops.add(x, ops.rotate(x, step))
        step *= 2
    return x


def broadcast(ops, x, width: int):
    """Copy slot ``r*W`` over the row's W slots (right rotations); other slots must be 0."""
    step = 1
    while step < width:
        x = ops.add(x, ops.rotate(x, -step))
        step *= 2
    return x


def row_total(ops, x, first_weighted: np.ndarray, width: int):
    """Each row's total times ``first_weighted[r*W]``, in all the row's slots. One level."""
    return broadcast(ops, ops.mul_plain(rotsum(ops, x, width), first_weighted), width)


def chebyshev_series(ops, t, coeffs: Sequence[float], weight: np.ndarray):
    """``weight * sum_i c_i T_i(t)``: the basis, then one plaintext product per term.

    ``weight`` (slots,) is folded into the coefficients (a plaintext product is needed for
    them anyway), so a per-slot factor costs no level. Depth ``ceil(log2 d) + 1``.
    """
    basis = ops.cheb_basis(t, len(coeffs) - 1)
    acc = None
    for c, ti in zip(coeffs[1:], basis):
        if c != 0.0:
            term = ops.mul_plain(ti, c * weight)
            acc = term if acc is None else ops.add(acc, term)
    return ops.add_plain(acc, coeffs[0] * weight)


def repeated_squaring(ops, x, times: int):
    for _ in range(times):
        x = ops.square(x)
    return x


def baby_step(width: int, dim: int) -> int:
    """The power-of-two baby step with the fewest rotations for diagonals ``-(D-1)..W-1``."""
    def cost(b):
        return b - 1 + (width - 1) // b - (-(dim - 1) // b)  # babies + giants other than 0
    return min((2**i for i in range(int(math.log2(width)) + 1)), key=cost)


def pv_diagonals(values: np.ndarray, baby: int) -> dict[int, list[tuple[int, np.ndarray]]]:
    """Plaintexts of P @ V, grouped by giant step: ``{g*B: [(b, rot_{-gB}(M_{gB+b})), ...]}``.

    ``values`` is (R, W, D); ``M_j[r*W + i] = V_r[i + j, i]`` where ``0 <= i + j < W``, ``i < D``.
    """
    rows, width, dim = values.shape
    plan: dict[int, list[tuple[int, np.ndarray]]] = {}
    for j in range(-(dim - 1), width):
        i = np.arange(max(0, -j), min(dim, width - j))
        diag = np.zeros((rows, width))
        diag[:, i] = values[:, i + j, i]
        if not diag.any():
            continue
        g, b = divmod(j, baby)  # j = g*B + b, 0 <= b < B
        plan.setdefault(g * baby, []).append((b, np.roll(diag.ravel(), g * baby)))
    return plan


def times_values(ops, p, values: np.ndarray):
    """P @ V by diagonals, baby-step giant-step; output in slots ``r*W + i``, ``i < D``. One level."""
    plan = pv_diagonals(values, baby_step(values.shape[1], values.shape[2]))
    babies = {b: ops.rotate(p, b) for b in sorted({b for terms in plan.values() for b, _ in terms})}
    out = None
    for shift, terms in plan.items():
        inner = None
        for b, diag in terms:
            term = ops.mul_plain(babies[b], diag)
            inner = term if inner is None else ops.add(inner, term)
        inner = ops.rotate(inner, shift)
        out = inner if out is None else ops.add(out, inner)
    return out


def _unit_map(poly: PolyExp) -> tuple[float, float]:
    """``(a, b)`` with ``to_unit(x) = a*x - b``."""
    return 2.0 / (poly.hi - poly.lo), (poly.lo + poly.hi) / (poly.hi - poly.lo)


def _poly_depth(poly: PolyExp) -> int:
    """Levels of ``chebyshev_series`` (basis + coefficient products) and the squarings."""
    return poly.depth


def _poly_np(poly: PolyExp, x: np.ndarray) -> np.ndarray:
    """The torch ``PolyExp`` itself, in float64 (the plaintext ``cgf_poly`` function)."""
    return poly(torch.as_tensor(x, dtype=torch.float64)).numpy()


# ---------------------------------------------------------------------------------------------
# Plaintext references. ``scores`` (R, K), ``mask`` (R, K) or (K,) bool; return probs (R, K).


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


def goldschmidt(total: np.ndarray, bound: tuple[float, float], iters: int) -> np.ndarray:
    """``1/total`` for ``total`` in ``bound``: ``ExactCircuit``'s steps, in float64.

    ``y0`` is the minimax-relative linear guess on the bound; then ``y <- y (1 + e)``,
    ``e <- e^2`` with ``e = 1 - total*y0``, so the relative error after ``m`` steps is
    ``e0^(2^m)``. Below the bound the error is larger; above it ``|e0|`` exceeds 1 once
    ``total > (1 + r) hi`` roughly, and ``e`` grows like ``e0^(2^m)``: under CKKS that
    overflows the modulus and spoils every slot of the ciphertext, not only that row.
    """
    s = total / bound[1]  # in [r, 1] inside the bound
    alpha, beta = _linear_guess(bound)
    y = alpha - beta * s
    e = 1.0 - s * y
    for _ in range(iters):
        y, e = y + y * e, e * e
    return y / bound[1]


def _linear_guess(bound: tuple[float, float]) -> tuple[float, float]:
    """``(alpha, beta)``: ``alpha - beta*s`` minimises max |1 - s*y0| on ``[r, 1]``, r = lo/hi."""
    r = bound[0] / bound[1]
    beta = 8.0 / ((1.0 + r) ** 2 + 4.0 * r)
    return beta * (1.0 + r), beta


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
        alpha, beta = _linear_guess(self.sum_bound)
        r = self.sum_bound[0] / self.sum_bound[1]
        e0 = 1.0 - r * (alpha - beta * r)  # the largest |e0| on the bound (equioscillation)
        return max(0, math.ceil(math.log2(math.log(self.tol) / math.log(e0))))

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
        alpha, beta = _linear_guess(self.sum_bound)
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


@dataclass
class FheReport:
    """One encrypted evaluation: sizes, levels, times and errors against the references."""

    circuit: str
    params: dict
    ring_size: int
    slots: int
    width: int
    blocks: int
    rows: int
    ciphertexts: int
    level_in: int
    level_probs: int
    level_out: int
    depth_planned: int
    keygen_s: float  # secret/public/relinearization keys (when the context was made)
    rotation_keygen_s: float  # rotation keys made during this evaluation (not in eval_s)
    rotation_keys: int  # held by the context
    key_bytes: int
    encrypt_s: float
    eval_s: float
    decrypt_s: float
    errors: dict = field(default_factory=dict)
    flagged: dict = field(default_factory=dict)

    @property
    def depth_used(self) -> int:
        return self.level_in - self.level_out

    @property
    def total_s(self) -> float:
        return self.encrypt_s + self.eval_s + self.decrypt_s

    def as_dict(self) -> dict:
        return {**asdict(self), "depth_used": self.depth_used, "total_s": self.total_s,
                "per_ct_s": self.eval_s / max(self.ciphertexts, 1), "per_row_s": self.eval_s / max(self.rows, 1)}

    def summary(self) -> str:
        d = self.as_dict()
        lines = [
            f"{self.circuit} {self.params}: ring 2^{int(math.log2(self.ring_size))} ({self.slots} slots), W={self.width}, "
            f"{self.rows} rows in {self.blocks} blocks -> {self.ciphertexts} ciphertexts",
            f"  depth used {self.depth_used} (planned {self.depth_planned}; levels {self.level_in} -> probs "
            f"{self.level_probs} -> out {self.level_out})",
            f"  keygen {self.keygen_s:.1f} s + rotation keys {self.rotation_keygen_s:.1f} s ({self.rotation_keys} keys, "
            f"{self.key_bytes / 2**30:.2f} GiB of keys)",
            f"  time {self.total_s:.1f} s (encrypt {self.encrypt_s:.1f}, eval {self.eval_s:.1f}, decrypt {self.decrypt_s:.1f}); "
            f"eval {d['per_ct_s']:.2f} s/ciphertext, {1e3 * d['per_row_s']:.1f} ms/row",
        ]
        for ref, e in self.errors.items():
            lines.append(f"  vs {ref}: probs max {e['probs_max']:.2e} mean {e['probs_mean']:.2e} | "
                         f"outputs max {e['out_max']:.2e} mean {e['out_mean']:.2e} | masked max {e['masked_max']:.1e}")
        if self.flagged:
            lines.append(f"  out of bounds: {self.flagged}")
        return "\n".join(lines)


def check_blocks(blocks: Sequence[Block], width: int) -> list[Block]:
    """Validate shapes and cast to float64 / bool; every row needs a valid key and K <= W."""
    if width & (width - 1) or width < 2:
        raise CgfBertError(f"the row width must be a power of two >= 2, got {width}")
    out = []
    for i, (s, valid, v) in enumerate(blocks):
        s, valid, v = np.asarray(s, np.float64), np.asarray(valid, bool), np.asarray(v, np.float64)
        if s.ndim != 2 or valid.shape != (s.shape[1],) or v.ndim != 2 or v.shape[0] != s.shape[1]:
            raise CgfBertError(f"block {i}: need scores (Q, K), valid (K,), V (K, D); got {s.shape}, {valid.shape}, {v.shape}")
        if s.shape[1] > width or v.shape[1] > width or not valid.any():
            raise CgfBertError(f"block {i}: needs 1 <= valid keys, K <= W and D <= W (K={s.shape[1]}, D={v.shape[1]}, W={width})")
        out.append((s, valid, v))
    return out


def _run(ops, encrypt, decrypt, blocks, circuit, width, slots, progress, on_ct=None):
    """Pack, encrypt, evaluate and decrypt every ciphertext; per-block outputs and probabilities."""
    dim = max(v.shape[1] for _, _, v in blocks)
    plan = plan_packing([s.shape[0] for s, _, _ in blocks], slots // width)
    probs = [np.zeros(s.shape) for s, _, _ in blocks]  # (Q, K) each
    outs = [np.zeros((s.shape[0], v.shape[1])) for s, _, v in blocks]  # (Q, D) each
    times = np.zeros(3)  # encrypt, eval, decrypt
    for placements in tqdm(plan, desc=f"encrypted {circuit.name}", unit="ct", disable=not progress):
        pc = pack(blocks, placements, slots // width, width, dim)
        t0 = time.perf_counter()
        s = encrypt(PackedCt.slots(pc.scores))
        t1 = time.perf_counter()
        p = circuit.probs(ops, s, pc)  # holds prob_scale * p
        o = times_values(ops, p, pc.values / circuit.prob_scale)
        t2 = time.perf_counter()
        p_rows, o_rows = decrypt(p).reshape(-1, width) / circuit.prob_scale, decrypt(o).reshape(-1, width)  # (R, W)
        times += (t1 - t0, t2 - t1, time.perf_counter() - t2)
        if on_ct is not None:
            on_ct(s, p, o)
        unpack(p_rows, placements, blocks, probs, lambda b: blocks[b][0].shape[1])
        unpack(o_rows, placements, blocks, outs, lambda b: blocks[b][2].shape[1])
    return outs, probs, len(plan), times


def simulate_attention(blocks: Sequence[Block], circuit, *, width: int = 128, slots: int = 16384):
    """The circuit on plain numpy slot vectors (no encryption): (outputs, probabilities) per block."""
    blocks = check_blocks(blocks, width)
    outs, probs, _, _ = _run(NumpyOps(), np.asarray, np.asarray, blocks, circuit, width, slots, progress=False)
    return outs, probs


def encrypted_attention(blocks: Sequence[Block], circuit=None, *, ctx: FheContext | None = None, width: int = 128,
                        progress: bool = True, thread_count: int | None = None):
    """Encrypted softmax and P @ V of one layer: ``(outputs, probabilities, report)``.

    ``blocks``: one ``(scores (Q, K), valid (K,), V (K, D))`` per (example, head); rows of a
    block share its V. Returns decrypted outputs (Q, D) and probabilities (Q, K) per block,
    and an ``FheReport`` with levels, times, and errors against the plaintext references.
    ``circuit`` defaults to ``CgfCircuit()``; ``ctx`` to the smallest context that holds it.
    """
    circuit = circuit or CgfCircuit()
    blocks = check_blocks(blocks, width)
    ctx = ctx or FheContext.for_circuits(circuit, thread_count=thread_count)
    if ctx.max_level < circuit.depth:
        raise CgfBertError(f"circuit depth {circuit.depth} > context max level {ctx.max_level} (no bootstrapping)")
    if ctx.slots < width:
        raise CgfBertError(f"row width {width} > {ctx.slots} slots")
    levels = {}
    keygen0 = ctx.rotation_keygen_s
    outs, probs, n_ct, times = _run(FheOps(ctx), ctx.encrypt, ctx.decrypt, blocks, circuit, width, ctx.slots, progress,
                                    on_ct=lambda s, p, o: levels.update(i=s.level, p=p.level, o=o.level))
    report = FheReport(
        circuit=circuit.name, params=_params(circuit), ring_size=ctx.ring_size, slots=ctx.slots, width=width,
        blocks=len(blocks), rows=sum(s.shape[0] for s, _, _ in blocks), ciphertexts=n_ct,
        level_in=levels["i"], level_probs=levels["p"], level_out=levels["o"], depth_planned=circuit.depth,
        keygen_s=ctx.keygen_s, rotation_keygen_s=ctx.rotation_keygen_s - keygen0,
        rotation_keys=ctx.rotation_key_count, key_bytes=ctx.key_bytes,
        encrypt_s=times[0], eval_s=times[1] - (ctx.rotation_keygen_s - keygen0), decrypt_s=times[2],
    )
    report.errors, report.flagged = attention_errors(blocks, outs, probs, circuit)
    return outs, probs, report


def _params(circuit) -> dict:
    p = circuit.poly
    d = {"poly": (p.degree, p.lo, p.hi, p.squarings)}
    if isinstance(circuit, CgfCircuit):
        d["coeff"] = circuit.coeff
    else:
        d.update(sum_bound=circuit.sum_bound, iters=circuit.recip_iters)
    return d


def _stats(dp: list[np.ndarray], do: list[np.ndarray], valid: list[np.ndarray]) -> dict:
    """Max and mean |error| of probabilities (valid keys), outputs, and max |p| on masked keys."""
    pv = np.concatenate([d[:, m].ravel() for d, m in zip(dp, valid)] or [np.zeros(0)])
    pm = np.concatenate([d[:, ~m].ravel() for d, m in zip(dp, valid)] or [np.zeros(0)])
    ov = np.concatenate([d.ravel() for d in do] or [np.zeros(0)])
    f = lambda a, op: float(op(a)) if a.size else 0.0  # noqa: E731
    return {"probs_max": f(pv, np.max), "probs_mean": f(pv, np.mean), "out_max": f(ov, np.max),
            "out_mean": f(ov, np.mean), "masked_max": f(pm, np.max)}


def attention_errors(blocks: Sequence[Block], outs, probs, circuit) -> tuple[dict, dict]:
    """Errors of (outputs, probabilities) per reference, and on the rows outside the circuit's bounds.

    ``errors[ref]`` has ``probs_max/probs_mean`` (valid keys), ``out_max/out_mean`` and
    ``masked_max`` (largest |p| on a masked key). ``flagged`` counts the rows the plaintext
    reference puts outside the bounds (polynomial interval; for the exact circuit also the
    row-sum bound) and the error on them against ``exact``: of the decrypted result and of the
    plaintext circuit (the error the bound violation itself causes), so it is never hidden.
    """
    refs = [circuit.references(s, m) for s, m, _ in blocks]  # per block {name: (Q, K)}
    valid = [m for _, m, _ in blocks]
    errors = {}
    for name in refs[0]:
        dp = [np.abs(p - r[name]) for p, r in zip(probs, refs)]
        do = [np.abs(o - r[name] @ v) for o, r, (_, _, v) in zip(outs, refs, blocks)]
        errors[name] = _stats(dp, do, valid)
    flags = [circuit.flagged_rows(s, m) for s, m, _ in blocks]
    rows = [f for f, _ in flags]
    flagged = {"rows": int(sum(r.sum() for r in rows))}
    for _, counts in flags:
        for k, c in counts.items():
            flagged[k] = flagged.get(k, 0) + c
    if flagged["rows"]:
        own = [r[next(iter(r))] for r in refs]  # references() lists the plaintext circuit first
        others = [~f for f in rows]  # an overflow in a flagged row would spoil its whole ciphertext
        for label, got, sel in (("encrypted", probs, rows), ("plaintext_circuit", own, rows),
                                ("encrypted_other_rows", probs, others)):
            err = [np.abs(g - r["exact"])[f][:, m] for g, r, f, m in zip(got, refs, sel, valid)]
            flagged[f"{label}_vs_exact_max"] = float(max((e.max() for e in err if e.size), default=0.0))
    return errors, flagged
