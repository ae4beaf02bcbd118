"""Slot operations on ciphertexts or on numpy slot vectors, and the circuit building blocks written on them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.approx.reciprocal import linear_guess

if TYPE_CHECKING:  # context.py imports PV_DEPTH from here
    from cgf_bert.fhe.context import FheContext

PV_DEPTH = 1  # levels of P @ V (``times_values``: one plaintext product per diagonal), after the softmax's own


def _naf(k: int) -> list[int]:
    """The non-adjacent form of ``k >= 0``: signed powers of two summing to ``k``, the fewest of any such sum."""
    digits, i = [], 0
    while k:
        if k & 1:
            d = 2 - (k & 3)  # +1 or -1: what leaves the rest divisible by 4
            k -= d
            digits.append(d << i)
        k >>= 1
        i += 1
    return digits


def signed_steps(k: int, slots: int, both_ways: bool = True) -> tuple[int, int]:
    """A left rotation by ``k`` as ``(left, right)``: a left rotation by ``left``, then a right one by ``right``,
    each made by desilofhe's general keys from one key switch per set bit (the rotation key's left and the
    roll key's right power-of-two steps). Left steps alone (``both_ways=False``, the rotation key only):
    ``(k mod slots, 0)``, so a rotation by -1 is 15 key switches at 2^15 slots (measured here: 4.6 s against
    0.38 s for +1). Both ways: the signed binary digits of the fewest key switches, the non-adjacent form of
    ``k mod slots`` less a digit of ``slots`` itself, which rotates nothing (a brute force agrees)."""
    k %= slots
    if not both_ways:
        return k, 0
    digits = [d for d in _naf(k) if d % slots]
    return sum(d for d in digits if d > 0) % slots, sum(-d for d in digits if d < 0) % slots


def keyswitches(k: int, slots: int, both_ways: bool = True) -> int:
    """Key switches of a left rotation by ``k`` with desilofhe's general keys (``signed_steps``)."""
    left, right = signed_steps(k, slots, both_ways)
    return bin(left).count("1") + bin(right).count("1")


def general_rotate(engine, x, k: int, rotation_key, roll_key=None):
    """Left by ``k`` on desilofhe's general keys: the rotation key's left steps, and with a roll key its right
    steps (``signed_steps``: a rotation by -1 is then one key switch, not 15)."""
    left, right = signed_steps(k, int(engine.slot_count), roll_key is not None)
    if left:
        x = engine.rotate(x, rotation_key, left)
    if right:
        x = engine.roll(x, roll_key, right)
    return x


def plain_product(engine, x, v: np.ndarray):
    """``x * v`` for a public slot vector ``v``: encoded as desilofhe's light plaintext (its coefficients
    alone, expanded at the product) rather than passed as an array, which encodes it in full first: the
    same result, with less encoding (``experiments.ckks_costs`` times both: ``mul_plain``, ``mul_plain_array``)."""
    return engine.multiply(x, engine.encode_to_light_plaintext(np.ascontiguousarray(v, dtype=np.float64), x.level))


class FheOps:
    """Slot operations on desilofhe ciphertexts (rescaling and level alignment are automatic)."""

    def __init__(self, ctx: FheContext):
        self.ctx, self.e, self.rlk = ctx, ctx.engine, ctx.relin_key
        self.slots = ctx.slots
        self.keygen_s = ctx.keygen_s  # the context's keys (its rotation keys are made on first use); a bootstrapping backend sets its own

    @property
    def key_bytes(self) -> int:
        return self.ctx.key_bytes

    def level(self, x) -> int:
        return int(x.level)

    def write(self, x, path) -> None:
        """The ciphertext to a file (``read`` takes it back, on any engine of the same parameters)."""
        self.e.write_ciphertext(x, str(path))

    def read(self, path):
        return self.e.read_ciphertext(str(path))

    def mul_plain(self, x, v: np.ndarray):  # one level
        return plain_product(self.e, x, v)

    def level_down(self, x, level: int):
        """``x`` with its moduli above ``level`` dropped: the same values, cheaper products and rotations."""
        return x if level >= x.level else self.e.level_down(x, level)

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

    def keyswitches(self, k: int) -> int:
        return 1  # a fixed key for every step

    def cheb_basis(self, t, degree: int) -> list:
        """``[T_1(t), ..., T_d(t)]``; ``T_i`` costs ``ceil(log2 i)`` levels (desilofhe's own basis)."""
        # A plaintext product can leave the ciphertext in NTT form, which the basis
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


@dataclass(frozen=True)
class Levelled:
    """A simulated ciphertext: its slot values and the level CKKS would have left it at.

    ``paths``: {origin: level}, where an origin is a ciphertext the circuit made at the top of its levels (the
    encrypted input, a bootstrap's output) and the level is the one this value would have if only that origin's
    levels counted. The value's level is the least of them, and dropping an origin by d levels drops its path
    by d: what ``Refresher`` plans its level drops from (an empty dict: not tracked)."""

    slots: np.ndarray  # (slots,) float64
    level: int
    paths: dict = field(default_factory=dict, compare=False)


class LevelledNumpyOps:
    """``NumpyOps`` on ``Levelled`` values, consuming levels as CKKS (desilofhe) does.

    A product (with a plaintext or a ciphertext) or a square lands one level below its deeper
    operand; additions align to the lower level; constants and rotations are free; the Chebyshev
    basis puts ``T_i`` ``ceil(log2 i)`` levels below its argument. A result below level 0 is an
    error, as it is under CKKS without bootstrapping. So a circuit's depth is measured, not trusted.
    Each result carries its operands' ``paths`` (merged by the lower, less the levels it used).
    """

    def __init__(self):
        self.np = NumpyOps()

    @staticmethod
    def encrypt(slots: np.ndarray, level: int) -> Levelled:
        return Levelled(np.asarray(slots, dtype=np.float64), level)

    @staticmethod
    def decrypt(x: Levelled) -> np.ndarray:
        return x.slots

    def level(self, x: Levelled) -> int:
        return x.level

    @staticmethod
    def _of(slots: np.ndarray, operands: tuple, used: int) -> Levelled:
        """The result of ``operands`` that used ``used`` levels below the lowest of them."""
        level = min(x.level for x in operands) - used
        if level < 0:
            raise CgfBertError("the circuit needs more levels than the simulated ciphertext had (no bootstrapping)")
        paths: dict = {}
        for x in operands:
            for origin, p in x.paths.items():
                paths[origin] = min(paths.get(origin, p), p)
        return Levelled(slots, level, {o: p - used for o, p in paths.items()})

    def level_down(self, x, level: int):
        # every path lowered by the drop: exact for a new origin (``Refresher.origin``), a lower bound on the
        # level the value keeps under any origin's drop otherwise (so a plan from it never over-drops)
        drop = max(x.level - level, 0)
        return Levelled(x.slots, x.level - drop, {o: p - drop for o, p in x.paths.items()})

    def mul_plain(self, x, v):
        return self._of(self.np.mul_plain(x.slots, v), (x,), 1)

    def add_plain(self, x, v):
        return self._of(self.np.add_plain(x.slots, v), (x,), 0)

    def add_const(self, x, c):
        return self._of(self.np.add_const(x.slots, c), (x,), 0)

    def mul(self, x, y):
        return self._of(self.np.mul(x.slots, y.slots), (x, y), 1)

    def square(self, x):
        return self._of(self.np.square(x.slots), (x,), 1)

    def add(self, x, y):
        return self._of(self.np.add(x.slots, y.slots), (x, y), 0)

    def sub(self, x, y):
        return self._of(self.np.sub(x.slots, y.slots), (x, y), 0)

    def neg(self, x):
        return self._of(self.np.neg(x.slots), (x,), 0)

    def rotate(self, x, k):
        return self._of(self.np.rotate(x.slots, k), (x,), 0)

    def cheb_basis(self, t, degree):
        basis = self.np.cheb_basis(t.slots, degree)  # T_1 .. T_d
        return [self._of(ti, (t,), (i - 1).bit_length()) for i, ti in enumerate(basis, start=1)]  # ceil(log2 i)


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


def _as_is(x, need: int, site: str, at_most: float | None = None):
    return x


def reciprocal(ops, total, first: np.ndarray, bound: tuple[float, float], iters: int, gain: float,
               boot=_as_is, site: str = ""):
    """``y ~ gain / total`` on the slots ``first`` marks (0 elsewhere), by a linear guess on ``bound``
    and ``iters`` Goldschmidt steps (``approx.reciprocal.goldschmidt``'s arithmetic, ``gain`` a public
    factor riding on the guess's plaintexts). ``boot(x, need, site)`` refreshes a value before a step
    that needs ``need`` levels (the encoder's ``Refresher``; by default nothing is refreshed).

    ``y0 = (gain/hi) (alpha - beta S')`` and ``e0 = 1 - alpha S' + beta S'^2`` (``S' = total/hi``) are
    both taken from ``total`` directly, the square written as one of ``sqrt(beta) S'``: the same
    depth as ``1 - S' * y0`` and about ten times less error (no product of two noisy ciphertexts
    before the squarings amplify it).
    """
    alpha, beta = linear_guess(bound)
    hi = bound[1]
    total = boot(total, 2, f"{site} row total")
    y = ops.add_plain(ops.mul_plain(total, -beta * gain / hi**2 * first), alpha * gain / hi * first)
    if iters:  # the linear guess alone needs no e0
        e = ops.add(ops.add_plain(ops.mul_plain(total, -alpha / hi * first), first),
                    ops.square(ops.mul_plain(total, math.sqrt(beta) / hi * first)))
        for it in range(iters):
            # |e| <= |e0| < 1 while the sum is inside the bound (the guess equioscillates): a bound no calibration needs
            y, e = boot(y, 1, f"{site} reciprocal y"), boot(e, 2, f"{site} reciprocal e", at_most=1.0)
            y = ops.add(y, ops.mul(y, e))
            if it + 1 < iters:
                e = ops.square(e)
    return boot(y, 1, f"{site} reciprocal")


def times_int(ops, x, k: int):
    """``k * x`` for an integer ``k >= 1`` by doubling and adding: no level (a constant product would take one)."""
    out, power = None, x
    while k:
        if k & 1:
            out = power if out is None else ops.add(out, power)
        k >>= 1
        if k:
            power = ops.add(power, power)
    return out


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


def bsgs(ops, x, groups, babies: set[int]):
    """``sum_g rot_g(sum_b M_{g,b} * rot_b(x))``: the baby rotations of ``x`` once each, then per giant
    step ``g`` its plaintext products and one rotation. ``groups`` yields ``(g, [(b, M), ...])``
    (a generator may make each group's plaintexts as it is reached). One level."""
    rotated = {b: ops.rotate(x, b) for b in sorted(babies)}
    out = None
    for shift, terms in groups:
        inner = None
        for b, plain in terms:
            term = ops.mul_plain(rotated[b], plain)
            inner = term if inner is None else ops.add(inner, term)
        inner = ops.rotate(inner, shift)
        out = inner if out is None else ops.add(out, inner)
    return out


def times_values(ops, p, values: np.ndarray):
    """P @ V by diagonals, baby-step giant-step; output in slots ``r*W + i``, ``i < D``. ``PV_DEPTH`` levels."""
    plan = pv_diagonals(values, baby_step(values.shape[1], values.shape[2]))
    return bsgs(ops, p, plan.items(), {b for terms in plan.values() for b, _ in terms})
