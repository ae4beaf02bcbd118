"""Encrypted attention (cgf_bert.fhe): packing and rotations in numpy, then tiny CKKS circuits."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("desilofhe", reason="the FHE extra is not installed (pip install -e '.[fhe]')")

from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.reciprocal import goldschmidt
from cgf_bert.fhe.attention import check_blocks, encrypted_attention, simulate_attention
from cgf_bert.fhe.circuits import CgfCircuit, ExactCircuit
from cgf_bert.fhe.context import FheContext
from cgf_bert.fhe.ops import NumpyOps, rotsum, row_total, times_values
from cgf_bert.fhe.packing import pack, plan_packing, unpack

WIDTH = 16
# Depths 9 and 17: a ring of 2^15, desilofhe's smallest with 17 levels (2^14 stops at 7).
CGF = CgfCircuit(PolyExp(4, -8.0, 8.0, 2))
EXACT = ExactCircuit(PolyExp(6, -8.0, 8.0, 2), sum_bound=(4.0, 64.0), iters=4)


def make_blocks(seed=0, shapes=((5, 12, 9, 4), (7, 16, 16, 4), (3, 10, 4, 3)), sigma=1.0):
    """(scores (Q, K), valid (K,), V (K, D)) blocks with scattered masked keys holding garbage."""
    rng = np.random.default_rng(seed)
    blocks = []
    for q, k, n, d in shapes:
        valid = np.zeros(k, bool)
        valid[rng.choice(k, n, replace=False)] = True
        scores = rng.normal(0.0, sigma, (q, k)) + rng.normal(0.0, 1.0, (q, 1))
        scores[:, ~valid] = 1e30  # a masked score must never reach the ciphertext
        blocks.append((scores, valid, rng.normal(size=(k, d))))
    return blocks


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


@pytest.mark.parametrize("circuit", [CgfCircuit(), CGF, CgfCircuit(PolyExp(3, -8.0, 8.0, 1), coeff=0.0), EXACT],
                         ids=["cgf-default", "cgf-small", "cgf-c0", "exact"])
def test_slot_simulation_is_the_plaintext_circuit(circuit):
    blocks = make_blocks()
    outs, probs = simulate_attention(blocks, circuit, width=WIDTH, slots=128)  # several ciphertexts
    for (s, valid, v), o, p in zip(blocks, outs, probs):
        ref = circuit.reference(s, valid)
        assert np.allclose(p, ref, atol=1e-12) and np.all(p[:, ~valid] == 0)
        assert np.allclose(o, ref @ v, atol=1e-11)


def test_goldschmidt_inside_the_bound_and_outside():
    bound, circuit = (2.0, 64.0), ExactCircuit(sum_bound=(2.0, 64.0), tol=1e-6)
    s = np.geomspace(*bound, 50)
    assert np.max(np.abs(goldschmidt(s, bound, circuit.recip_iters) * s - 1)) <= 1e-6
    assert abs(goldschmidt(np.array([0.5]), bound, circuit.recip_iters)[0] * 0.5 - 1) > 1e-3  # below: not converged


# --- encrypted (CKKS) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx():
    return FheContext.for_circuits(CGF, EXACT)


def test_encrypted_cgf_matches_polyexp_reference(ctx):
    blocks = make_blocks()
    outs, probs, report = encrypted_attention(blocks, CGF, ctx=ctx, width=WIDTH, progress=False)
    for (s, valid, v), o, p in zip(blocks, outs, probs):
        ref = CGF.reference(s, valid)
        assert np.max(np.abs(p - ref)) < 1e-5
        assert np.max(np.abs(p[:, ~valid]), initial=0.0) < 1e-6  # masked keys ~0
        assert np.max(np.abs(o - ref @ v)) < 1e-5
    assert report.depth_used == report.depth_planned == CGF.depth
    assert (report.ring_size, report.slots, report.ciphertexts, report.rows) == (ctx.ring_size, ctx.slots, 1, 15)
    assert report.errors["cgf_poly"]["probs_max"] < 1e-5 and report.flagged["rows"] == 0
    assert set(report.errors) == {"cgf_poly", "cgf", "exact"} and "depth used 9" in report.summary()


def test_encrypted_exact_matches_its_plaintext_circuit_and_reports_bound_violations(ctx):
    blocks = make_blocks(seed=2)
    blocks.append(make_blocks(seed=3, shapes=((2, 16, 1, 4),))[0])  # one valid key: row sum 1, below 2
    outs, probs, report = encrypted_attention(blocks, EXACT, ctx=ctx, width=WIDTH, progress=False)
    for (s, valid, v), o, p in zip(blocks, outs, probs):
        ref = EXACT.reference(s, valid)
        scale = np.maximum(1.0, np.abs(ref))
        assert np.max(np.abs(p - ref) / scale) < 1e-4
        assert np.max(np.abs(o - ref @ v) / np.maximum(1.0, np.abs(ref @ v))) < 1e-4
    assert report.depth_used == EXACT.depth
    flagged = report.flagged
    assert flagged["sums_below"] == 2 and flagged["rows"] >= 2
    # The violation's error is reported, not hidden, and it stays in its rows.
    assert flagged["encrypted_vs_exact_max"] == pytest.approx(flagged["plaintext_circuit_vs_exact_max"], abs=1e-4)
    assert flagged["encrypted_vs_exact_max"] > 0.1 and flagged["encrypted_other_rows_vs_exact_max"] < 0.05
