"""The whole student as one CKKS circuit: every encoder layer, the pooler and the classifier, on slot operations.

Protocol. The client tokenizes, embeds (the embedding tables and their LayerNorm are public: they
run in the clear at the client) and encrypts the embedding output; the server holds every other
weight in plaintext, evaluates the circuit below on the ciphertext and returns the encrypted
logits; only the client decrypts. Every non-linear op is the polynomial the checkpoint's spec
declares (``cgf_poly`` or ``exact_poly``, ``gelu_poly``/``quad``, ``ln_poly``/``ln_affine``,
``tanh_poly``): the plaintext reference is the same model in torch with those specs.

Layout (``TokenLayout``): token-major rows. Row ``t`` of a ciphertext holds token ``t``'s features
in slots ``[t*W, t*W + d)`` (``W`` a power of two >= hidden, the rest 0), ``rows = slots / W``
tokens per ciphertext (64 at desilofhe's 32,768 bootstrappable slots and W = 512). A vector wider
than W (the feed-forward's 1,536) is several ciphertexts, one W-wide block of columns each.

- Linear layers (plaintext weights): each block pair by its diagonals, baby-step giant-step
  (``ops.times_values`` with one matrix shared by every row; one level). The affine maps of the
  polynomials that follow (onto Chebyshev's [-1, 1]) and the attention's 1/sqrt(d_head) fold into
  the weights: no level.
- Q K^T, both encrypted, by key offsets: ``Q * rot(K, r*W)`` summed over each head's d_head slots
  leaves head h's score of query t against key ``(t + r) mod rows`` in slot ``t*W + h*d_head``, and
  the head's other d_head - 1 slots unused. So the offsets move into lanes (``_lanes``): the k-th
  offset, masked, to slot ``k mod d_head`` of each head in lane ciphertext ``k // d_head`` (a rotation
  and the mask's level). One level for the product, one for the lanes.
- The softmax runs elementwise on the lane ciphertexts with its spec's polynomial exp (one or two a
  layer, not one per offset). A row's statistics (mean, variance, the exact softmax's total) are
  totals over a head's lanes: ``log2 d_head`` rotations, a mask (one level) and the broadcast back.
- P V, V encrypted: each offset's probabilities rotated back to its heads' first slots and masked
  (one level), then ``sum_r bcast(p_r) * rot(V, r*W)``, ``bcast`` copying each head's probability
  over its d_head slots (rotations). One level.
- LayerNorm: row totals by rotations (``log2 W``), a plaintext 1/d on the first slot of each row
  and its broadcast; the variance as ``E[x^2] - mean^2``; then the kind's own work.

Bootstrapping (``Refresher``): before each step a ciphertext whose level is below what the step
consumes is bootstrapped, scaled into [-1, 1] by a public bound first (bounds calibrated on
training examples, ``pipeline.calibrate``). Each stage's levels, bootstraps and operations are counted
(``StageLog``); on ``LevelledNumpyOps`` the same circuit runs on numpy slot vectors, so the plan
(where the bootstraps fall, how many) and the result are known before anything is encrypted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.chebyshev import ChebyshevFit
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.softmax import normalisation
from cgf_bert.fhe.accounting import StageLog
from cgf_bert.fhe.ops import (
    baby_step,
    broadcast,
    bsgs,
    chebyshev_series,
    reciprocal,
    repeated_squaring,
    rotsum,
    row_total,
)
from cgf_bert.fhe.references import _unit_map

# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class TokenLayout:
    """``rows`` tokens of ``width`` slots per ciphertext (width a power of two)."""

    slots: int
    width: int

    def __post_init__(self):
        if self.width & (self.width - 1) or self.slots % self.width:
            raise CgfBertError(f"a token row must be a power-of-two width dividing the slots, got {self.width} of {self.slots}")

    @classmethod
    def for_model(cls, slots: int, hidden: int) -> TokenLayout:
        return cls(slots, 1 << (hidden - 1).bit_length())

    @property
    def rows(self) -> int:
        return self.slots // self.width

    def blocks(self, dim: int) -> int:
        return -(-dim // self.width)

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """(T, dim) -> one (slots,) vector per W-wide block of columns (rows past T and columns past dim 0)."""
        t, dim = x.shape
        if t > self.rows:
            raise CgfBertError(f"{t} tokens do not fit a ciphertext of {self.rows} rows of {self.width} slots")
        out = []
        for b in range(self.blocks(dim)):
            v = np.zeros((self.rows, self.width))
            cols = x[:, b * self.width:(b + 1) * self.width]
            v[:t, :cols.shape[1]] = cols
            out.append(v.ravel())
        return out

    def unpack(self, vs: list[np.ndarray], t: int, dim: int) -> np.ndarray:
        return np.concatenate([v.reshape(self.rows, self.width) for v in vs], axis=1)[:t, :dim]

    def tile(self, row: np.ndarray) -> np.ndarray:
        """A (width,) pattern repeated on every row."""
        return np.tile(row, self.rows)


def row_matmul(ops, x, matrix: np.ndarray, lay: TokenLayout, rows: np.ndarray):
    """Every row of ``x`` times one plaintext ``matrix`` (in <= W, out <= W): ``y[t, i] = rows[t] *
    sum_k x[t, k] M[k, i]`` by the diagonals ``j = k - i`` (zero where ``k`` leaves the row, so no
    row reads its neighbour), baby-step giant-step as ``ops.times_values``. One level."""
    W = lay.width
    full = np.zeros((W, W))
    full[:matrix.shape[0], :matrix.shape[1]] = matrix
    dim = matrix.shape[1]
    baby = baby_step(W, dim)
    plan: dict[int, list] = {}
    for j in range(-(dim - 1), W):
        i = np.arange(max(0, -j), min(dim, W - j))
        pattern = np.zeros(W)
        pattern[i] = full[i + j, i]
        if pattern.any():
            g, b = divmod(j, baby)
            plan.setdefault(g * baby, []).append((b, pattern))
    groups = ((shift, [(b, np.roll(np.outer(rows, pattern).ravel(), shift)) for b, pattern in terms]) for shift, terms in plan.items())
    return bsgs(ops, x, groups, {b for terms in plan.values() for b, _ in terms})  # each group's plaintexts made when reached


# --------------------------------------------------------------------------- the model's weights


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


@dataclass(frozen=True)
class Weights:
    """A BertMRPC's plaintext weights, as (in, out) matrices."""

    layers: list
    pooler: tuple
    classifier: tuple
    heads: int
    hidden: int
    eps: float

    @classmethod
    def of(cls, model) -> Weights:
        bert = model.bert
        def lin(m):
            return as_numpy(m.weight).T, as_numpy(m.bias)

        layers = []
        for layer in bert.encoder.layer:
            a = layer.attention
            layers.append(dict(q=lin(a.self.query), k=lin(a.self.key), v=lin(a.self.value), o=lin(a.output.dense),
                               ln1=(as_numpy(a.output.LayerNorm.weight), as_numpy(a.output.LayerNorm.bias)),
                               up=lin(layer.intermediate.dense), down=lin(layer.output.dense),
                               ln2=(as_numpy(layer.output.LayerNorm.weight), as_numpy(layer.output.LayerNorm.bias))))
        return cls(layers, lin(bert.pooler.dense), lin(model.classifier), bert.config.num_attention_heads,
                   bert.config.hidden_size, float(bert.config.layer_norm_eps))


# --------------------------------------------------------------------------- the circuit


EXP_SLOT_LIMIT = 2.0  # |t| the exp's basis may see in slots its weights discard (T_8(2) = 1.9e4: safe in CKKS)
QUAD_SCALE = math.sqrt(0.125)  # quad's input scaled so that 0.125 x^2 is a bare square
PROBS_NEED = 2  # P V on the probabilities: the offset's mask, then the product with V


def _unit(lo: float, hi: float) -> tuple[float, float]:
    """``(A, B)``: ``t = A*x + B`` maps [lo, hi] onto [-1, 1]."""
    return 2.0 / (hi - lo), -(lo + hi) / (hi - lo)


class EncoderCircuit:
    """The student's forward pass on one example's packed embedding output (see the module doc)."""

    def __init__(self, weights: Weights, approx: Approximations, layout: TokenLayout):
        for op, spec in approx.specs().items():
            for i, s in enumerate(spec.per_layer(len(weights.layers))):
                if s.depth is None:
                    raise CgfBertError(f"{op} {s.label()} (layer {i}) is not a polynomial: no CKKS circuit evaluates it "
                                       "(replace it by its polynomial kind, e.g. --softmax cgf_poly, --gelu gelu_poly)")
        self.w, self.approx, self.lay = weights, approx, layout
        if weights.hidden > layout.width:
            raise CgfBertError(f"hidden size {weights.hidden} is wider than a token row ({layout.width} slots)")
        self.dh = weights.hidden // weights.heads
        self._plans: dict = {}

    # -- building blocks

    def linear(self, ops, xs: list, wb: tuple, scale: float = 1.0, shift: float = 0.0, row_scale=None) -> list:
        """``(x W + b) * scale * row_scale[t] + shift`` on W-wide blocks, rows past the examples' tokens set
        to 0 (the row mask and ``row_scale``, one factor per row, ride on the diagonals and the bias: no
        level). One level."""
        w, b = wb
        lay, W = self.lay, self.lay.width
        used = self._used_rows()
        rows = used if row_scale is None else used * row_scale
        out = []
        for o in range(lay.blocks(w.shape[1])):
            acc = None
            cols = slice(o * W, (o + 1) * W)
            for i, x in enumerate(xs):
                block = w[i * W:(i + 1) * W, cols] * scale
                if block.any():
                    term = row_matmul(ops, x, block, lay, rows)
                    acc = term if acc is None else ops.add(acc, term)
            bias, moved = np.zeros(W), np.zeros(W)
            bo = b[cols] * scale
            bias[:len(bo)], moved[:len(bo)] = bo, shift
            out.append(ops.add_plain(acc, (np.outer(rows, bias) + np.outer(used, moved)).ravel()))
        return out

    def row_mean(self, ops, x, dim: int, factor: float = 1.0):
        """``factor * mean`` over each row's ``dim`` features, in every slot of the row. One level."""
        first = np.zeros(self.lay.width)
        first[0] = factor / dim
        return broadcast(ops, ops.mul_plain(rotsum(ops, x, self.lay.width), self.lay.tile(first)), self.lay.width)

    def layernorm(self, ops, boot, x, spec, wb: tuple, site: str):
        """The spec's LayerNorm over ``hidden`` features of each row (``ln_poly`` or ``ln_affine``)."""
        used = self._per_slot(self._used_rows())
        # gamma and beta ride on the row mask, so rows past the tokens leave every LayerNorm as 0 and
        # enter the next one as the pad alone: a variance inside the fit's interval, whatever it is
        gamma, beta = (self.lay.tile(np.pad(v, (0, self.lay.width - len(v)))) * used for v in wb)
        d, p = self.w.hidden, spec.values
        pad_var = math.sqrt(p["var_lo"] * p["var_hi"]) if spec.name == "ln_poly" else 1.0
        x = ops.add_plain(boot(x, 2, f"{site} input"), self._pad * math.sqrt(pad_var))  # not variance 0, far below var_lo
        mean = self.row_mean(ops, x, d)
        if spec.name == "ln_affine":  # (x - mean) * gamma / sqrt(constant + eps): two levels
            var = p["var_attention"] if site.endswith("ln1") else p["var_output"]
            return ops.add_plain(ops.mul_plain(ops.sub(x, mean), gamma * (var + self.w.eps) ** -0.5), beta)
        cw = ops.mul_plain(ops.sub(x, mean), gamma)  # (x - mean) * gamma, beside the variance
        fit = ChebyshevFit("rsqrt", p["degree"], p["var_lo"], p["var_hi"])
        A, B = _unit(fit.lo, fit.hi)
        sq = ops.square(x)

        def scaled_var(f: float):  # f * (E[x^2] - mean^2) at 2 levels below x
            return ops.sub(self.row_mean(ops, sq, d, f), ops.square(self.row_mean(ops, x, d, math.sqrt(f))))

        t = ops.add_const(scaled_var(A), A * self.w.eps + B)  # the variance on [-1, 1]
        half_v = ops.add_const(scaled_var(0.5), 0.5 * self.w.eps)  # v / 2, for Newton
        t = boot(t, fit.depth, f"{site} rsqrt input")
        y = chebyshev_series(ops, t, fit.coeffs, np.ones(self.lay.slots))
        for _ in range(p["newton"]):  # y <- y (1.5 - (v/2) y^2): three levels
            y, half_v = boot(y, 3, f"{site} newton y"), boot(half_v, 3, f"{site} newton v")
            y = ops.mul(y, ops.add_const(ops.neg(ops.mul(ops.mul(half_v, y), y)), 1.5))
        y, cw = boot(y, 1, f"{site} rsqrt"), boot(cw, 1, f"{site} centred")
        return ops.add_plain(ops.mul(cw, y), beta)

    def activation(self, ops, boot, t, spec, site: str):
        """GELU or the pooler's tanh on an input already mapped onto the fit's [-1, 1] (or raw for quad)."""
        if spec.name == "quad":  # t = x / sqrt(8), folded into the layer before: 0.125 x^2 = t^2, one level
            t = boot(t, 1, site)
            return ops.add_plain(ops.add(ops.square(t), ops.mul_plain(t, np.full(self.lay.slots, 0.25 / QUAD_SCALE))), np.full(self.lay.slots, 0.5))
        fit = self._fit(spec)
        t = boot(t, fit.depth, site)
        return chebyshev_series(ops, t, fit.coeffs, np.ones(self.lay.slots))

    @staticmethod
    def _fit(spec) -> ChebyshevFit:
        fn = {"gelu_poly": "gelu", "tanh_poly": "tanh"}[spec.name]
        return ChebyshevFit(fn, spec.values["degree"], spec.values["lo"], spec.values["hi"])

    def _activation_depth(self, spec) -> int:
        return 1 if spec.name == "quad" else self._fit(spec).depth

    def _map_of(self, spec) -> tuple[float, float]:
        """The affine map folded into the linear layer before an activation: onto the fit's [-1, 1]."""
        if spec.name == "quad":
            return QUAD_SCALE, 0.0
        fit = self._fit(spec)
        return _unit(fit.lo, fit.hi)

    # -- attention

    def _offset_masks(self) -> dict[int, np.ndarray]:
        """{offset r: slot mask}: 1 at slot ``t*W + h*d_head`` where query t and key (t + r) mod rows are
        tokens of the same example (packed examples never attend to each other)."""
        lay, rows, eid = self.lay, self.lay.rows, self._eid
        masks = {}
        t = np.flatnonzero(eid >= 0)
        for r in range(rows):
            ok = t[eid[(t + r) % rows] == eid[t]]
            if not len(ok):
                continue
            m = np.zeros((rows, lay.width))
            m[np.ix_(ok, np.arange(self.w.heads) * self.dh)] = 1.0
            masks[r] = m.ravel()
        return masks

    def _lanes(self, masks: dict) -> dict[int, tuple[int, int]]:
        """{offset r: (group g, lane j)}: the k-th offset's scores move to lane ``j = k mod d_head`` of
        each head's d_head slots in lane ciphertext ``g = k // d_head``. A head's score of an offset sits
        in one slot of d_head (``rotsum``), so d_head offsets share a ciphertext: 2 lane ciphertexts carry
        64 offsets at d_head = 32, where the softmax ran on 64 ciphertexts with 1 slot in 43 a score."""
        return {r: divmod(k, self.dh) for k, r in enumerate(sorted(masks))}

    def attention(self, ops, boot, x, i: int, log: StageLog):
        lw, W, sm = self.w.layers[i], self.lay.width, self.approx.softmax.for_layer(i)
        poly = PolyExp(sm.values["degree"], sm.values["exp_lo"], sm.values["exp_hi"], sm.values["squarings"])
        need = self._score_need(sm)
        log.current = f"layer {i} / Q K V"
        x = boot(x, self._input_need(sm, poly, need, boot.usable), f"layer {i} input")
        (q,) = self.linear(ops, [x], lw["q"], scale=1.0 / math.sqrt(self.dh))
        (k,) = self.linear(ops, [x], lw["k"])
        (v,) = self.linear(ops, [x], lw["v"])
        q, k = boot(q, need, f"layer {i} q"), boot(k, need, f"layer {i} k")
        log.current = f"layer {i} / Q K^T"
        masks = self._offset_masks()
        lanes = self._lanes(masks)
        groups = 1 + max(g for g, _ in lanes.values())
        scores, lane_mask = [None] * groups, [np.zeros(self.lay.slots) for _ in range(groups)]
        for r, (g, j) in lanes.items():  # each offset's scores masked (garbage out of the other slots) into its lane
            s = ops.rotate(ops.mul_plain(rotsum(ops, ops.mul(q, ops.rotate(k, r * W)), self.dh), masks[r]), -j)
            scores[g] = s if scores[g] is None else ops.add(scores[g], s)
            lane_mask[g] += np.roll(masks[r], j)
        first = (sum(masks.values()) > 0).astype(np.float64)  # each query row's first slot of each head
        log.current = f"layer {i} / softmax"
        probs, scale = (self._cgf if sm.name == "cgf_poly" else self._exact)(ops, boot, scores, lane_mask, first, sm, poly, i)
        log.current = f"layer {i} / P V"
        v = boot(v, 1, f"layer {i} v")
        probs = [boot(p, PROBS_NEED, f"layer {i} probs") for p in probs]
        out = None
        for r, (g, j) in lanes.items():  # each offset's probabilities back to a head's first slot, alone
            p = ops.mul_plain(ops.rotate(probs[g], j), masks[r])
            term = ops.mul(broadcast(ops, p, self.dh), ops.rotate(v, r * W))
            out = term if out is None else ops.add(out, term)
        log.current = f"layer {i} / output"
        out = boot(out, 1, f"layer {i} context")
        w_o, b_o = lw["o"]
        (o,) = self.linear(ops, [out], (w_o / scale, b_o))  # the probabilities' public factor, not the bias's
        return o

    @staticmethod
    def _input_need(sm, poly, need: int, usable: int) -> int:
        """Levels the layer's input is refreshed to: CGF's whole attention up to P V's input (Q and K, the
        scores' ``need``, the exp, PROBS_NEED) where one bootstrap holds it, so that one ciphertext is
        refreshed instead of the one or two lane ciphertexts at the exp's input; else Q's and K's."""
        whole = 1 + need + poly.depth + PROBS_NEED
        return whole if sm.name == "cgf_poly" and whole <= usable else min(need + 1, usable)

    @staticmethod
    def _score_need(sm) -> int:
        """Levels Q and K need to reach the exp's input: the product, the lanes' mask and the statistics
        (CGF's two for ``c > 0``, its mean's one else; the exact softmax's mean, one). The exp's input is
        then bootstrapped on the lane ciphertexts, one or two a layer, rather than Q and K to a depth
        that carries every offset through P V."""
        return 2 + (2 if sm.name == "cgf_poly" and sm.values["coeff"] > 0 else 1)

    def _used_rows(self) -> np.ndarray:
        """(rows,): 1 on the examples' token rows, 0 past them."""
        return (np.arange(self.lay.rows) < self._n).astype(np.float64)

    def _per_slot(self, per_row: np.ndarray) -> np.ndarray:
        return np.repeat(per_row, self.lay.width)

    def _cgf(self, ops, boot, scores, lane_mask, first, sm, poly, i):
        """CGF: ``PolyExp(s - mu - c var) * mask / n`` on each lane ciphertext.

        With ``S1 = sum kappa s`` and ``S2 = sum (kappa s)^2`` over a row's keys (``kappa = sqrt(a c) /
        n``, a per-row factor riding on the totals' masks), the exp's input on [-1, 1] is ``t = a s - a mu
        - (n S2 - S1^2) - b``, where ``n S2 - S1^2 = a c var``: two levels below the lanes. The mask and
        ``1/n`` ride on the exp's coefficients."""
        a, b = _unit_map(poly)
        c = sm.values["coeff"]
        n = self._per_slot(self._nrow)
        kappa = math.sqrt(a * max(c, 0.0)) / n
        summed = rotsum(ops, self._sum(ops, scores), self.dh)  # at each head's first slot: the row's total
        shared = broadcast(ops, ops.mul_plain(summed, first * (a / n)), self.dh)  # a mu
        if c > 0:
            s1 = broadcast(ops, ops.mul_plain(summed, first * kappa), self.dh)
            n_sq = row_total(ops, self._sum(ops, [ops.square(s) for s in scores]), first * n * kappa**2, self.dh)
            shared = ops.add(shared, ops.sub(n_sq, ops.square(s1)))  # + a c var
        probs = []
        for g, s in enumerate(scores):
            t = ops.add_const(ops.sub(ops.mul_plain(s, lane_mask[g] * a), shared), -b)  # to_unit(s - mu - c var)
            # Lanes without a key carry -(a mu + a c var) - b: the exp's weights zero them, but its Chebyshev
            # basis sees them, so they must stay near [-1, 1] (T_8(2) = 1.9e4): measured in the simulation.
            boot.watch(t, f"layer {i} exp input, every slot", EXP_SLOT_LIMIT)
            t = boot(t, poly.depth, f"layer {i} exp input")
            weight = lane_mask[g] * (1.0 / n) ** (0.5**poly.squarings)
            probs.append(repeated_squaring(ops, chebyshev_series(ops, t, poly.coeffs, weight), poly.squarings))
        return probs, 1.0

    def _exact(self, ops, boot, scores, lane_mask, first, sm, poly, i):
        """The exact softmax as CKKS runs it: ``PolyExp(s - mu)`` on each lane ciphertext (its last
        ``norm_steps`` squarings left out), each row's total over its lanes, its reciprocal by Goldschmidt
        on [sum_lo, sum_hi] at each head's first slot, broadcast over the lanes; then each left-out
        squaring divided by its own total (probabilities held as ``G * p``, ``ExactCircuit.prob_scale``)."""
        a, b = _unit_map(poly)
        norm = normalisation(sm.values)
        n = self._per_slot(self._nrow)
        if norm.steps and max(self._lengths) > norm.keys:
            raise CgfBertError(f"{max(self._lengths)} tokens: more valid keys than the softmax's keys={norm.keys} (its later row sums' bound)")
        g = float(norm.keys) if norm.steps else norm.bound[1]
        mu = row_total(ops, self._sum(ops, scores), first * (a / n), self.dh)  # a mu
        es = []
        for k, s in enumerate(scores):
            t = ops.add_const(ops.sub(ops.mul_plain(s, lane_mask[k] * a), mu), -b)
            t = boot(t, poly.depth - norm.steps, f"layer {i} exp input")
            es.append(repeated_squaring(ops, chebyshev_series(ops, t, poly.coeffs, lane_mask[k]), poly.squarings - norm.steps))

        def inverse_total(xs, bound, iters, site):  # gain / (each row's total), in all its lanes
            y = reciprocal(ops, rotsum(ops, self._sum(ops, xs), self.dh), first, bound, iters, g, boot, site)
            return broadcast(ops, y, self.dh)

        y = inverse_total(es, norm.bound, norm.iters, f"layer {i}")
        probs = [ops.mul(boot(e, 1, f"layer {i} exp"), y) for e in es]
        for j in range(norm.steps):  # G^2 p^2 sums to G^2 sum p^2, in G^2 [1/keys, 1]
            sq = [ops.square(boot(p, 1, f"layer {i} step {j} p")) for p in probs]
            y = inverse_total(sq, norm.step_bound(g), norm.step_iters, f"layer {i} step {j}")
            probs = [ops.mul(boot(s, 1, f"layer {i} step {j} square"), y) for s in sq]
        return probs, g

    @staticmethod
    def _sum(ops, xs: list):
        out = None
        for x in xs:
            out = x if out is None else ops.add(out, x)
        return out

    # -- the whole forward

    def _pack(self, lengths) -> None:
        """The examples' rows: ``_eid`` each row's example (-1 past them), ``_nrow`` its example's length."""
        self._lengths = (int(lengths),) if np.ndim(lengths) == 0 else tuple(int(n) for n in lengths)
        self._n = sum(self._lengths)
        if self._n > self.lay.rows:
            raise CgfBertError(f"{self._n} tokens do not fit a ciphertext of {self.lay.rows} token rows")
        self._eid, self._nrow = np.full(self.lay.rows, -1), np.ones(self.lay.rows)
        for e, (start, n) in enumerate(zip(self.starts(self._lengths), self._lengths)):
            self._eid[start:start + n], self._nrow[start:start + n] = e, n

    @staticmethod
    def starts(lengths) -> list[int]:
        """The first row of each packed example (its [CLS], where its logits come out)."""
        return [int(s) for s in np.cumsum((0, *lengths))[:-1]]


    def forward(self, ops, boot, x, lengths, log: StageLog, probe=None, first: int = 0):
        """Encrypted embedding output (one ciphertext) -> encrypted logits (slots 0 and 1 of each example's
        first row). ``lengths``: the tokens of each example packed in it, consecutive rows (an int for one).
        ``probe(i, x)``, if given, sees layer i's output ciphertext (a measurement, not the protocol).
        ``first``: the encoder layer to start at, ``x`` then being layer ``first - 1``'s output (a run
        going on from where it stopped: ``fhe.staged``)."""
        self._pack(lengths)
        n = self._n
        pad = np.zeros((self.lay.rows, self.lay.width))
        pad[n:, :self.w.hidden] = np.where(np.arange(self.w.hidden) % 2, -1.0, 1.0)  # mean 0, variance 1
        self._pad = pad.ravel()
        L = len(self.w.layers)
        lns, gelus = self.approx.layernorm.per_layer(L), self.approx.gelu.per_layer(L)
        if not 0 <= first <= L:
            raise CgfBertError(f"no encoder layer {first} to start at: the circuit has {L}")
        for i, lw in enumerate(self.w.layers[first:], first):
            h = ops.add(self.attention(ops, boot, x, i, log), x)
            log.current = f"layer {i} / LayerNorm 1"
            h = self.layernorm(ops, boot, boot(h, 1, f"layer {i} ln1"), lns[i], lw["ln1"], f"layer {i} ln1")
            log.current = f"layer {i} / feed-forward"
            A, B = self._map_of(gelus[i])
            # the input bootstrapped, if the activation would need it, rather than each of its W-wide outputs
            need = min(1 + self._activation_depth(gelus[i]), boot.usable)
            up = self.linear(ops, [boot(h, need, f"layer {i} ffn input")], lw["up"], scale=A, shift=B)
            act = [self.activation(ops, boot, u, gelus[i], f"layer {i} gelu") for u in up]
            act = [boot(a, 1, f"layer {i} gelu out") for a in act]
            down = self.linear(ops, act, lw["down"])[0]
            log.current = f"layer {i} / LayerNorm 2"
            x = self.layernorm(ops, boot, boot(ops.add(down, h), 1, f"layer {i} ln2"), lns[i], lw["ln2"], f"layer {i} ln2")
            if probe is not None:
                probe(i, x)
        log.current = "pooler + classifier"
        A, B = self._map_of(self.approx.pooler)
        (pooled,) = self.linear(ops, [boot(x, 1, "pooler input")], self.w.pooler, scale=A, shift=B)
        pooled = boot(self.activation(ops, boot, pooled, self.approx.pooler, "pooler tanh"), 1, "pooler out")
        (logits,) = self.linear(ops, [pooled], self.w.classifier)
        return logits
