"""Encrypted attention (cgf_bert.fhe): circuits bound to the softmax registry, packing, rotations and
levels on numpy slot vectors, references against the torch softmaxes (all numpy), then tiny CKKS
circuits (skipped without the optional desilofhe)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.reciprocal import goldschmidt
from cgf_bert.approx.softmax import SOFTMAXES, softmax_spec
from cgf_bert.approx.spec import Spec
from cgf_bert.fhe.attention import check_blocks, encrypted_attention, simulate_attention
from cgf_bert.fhe.circuits import CIRCUITS, CgfCircuit, ExactCircuit, circuit_for
from cgf_bert.fhe.context import MISSING, FheContext
from cgf_bert.fhe.ops import PV_DEPTH, LevelledNumpyOps, NumpyOps, rotsum, row_total, times_values
from cgf_bert.fhe.packing import pack, plan_packing, unpack

needs_fhe = pytest.mark.skipif(importlib.util.find_spec("desilofhe") is None,
                               reason="the FHE extra is not installed (pip install -e '.[fhe]')")

WIDTH = 16


def cgf(poly: PolyExp, coeff: float = 0.5) -> CgfCircuit:
    """The circuit of a trained CGF softmax with exp polynomial ``poly``, as the experiment builds it."""
    return circuit_for(softmax_spec("cgf", coeff=coeff).with_polynomial(poly))


def exact(poly: PolyExp, sum_lo: float, sum_hi: float, **params) -> ExactCircuit:
    """The circuit of the exact softmax's polynomial form on the row-sum bound [sum_lo, sum_hi]."""
    return circuit_for(softmax_spec("exact_poly", degree=poly.degree, exp_lo=poly.lo, exp_hi=poly.hi,
                                    squarings=poly.squarings, sum_lo=sum_lo, sum_hi=sum_hi, **params))


CGF = cgf(PolyExp(4, -8.0, 8.0, 2))  # softmax depth 8
# Softmax depth 16 (+ P @ V 1): a ring of 2^15, desilofhe's smallest with 17 levels (2^14 stops at 7).
EXACT = exact(PolyExp(6, -8.0, 8.0, 2), 4.0, 64.0, iters=4)
# Softmax depth 6 (+ 1): the CGF run fits the smallest ring, 2^14.
CGF_SMALL = cgf(PolyExp(2, -8.0, 8.0, 1))


def make_blocks(seed=0, shapes=((5, 12, 9, 4), (7, 16, 16, 4), (3, 10, 4, 3)), sigma=1.0, offset=1.0):
    """(scores (Q, K), valid (K,), V (K, D)) blocks with scattered masked keys holding garbage."""
    rng = np.random.default_rng(seed)
    blocks = []
    for q, k, n, d in shapes:
        valid = np.zeros(k, bool)
        valid[rng.choice(k, n, replace=False)] = True
        scores = rng.normal(0.0, sigma, (q, k)) + rng.normal(0.0, offset, (q, 1))
        scores[:, ~valid] = 1e30  # a masked score must never reach the ciphertext
        blocks.append((scores, valid, rng.normal(size=(k, d))))
    return blocks


# --- circuits bound to the softmax registry ------------------------------------------------


def test_every_circuit_evaluates_a_registered_kind_that_declares_its_depth():
    assert set(CIRCUITS) == {"cgf_poly", "exact_poly"}
    for kind, cls in CIRCUITS.items():
        assert cls.kind == kind and SOFTMAXES[kind].depth is not None
    spec = softmax_spec("cgf", coeff=0.3).with_polynomial(PolyExp(8, -32.0, 32.0, 5))
    circuit = circuit_for(spec)
    assert isinstance(circuit, CgfCircuit) and circuit.spec == spec and circuit == CgfCircuit.from_spec(spec)
    assert (circuit.coeff, circuit.poly, circuit.depth) == (0.3, PolyExp(8, -32.0, 32.0, 5), spec.depth)
    assert isinstance(circuit_for(softmax_spec("exact").with_polynomial(PolyExp())), ExactCircuit)


@pytest.mark.parametrize("spec", [softmax_spec("quad2"), softmax_spec("cgf"), softmax_spec("exact")], ids=lambda s: s.name)
def test_a_kind_without_a_circuit_is_refused_with_the_kinds_that_have_one(spec):
    with pytest.raises(CgfBertError, match="no encrypted circuit evaluates softmax .*cgf_poly, exact_poly"):
        circuit_for(spec)


def test_a_circuit_is_one_layers_softmax():
    poly = softmax_spec("cgf").with_polynomial(PolyExp())
    with pytest.raises(CgfBertError, match="per-layer overrides"):
        circuit_for(softmax_spec("cgf_poly", layers={1: softmax_spec("exact")}))
    with pytest.raises(CgfBertError, match="ExactCircuit evaluates one layer's plain softmax 'exact_poly'"):
        ExactCircuit(poly)


def test_a_context_without_desilofhe_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "desilofhe", None)  # import desilofhe now raises ImportError
    with pytest.raises(CgfBertError, match="pip install -e"):
        FheContext.for_circuits(CGF)
    assert "desilofhe" in MISSING


# --- pure numpy: packing, rotations, P @ V -------------------------------------------------


def test_plan_packing_fills_ciphertexts_and_covers_every_row_once():
    plan = plan_packing([3, 5, 2, 9, 4], rows_per_ct=8)
    seen = {}
    for placements in plan:
        rows = sorted((p.row, p.row + p.q1 - p.q0) for p in placements)
        assert all(a[1] <= b[0] for a, b in zip(rows, rows[1:])) and rows[-1][1] <= 8  # no overlap
        for p in placements:
            seen.setdefault(p.block, []).append((p.q0, p.q1))
    assert {b: sorted(v) for b, v in seen.items()} == {0: [(0, 3)], 1: [(0, 5)], 2: [(0, 2)], 3: [(0, 6), (6, 9)], 4: [(0, 4)]}
    assert len(plan) == 3  # [3, 5], [2, first 6 of 9], [last 3 of 9, 4]: 23 rows in ceil(23 / 8) ciphertexts
    assert plan_packing([], 8) == []


def test_pack_unpack_round_trip():
    blocks = check_blocks(make_blocks(), WIDTH)
    plan = plan_packing([s.shape[0] for s, _, _ in blocks], 8)
    got = [np.full(s.shape, np.nan) for s, _, _ in blocks]
    for placements in plan:
        pc = pack(blocks, placements, 8, WIDTH, 4)
        unpack(pc.scores, placements, blocks, got, lambda b: blocks[b][0].shape[1])
        assert np.allclose(pc.inv_n.sum(axis=1), (pc.mask.sum(axis=1) > 0) * WIDTH / np.maximum(pc.mask.sum(axis=1), 1))
    for (s, valid, _), g in zip(blocks, got):
        assert np.array_equal(g, np.where(valid, s, 0.0))  # masked scores zeroed before encryption


def test_rotation_sums_match_numpy_row_sums():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(6, 8))  # 6 rows of width 8 in 48 slots
    x, first = rows.ravel(), np.zeros((6, 8))
    first[:, 0] = 1.0
    assert np.allclose(rotsum(NumpyOps(), x, 8).reshape(6, 8)[:, 0], rows.sum(axis=1))
    total = row_total(NumpyOps(), x, first.ravel() * 2.0, 8).reshape(6, 8)
    assert np.allclose(total, 2.0 * rows.sum(axis=1, keepdims=True))  # in every slot of the row


@pytest.mark.parametrize("width,dim", [(8, 1), (8, 8), (16, 5), (128, 32)])
def test_times_values_by_diagonals_matches_matmul(width, dim):
    rng = np.random.default_rng(width + dim)
    p, values = rng.normal(size=(4, width)), rng.normal(size=(4, width, dim))
    out = times_values(NumpyOps(), p.ravel(), values).reshape(4, width)[:, :dim]
    assert np.allclose(out, np.einsum("rk,rkd->rd", p, values))


# Two of its three squarings each divided by its row sum again (rows of at most 16 valid keys).
EXACT_STEPS = exact(PolyExp(6, -8.0, 8.0, 3), 4.0, 64.0, norm_steps=2, keys=16)


@pytest.mark.parametrize("circuit", [cgf(PolyExp()), CGF, cgf(PolyExp(3, -8.0, 8.0, 1), coeff=0.0), EXACT, EXACT_STEPS],
                         ids=["cgf-default", "cgf-small", "cgf-c0", "exact", "exact-steps"])
def test_slot_simulation_is_the_plaintext_circuit(circuit):
    blocks = make_blocks()
    outs, probs, _ = simulate_attention(blocks, circuit, width=WIDTH, slots=128)  # several ciphertexts
    for (s, valid, v), o, p in zip(blocks, outs, probs):
        ref = circuit.reference(s, valid)
        assert np.allclose(p, ref, atol=1e-12) and np.all(p[:, ~valid] == 0)
        assert np.allclose(o, ref @ v, atol=1e-11)


def test_goldschmidt_inside_the_bound_and_outside():
    bound, circuit = (2.0, 64.0), exact(PolyExp(), 2.0, 64.0, tol=1e-6)
    s = np.geomspace(*bound, 50)
    assert np.max(np.abs(goldschmidt(s, bound, circuit.recip_iters) * s - 1)) <= 1e-6
    assert abs(goldschmidt(np.array([0.5]), bound, circuit.recip_iters)[0] * 0.5 - 1) > 1e-3  # below: not converged
    assert exact(PolyExp(), 2.0, 64.0, tol=1e-6, iters=3).recip_iters == 3  # fixed steps override tol


# --- depth: measured on levelled slot vectors, equal to the entry's declaration --------------


def test_levelled_ops_consume_levels_as_ckks():
    ops, v = LevelledNumpyOps(), np.ones(8)
    a, b = ops.encrypt(v, 5), ops.encrypt(v, 3)
    assert [ops.mul(a, b).level, ops.square(a).level, ops.mul_plain(a, v).level] == [2, 4, 4]
    assert [ops.add(a, b).level, ops.sub(a, b).level, ops.add_const(a, 1.0).level, ops.rotate(a, 3).level] == [3, 3, 5, 5]
    assert [t.level for t in ops.cheb_basis(ops.encrypt(v / 2, 9), 8)] == [9, 8, 7, 7, 6, 6, 6, 6]  # T_i: ceil(log2 i)
    with pytest.raises(CgfBertError, match="more levels"):
        ops.square(ops.encrypt(v, 0))


DEPTH_SPECS = [
    *(softmax_spec("cgf_poly", degree=d, exp_lo=-8.0, exp_hi=8.0, squarings=k, coeff=c)
      for d, k, c in ((1, 0, 0.5), (4, 2, 0.5), (7, 3, 0.5), (8, 5, 0.0), (16, 8, 0.65))),
    *(softmax_spec("exact_poly", degree=6, exp_lo=-8.0, exp_hi=8.0, squarings=2, sum_lo=lo, sum_hi=hi, **kw)
      for lo, hi, kw in ((4.0, 64.0, {}), (32.0, 65536.0, {}), (4.0, 64.0, {"iters": 4}), (4.0, 5.0, {"tol": 0.1}),
                         (4.0, 64.0, {"norm_steps": 1, "keys": 16}), (4.0, 64.0, {"norm_steps": 2, "keys": 16, "iters": 3}))),
]


@pytest.mark.parametrize("spec", DEPTH_SPECS, ids=lambda s: s.slug())
def test_simulated_levels_are_the_declared_depth(spec):
    circuit = circuit_for(spec)
    _, _, levels = simulate_attention(make_blocks(), circuit, width=WIDTH, slots=128, top=64)
    assert (levels.softmax, levels.pv) == (spec.depth, PV_DEPTH)
    _, _, tight = simulate_attention(make_blocks(), circuit, width=WIDTH, slots=128)  # exactly the levels a context has
    assert (tight.scores, tight.out) == (spec.depth + PV_DEPTH, 0)


def test_the_exact_depth_follows_the_reciprocal_steps():
    """The linear guess alone (a bound tight enough for tol) is one level; each step one more after e0's two."""
    depths = {it: exact(PolyExp(6, -8.0, 8.0, 2), 4.0, 64.0, iters=it).depth for it in (1, 2, 5)}
    assert depths[2] - depths[1] == 1 and depths[5] - depths[2] == 3
    assert exact(PolyExp(6, -8.0, 8.0, 2), 4.0, 5.0, tol=0.1).recip_iters == 0
    assert exact(PolyExp(6, -8.0, 8.0, 2), 4.0, 5.0, tol=0.1).depth == depths[1] - 2


def test_the_normalising_steps_add_their_reciprocals_and_products_to_the_depth():
    """Each step: the reciprocal of a sum on [1/keys, 1] (its own Goldschmidt steps) and one product;
    its square is one of the exp's squarings, which the circuit moves, not adds."""
    one = exact(PolyExp(6, -8.0, 8.0, 3), 4.0, 64.0)
    stepped = exact(PolyExp(6, -8.0, 8.0, 3), 4.0, 64.0, norm_steps=2, keys=16)
    bound = stepped.norm.step_bound()
    assert bound == (1 / 16, 2.0)  # sum p^2 in [1/keys, 1], with headroom above
    s, it = np.geomspace(*bound, 200), stepped.norm.step_iters  # the fewest steps reaching tol=1e-4 there
    assert np.abs(goldschmidt(s, bound, it) * s - 1).max() <= 1e-4 < np.abs(goldschmidt(s, bound, it - 1) * s - 1).max()
    assert stepped.depth - one.depth == 2 * (2 + stepped.norm.step_iters + 1)
    assert stepped.prob_scale == 16.0 and one.prob_scale == 64.0
    with pytest.raises(CgfBertError, match="norm_steps <= squarings"):
        softmax_spec("exact_poly", squarings=2, norm_steps=3)


def test_steps_keep_the_first_sum_narrow_where_one_division_needs_a_bound_of_many_decades():
    """Rows spread like the teacher's (centred scores to 30, sums to 1e13): the first sum of
    exp(x/8) spans four decades, not fourteen, and the result is the softmax."""
    rng = np.random.default_rng(3)
    scores = rng.normal(0.0, 6.0, (64, 40))
    scores[::4, 0] += 30.0  # a peaked row every fourth
    valid = np.ones(40, bool)
    poly = PolyExp(32, -64.0, 64.0, 6)
    wide = exact(poly, 1.0, 1.0e16, norm_steps=0)
    sums = wide.row_sums(scores, valid)
    assert sums.max() / sums.min() > 1e9
    stepped = exact(poly, 1.0, 2.0, norm_steps=3, keys=64)
    narrow = stepped.row_sums(scores, valid)
    assert narrow.max() / narrow.min() < 1e4
    stepped = exact(poly, narrow.min() / 2, 2 * narrow.max(), norm_steps=3, keys=64)
    np.testing.assert_allclose(stepped.reference(scores, valid), stepped.references(scores, valid)["exact"], atol=1e-4)


def test_steps_are_named_and_an_old_spec_without_them_reads_as_one_division():
    spec = softmax_spec("exact_poly", squarings=5, norm_steps=3, keys=32)
    assert spec.label().endswith(" h=3 keys=32") and spec.slug().endswith("-h3-n32")
    old = {k: v for k, v in softmax_spec("exact_poly").to_json().items() if k not in ("norm_steps", "keys")}  # a record from before
    again = Spec.from_json("softmax", old)
    assert again == softmax_spec("exact_poly") and "h=" not in again.label()


def test_a_one_hot_row_sits_on_its_step_bound_and_still_divides_right():
    """sum p^2 = 1 exactly for a row with one key far above the rest (the teacher's [SEP] heads)."""
    scores = np.array([[60.0] + [0.0] * 15, [0.0] * 16])
    valid = np.ones(16, bool)
    circuit = exact(PolyExp(16, -64.0, 64.0, 6), 1.0, 2.0e4, norm_steps=3, keys=16)
    p = circuit.reference(scores, valid)
    np.testing.assert_allclose(p, circuit.references(scores, valid)["exact"], atol=1e-6)
    outs, probs, _ = simulate_attention([(scores, valid, np.eye(16)[:, :4])], circuit, width=WIDTH, slots=128)
    np.testing.assert_allclose(probs[0], p, atol=1e-12)


# --- references: the circuits' float64 functions are the torch softmaxes of their specs ----------


def torch_softmax(spec, scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The spec's torch softmax in float64 on one block: scores (Q, K), valid (K,) -> probs (Q, K)."""
    return spec(torch.as_tensor(scores)[None, None], torch.as_tensor(valid)[None, None, None]).numpy()[0, 0]


@pytest.mark.parametrize("circuit", [CGF, cgf(PolyExp(3, -8.0, 8.0, 1), coeff=0.0), cgf(PolyExp(8, -64.0, 16.0, 6), 0.65),
                                     EXACT, exact(PolyExp(8, -16.0, 16.0, 3), 2.0, 4096.0), EXACT_STEPS],
                         ids=["cgf-small", "cgf-c0", "cgf-wide", "exact", "exact-tol", "exact-steps"])
@pytest.mark.parametrize("offset", [1.0, 30.0])  # a large row mean: E[s^2] - mu^2 would cancel digits
def test_reference_is_the_torch_softmax_of_the_spec(circuit, offset):
    for s, valid, _ in make_blocks(seed=4, offset=offset):
        ref, want = circuit.reference(s, valid), torch_softmax(circuit.spec, s, valid)
        assert np.all(ref[:, ~valid] == 0) and np.all(want[:, ~valid] == 0)
        np.testing.assert_allclose(ref, want, rtol=1e-10, atol=1e-14)


# --- encrypted (CKKS) -----------------------------------------------------------------------


@needs_fhe
def test_encrypted_cgf_on_the_smallest_ring_matches_its_reference_and_declared_depth():
    ctx = FheContext.for_circuits(CGF_SMALL)
    blocks = make_blocks()
    outs, probs, report = encrypted_attention(blocks, CGF_SMALL, ctx=ctx, width=WIDTH, progress=False)
    for (s, valid, v), o, p in zip(blocks, outs, probs):
        ref = CGF_SMALL.reference(s, valid)
        assert np.max(np.abs(p - ref)) < 1e-5
        assert np.max(np.abs(p[:, ~valid]), initial=0.0) < 1e-6  # masked keys ~0
        assert np.max(np.abs(o - ref @ v)) < 1e-5
    assert (ctx.ring_size, ctx.max_level) == (2**14, CGF_SMALL.depth + PV_DEPTH)
    assert report.level_in - report.level_probs == report.depth_declared == CGF_SMALL.spec.depth == 6
    assert (report.level_probs - report.level_out, report.level_out) == (PV_DEPTH, 0)
    assert (report.ring_size, report.slots, report.ciphertexts, report.rows) == (ctx.ring_size, ctx.slots, 1, 15)
    assert report.errors["cgf_poly"]["probs_max"] < 1e-5 and report.flagged["rows"] == 0
    assert report.spec == CGF_SMALL.spec.to_json() and report.circuit == CGF_SMALL.spec.label()
    assert set(report.errors) == {"cgf_poly", "cgf", "exact"} and "depth used 7" in report.summary()


@needs_fhe
def test_encrypted_exact_matches_its_plaintext_circuit_and_reports_bound_violations():
    ctx = FheContext.for_circuits(CGF, EXACT)  # the deeper one sizes the ring
    assert (ctx.ring_size, ctx.max_level) == (2**15, EXACT.depth + PV_DEPTH)
    # Rows of 8 keys: rotations dominate the time (0.2 s each at 17 levels), and a row total takes log2 W.
    blocks = make_blocks(seed=2, shapes=((5, 8, 6, 2), (7, 8, 8, 2), (3, 6, 4, 2)))
    blocks.append(make_blocks(seed=3, shapes=((2, 8, 1, 2),))[0])  # one valid key: row sum 1, below 4
    outs, probs, report = encrypted_attention(blocks, EXACT, ctx=ctx, width=8, progress=False)
    for (s, valid, v), o, p in zip(blocks, outs, probs):
        ref = EXACT.reference(s, valid)
        scale = np.maximum(1.0, np.abs(ref))
        assert np.max(np.abs(p - ref) / scale) < 1e-4
        assert np.max(np.abs(o - ref @ v) / np.maximum(1.0, np.abs(ref @ v))) < 1e-4
    assert report.level_in - report.level_probs == report.depth_declared == EXACT.spec.depth == 16
    assert (report.level_probs - report.level_out, report.level_out) == (PV_DEPTH, 0)
    flagged = report.flagged
    assert flagged["sums_below"] == 2 and flagged["rows"] >= 2
    # The violation's error is reported, not hidden, and it stays in its rows.
    assert flagged["encrypted_vs_exact_max"] == pytest.approx(flagged["plaintext_circuit_vs_exact_max"], abs=1e-4)
    assert flagged["encrypted_vs_exact_max"] > 0.1 and flagged["encrypted_other_rows_vs_exact_max"] < 0.05
