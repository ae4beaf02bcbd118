"""The whole student as one CKKS circuit (``fhe.encoder``), on numpy slot vectors that count levels.

The reference is independent of the circuit: the torch model itself in float64 with the same
polynomial specs (``BertMRPC`` through transformers' BertModel), on a tiny random BERT.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.spec import Spec
from cgf_bert.fhe import accounting as A
from cgf_bert.fhe import backends as B
from cgf_bert.fhe import encoder as E
from cgf_bert.fhe import pipeline as P
from cgf_bert.fhe.keys import FixedKeys, GeneralKeys
from cgf_bert.fhe.ops import Levelled, LevelledNumpyOps
from cgf_bert.model.bert import build_model

POLY = Approximations(softmax=Spec.make("softmax", "cgf_poly"), gelu=Spec.make("gelu", "gelu_poly"),
                      layernorm=Spec.make("layernorm", "ln_poly", var_lo=0.01, var_hi=10.0, newton=4),
                      pooler=Spec.make("pooler", "tanh_poly"))
CHEAP = Approximations(softmax=Spec.make("softmax", "exact_poly", sum_lo=0.5, sum_hi=64.0, iters=6),
                       gelu=Spec.make("gelu", "quad"), layernorm=Spec.make("layernorm", "ln_affine", var_attention=0.5, var_output=2.0),
                       pooler=Spec.make("pooler", "tanh_poly"))

STEPS = CHEAP.replace(softmax=Spec.make("softmax", "exact_poly", sum_lo=0.5, sum_hi=64.0, norm_steps=2, keys=32))


def _model(tiny_bert, approx, seed=1):
    torch.manual_seed(seed)
    model = build_model(str(tiny_bert), approx).eval().double()
    model.classifier.weight.data.normal_(0, 1.0)  # logits of order 1, not 1e-3: a meaningful tolerance
    for m in model.modules():  # a fresh BERT's biases are 0: a circuit that mis-scales one would pass
        if isinstance(m, torch.nn.Linear):
            m.bias.data.normal_(0, 0.1)
    return model


def _example(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 20, (n,), generator=g)
    ids[0] = 2  # [CLS]
    return ids, (torch.arange(n) >= n // 2).long()


def _simulate(model, approx, n, top, slots=1024, bounds=None, record=True):
    ids, tt = _example(n)
    circuit = E.EncoderCircuit(E.Weights.of(model), approx, E.TokenLayout.for_model(slots, model.bert.config.hidden_size))
    out, log, boot = P.simulate(circuit, P.embed(model, ids, tt), top, bounds=bounds, record=record)
    return out, P.reference_logits(model, ids, tt), log, boot


@pytest.mark.parametrize("approx", [POLY, CHEAP, STEPS], ids=["cgf_poly+gelu_poly+ln_poly", "exact_poly+quad+ln_affine", "exact_poly-h2"])
@pytest.mark.parametrize("n", [7, 32])  # 32 tokens: every row of the 1,024-slot ciphertext, every key offset
def test_the_circuit_computes_the_models_logits(tiny_bert, approx, n):
    model = _model(tiny_bert, approx)
    out, ref, log, _ = _simulate(model, approx, n, top=10_000)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)
    assert not any(d.get("bootstraps") for d in log.stages.values())  # enough levels: nothing to refresh


@pytest.mark.parametrize("approx", [POLY, STEPS], ids=["cgf_poly+gelu_poly+ln_poly", "exact_poly-h2"])
def test_with_17_levels_it_bootstraps_where_the_levels_run_out_and_computes_the_same(tiny_bert, approx):
    model = _model(tiny_bert, approx)
    out, ref, log, boot = _simulate(model, approx, 9, top=17)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)
    assert sum(d.get("bootstraps", 0) for d in log.stages.values()) >= 2 * 4  # ln_poly's depth, the steps' reciprocals exceed 17
    # 9 tokens: 17 key offsets (t + r wraps), in 3 lane ciphertexts of d_head = 8 lanes. What the softmax
    # and P V refresh, they refresh once per lane ciphertext, never once per offset
    lanes = 3
    per_lane = {s: k for s, k in boot.booted.items() if any(w in s for w in ("exp input", " exp", " p", "square", "probs"))}
    assert per_lane and max(per_lane.values()) == lanes, per_lane
    assert set(boot.seen)  # every site that bootstrapped recorded its largest value (the calibration)


@pytest.mark.parametrize("approx", [POLY, STEPS], ids=["cgf_poly+gelu_poly+ln_poly", "exact_poly-h2"])
@pytest.mark.parametrize("lengths", [(7, 7), (9, 5, 12)])  # equal lengths, and mixed (CGF's n S2 by a product)
def test_examples_packed_in_one_ciphertext_each_get_their_own_models_logits(tiny_bert, approx, lengths):
    model = _model(tiny_bert, approx)
    examples = [_example(n, seed=i) for i, n in enumerate(lengths)]
    circuit = E.EncoderCircuit(E.Weights.of(model), approx, E.TokenLayout.for_model(1024, model.bert.config.hidden_size))
    out, log, _ = P.simulate(circuit, [P.embed(model, ids, tt) for ids, tt in examples], 17, record=True)
    want = np.stack([P.reference_logits(model, ids, tt) for ids, tt in examples])
    assert out.shape == (len(lengths), 2) and np.abs(want[0] - want[1]).max() > 1e-5  # different examples, different logits
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    _, alone, _ = P.simulate(circuit, P.embed(model, *examples[0]), 17, record=True)
    products = lambda lg: sum(d.get("mul", 0) + d.get("square", 0) for d in lg.stages.values())  # noqa: E731
    assert products(log) <= 2 * products(alone)  # one ciphertext's work, shared by all of them


def test_levels_each_stage_consumes_are_the_declared_depths(tiny_bert):
    """LayerNorm and GELU as the registry declares them; the softmax's offsets in this layout."""
    model = _model(tiny_bert, POLY)
    circuit = E.EncoderCircuit(E.Weights.of(model), POLY, E.TokenLayout.for_model(1024, 32))
    circuit._n = 5
    circuit._pad = np.zeros(1024)
    sim = B.SimulatedCkks(1024, 1000)
    log = A.StageLog()
    boot = A.Refresher(sim, log, 1000, record=True)
    x = sim.encrypt(np.random.default_rng(0).normal(size=1024))
    ln = POLY.layernorm.for_layer(0)
    y = circuit.layernorm(sim, boot, x, ln, (np.ones(32), np.zeros(32)), "layer 0 ln1")
    assert 1000 - y.level == ln.depth
    g = circuit.activation(sim, boot, x, POLY.gelu, "gelu")
    assert 1000 - g.level == POLY.gelu.depth
    for op, spec in (("layernorm", CHEAP.layernorm), ("gelu", CHEAP.gelu)):
        y = circuit.layernorm(sim, boot, x, spec, (np.ones(32), np.zeros(32)), "layer 0 ln1") if op == "layernorm" else \
            circuit.activation(sim, boot, x, spec, "gelu")
        assert 1000 - y.level == spec.depth, spec.label()


def test_a_non_polynomial_op_is_refused_before_any_work(tiny_bert):
    model = _model(tiny_bert, POLY)
    with pytest.raises(CgfBertError, match="gelu exact .*not a polynomial"):
        E.EncoderCircuit(E.Weights.of(model), POLY.replace(gelu=Spec.make("gelu", "exact")), E.TokenLayout.for_model(1024, 32))


def test_level_drops_are_the_levels_no_step_needs_worked_by_hand():
    """Input at 10 (reserve 1): a product (9), a step needing 3 (no bootstrap: 9 - 1 >= 3, so 5 to spare),
    two products (7), a step needing 8 (a bootstrap; its scaling keeps one level, so 6 to spare); the
    bootstrap's output (10) a product (9) and a step needing 7 (no bootstrap: 1 to spare), then the output."""
    def run(drops):
        sim = B.SimulatedCkks(8, 10, reserve=1)
        boot = A.Refresher(sim, A.StageLog(), 10, bounds={"a": 1.0, "b": 1.0}, drops=drops)
        x = boot.origin(sim.encrypt(np.full(8, 0.5)), "input")
        z = boot(sim.mul_plain(x, np.ones(8)), 3, "a")
        w = boot(sim.mul_plain(sim.mul_plain(z, np.ones(8)), np.ones(8)), 8, "b")
        out = boot(sim.mul_plain(w, np.ones(8)), 7, "c")  # 9 - 1 >= 7: no bootstrap
        boot.done(out)
        return x, w, out, boot

    x, w, out, boot = run(None)
    assert (x.level, w.level, out.level) == (10, 10, 9) and dict(boot.booted) == {"b": 1}
    assert boot.spare == {"input": 5, "b 1": 1} and boot.planned_drops() == {"input": 5, "b 1": 1}
    x, w, out, again = run(boot.planned_drops())
    assert (x.level, w.level, out.level) == (5, 9, 8) and dict(again.booted) == {"b": 1}  # the same bootstrap
    assert again.planned_drops() == {}  # nothing left to drop
    np.testing.assert_array_equal(out.slots, np.full(8, 0.5))


@pytest.mark.parametrize("approx", [POLY, STEPS], ids=["cgf_poly+gelu_poly+ln_poly", "exact_poly-h2"])
def test_level_drops_keep_the_values_and_bootstraps_and_run_every_operation_lower(tiny_bert, approx):
    model = _model(tiny_bert, approx)
    circuit = E.EncoderCircuit(E.Weights.of(model), approx, E.TokenLayout.for_model(1024, model.bert.config.hidden_size))
    emb = P.embed(model, *_example(9))
    bounds, centres = P.calibrate(circuit, [emb], 17, 1)
    out, log, boot = P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres)
    drops = boot.planned_drops()
    assert drops and P.level_drops(circuit, emb, 17, 1, bounds, centres) == drops
    dropped, dlog, dboot = P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres, drops=drops)
    np.testing.assert_array_equal(dropped, out)  # a drop discards moduli, never a value
    assert dboot.booted == boot.booted and dboot.planned_drops() == {}
    for op, by_level in log.level_table().items():  # the same operations, none higher, the products lower
        lower = dlog.level_table()[op]
        assert sum(lower.values()) == sum(by_level.values())
        assert A.mean_levels({op: lower})[op] <= A.mean_levels({op: by_level})[op]
    assert A.mean_levels(dlog.level_table())["mul_plain"] < A.mean_levels(log.level_table())["mul_plain"] - 1


def test_a_value_beyond_its_bootstrap_bound_is_counted_and_a_missing_bound_refused(tiny_bert):
    model = _model(tiny_bert, POLY)
    _, _, _, calibrated = _simulate(model, POLY, 9, top=17)
    tight = {site: peak / 4 for site, peak in calibrated.seen.items()}
    _, _, _, boot = _simulate(model, POLY, 9, top=17, bounds=tight, record=False)
    assert boot.overflows and min(boot.overflows.values()) > 1.0
    with pytest.raises(CgfBertError, match="no bootstrap bound"):
        _simulate(model, POLY, 9, top=17, bounds={}, record=False)


def test_a_value_the_circuit_bounds_itself_bootstraps_by_that_bound_without_calibration():
    sim, log = B.SimulatedCkks(64, 17), A.StageLog()
    boot = A.Refresher(sim, log, 17, bounds={}, record=False)  # no calibrated bound at all
    half, three = (Levelled(np.full(64, v), 0) for v in (0.5, 3.0))  # no level left: both bootstrap
    np.testing.assert_allclose(sim.decrypt(boot(half, 2, "layer 0 reciprocal e", at_most=1.0)), 0.5)
    assert not boot.overflows and not boot.seen
    boot(three, 2, "layer 0 reciprocal e", at_most=1.0)  # e past 1: its sum left the bound, and it is counted
    assert boot.overflows == {"layer 0 reciprocal e": 3.0}


def test_a_bootstrap_returns_17_levels_unless_its_bound_is_below_one_half():
    """At most one of the two scalings around a bootstrap takes a level (an integer product keeps it):
    ``x / 4`` before and ``* 4`` after for a bound of 3.7, ``* 5`` before and ``/ 5`` after for 0.2,
    none for 0.7 (already inside [-1, 1])."""
    assert B.scaled_bound(3.7) == (0.25, 4) and B.scaled_bound(4.0) == (0.25, 4) and B.scaled_bound(0.2) == (5, 0.2)
    assert B.scaled_bound(0.7) == (1, 1) and [B.after_levels(b) for b in (3.7, 0.7, 0.2)] == [0, 0, 1]
    for bound in (3.7, 0.7, 0.2, 0.013, 1e4):
        before, after = B.scaled_bound(bound)
        assert bound * before <= 1.0 + 1e-15 and bound * before > 0.5 * min(1.0, bound)  # into [-1, 1], not far below
        assert before * after == pytest.approx(1.0)  # the value comes back unchanged
        assert isinstance(before, float) + isinstance(after, float) <= 1  # one level at most
    sim, client = B.SimulatedCkks(16, 17, reserve=1), B.SimulatedCkks(16, 17, reserve=0)
    x = sim.encrypt(np.ones(16))
    assert sim.bootstrap(x, 3.7).level == 17 and sim.bootstrap(x, 0.7).level == 17 and sim.bootstrap(x, 0.2).level == 16
    assert client.bootstrap(x, 0.2).level == 17  # the client's refresh scales nothing
    log = A.StageLog()
    boot = A.Refresher(sim, log, 17, bounds={"small": 0.2, "large": 3.7})
    low = B.Levelled(np.ones(16), 2)
    assert boot(low, 15, "small").level == 16 and boot(low, 16, "large").level == 17
    with pytest.raises(CgfBertError, match="small needs 16 levels, but a bootstrap by its bound 0.2 leaves 15"):
        boot(low, 16, "small")
    # the mean the bootstrap gets, on its [-1, 1]: ones by 3.7 enter as 1/4, by 0.2 as 5 (x m, m = 5)
    assert boot.means == pytest.approx({"large": 0.25, "small": 5.0})
    boot(B.Levelled(np.r_[np.full(8, 2.0), np.full(8, -2.0)], 2), 16, "large")  # mean 0: the largest is kept
    assert boot.means["large"] == pytest.approx(0.25)


def test_a_simulated_bootstrap_adds_its_error_scaled_back_with_the_bound(tmp_path):
    """The error is drawn on the bootstrap's [-1, 1] and comes back times the integer bound (3.7 -> 4),
    as is (0.7) or over m (0.2 -> / 5); resampled from measured errors it keeps their tail."""
    n, sigma = 200_000, 1e-3
    gauss = B.SimulatedCkks(n, 17, reserve=1, noise=B.BootstrapNoise(sigma), seed=0)
    x = gauss.encrypt(np.full(n, 0.3))
    for bound, scale in ((3.7, 4.0), (0.7, 1.0), (0.2, 0.2)):
        err = gauss.bootstrap(x, bound).slots - 0.3
        assert np.std(err) == pytest.approx(sigma * scale, rel=0.02) and abs(err.mean()) < 0.02 * sigma * scale
    assert np.array_equal(B.SimulatedCkks(n, 17, reserve=1).bootstrap(x, 3.7).slots, x.slots)  # no noise: exact
    measured = np.concatenate([np.full(99, 1e-6), [1e-4]])  # a tail: one slot in a hundred 100 times larger
    np.savez(tmp_path / "costs.npz", input=np.zeros(100), error=measured)
    noise = B.BootstrapNoise.measured(tmp_path / "costs.json")
    assert noise.sigma == pytest.approx(np.sqrt(np.mean(measured**2)))
    err = B.SimulatedCkks(n, 17, reserve=1, noise=noise).bootstrap(x, 0.7).slots - 0.3
    assert set(np.round(np.unique(err) * 1e6).astype(int)) == {1, 100} and np.mean(err > 5e-5) == pytest.approx(0.01, abs=0.002)
    with pytest.raises(CgfBertError, match="not the slot errors"):
        B.BootstrapNoise.measured(tmp_path / "missing.json")


def test_the_circuits_error_under_bootstrap_noise_grows_with_the_noise(tiny_bert):
    """Small errors pass through the circuit linearly: a 100 times larger noise, a ~100 times larger logit error."""
    model = _model(tiny_bert, POLY)
    ids, tt = _example(9)
    circuit = E.EncoderCircuit(E.Weights.of(model), POLY, E.TokenLayout.for_model(1024, model.bert.config.hidden_size))
    emb, ref = P.embed(model, ids, tt), P.reference_logits(model, ids, tt)
    bounds, centres = P.calibrate(circuit, [emb], 17, 1)
    errs = [np.abs(P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres, noise=B.BootstrapNoise(s))[0] - ref).max() for s in (1e-8, 1e-6)]
    assert errs[0] > 1e-11 and 30 < errs[1] / errs[0] < 300


def test_calibration_settles_on_bounds_whose_plan_bootstraps_exactly_the_sites_it_bounded(tiny_bert):
    """Bounds change the levels a bootstrap returns, so the sites refreshed: calibration's bounds are a fixed point."""
    model = _model(tiny_bert, POLY)
    ids, tt = _example(9)
    circuit = E.EncoderCircuit(E.Weights.of(model), POLY, E.TokenLayout.for_model(1024, model.bert.config.hidden_size))
    emb = P.embed(model, ids, tt)
    bounds, centres = P.calibrate(circuit, [emb], 17, 1)
    _, _, again = P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres, record=True)
    assert set(again.seen) == set(bounds) and not again.overflows


def test_a_centred_bootstrap_gets_the_value_less_its_centre_and_gives_it_back_at_no_level():
    """A bootstrap whose input of mean m on [-1, 1] errs by bias * m^3 in every slot (``BootstrapNoise.bias``):
    uncentred, a value near 0.5 comes back off by that offset (times 4 after a bound of 3.7, which enters
    it as m / 4); less its centre 0.5 it comes back as it was, at the level the uncentred one returns, and the
    offset each site made is measured with its sign."""
    v = 0.5 + np.linspace(-0.01, 0.01, 16)
    for bias, bound, before, after in ((1e-3, 0.7, 1.0, 1.0), (-1e-3, 3.7, 0.25, 4.0)):
        sim = B.SimulatedCkks(16, 17, reserve=1, noise=B.BootstrapNoise(bias=bias))
        plain = A.Refresher(sim, A.StageLog(), 17, bounds={"s": bound}, measure=True)
        centred = A.Refresher(sim, A.StageLog(), 17, bounds={"s": bound}, centres={"s": 0.5}, measure=True)
        off, kept = plain(Levelled(v, 2), 16, "s"), centred(Levelled(v, 2), 16, "s")
        m = np.mean(v) * before
        np.testing.assert_allclose(off.slots - v, bias * m**3 * after, rtol=1e-9)
        np.testing.assert_allclose(kept.slots, v, atol=1e-15)  # mean(v) is 0.5: no offset at all
        assert off.level == kept.level == 17
        assert plain.offsets["s"] == pytest.approx(bias * m**3) and abs(centred.offsets["s"]) < 1e-15
        assert plain.means["s"] == pytest.approx(m) and centred.means["s"] < 1e-12
    given = A.Refresher(B.SimulatedCkks(16, 17, reserve=1, noise=B.BootstrapNoise(bias=1e-3)), A.StageLog(), 17, centres={"s": 0.5})
    np.testing.assert_allclose(given(Levelled(v, 2), 16, "s", at_most=1.0).slots - v, 1e-3 * np.mean(v) ** 3)  # never centred
    with np.errstate(over="ignore", invalid="ignore"):  # as encrypted_inference runs the simulation
        huge = B.SimulatedCkks(16, 17, reserve=1, noise=B.BootstrapNoise(1e-6, bias=1e-3)).bootstrap(Levelled(np.full(16, 1e150), 2), 1.0)
    assert not np.isfinite(huge.slots).any()  # driven past float64: non-finite, reported, never raised
    with pytest.raises(CgfBertError, match="needs 16 levels"):  # a centre is no reason to skip the level check
        A.Refresher(B.SimulatedCkks(16, 17, reserve=1), A.StageLog(), 17, bounds={"s": 0.2}, centres={"s": 0.5})(Levelled(v, 2), 16, "s")


def test_calibrated_centres_are_each_sites_mean_and_its_bound_the_spread_around_it(tiny_bert):
    """Each site's centre is the mean of every slot it refreshes; its bound twice the largest |value - centre|.
    Without centres the bounds are twice the largest |value|, as before centres existed (an old run's state agrees)."""
    model = _model(tiny_bert, POLY)
    ids, tt = _example(9)
    circuit = E.EncoderCircuit(E.Weights.of(model), POLY, E.TokenLayout.for_model(1024, model.bert.config.hidden_size))
    emb = P.embed(model, ids, tt)
    bounds, centres = P.calibrate(circuit, [emb], 17, 1)
    plain, none = P.calibrate(circuit, [emb], 17, 1, centre=False)
    assert none == {} and set(centres) == set(bounds)
    _, _, seen = P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres, record=True)
    _, _, raw = P.simulate(circuit, emb, 17, 1, bounds=plain, record=True)
    for site, c in centres.items():
        lo, hi = seen.extents[site]
        assert c == pytest.approx(np.mean(seen.slot_means[site]))
        assert bounds[site] == pytest.approx(2 * max(hi - c, c - lo)) and seen.seen[site] == pytest.approx(bounds[site] / 2)
    for site, bound in plain.items():  # bounds decide levels, so the two plans may refresh other sites
        assert bound == 2 * raw.seen[site]  # exactly: a run in pieces compares its bounds exactly
    assert not seen.overflows and max(seen.means.values()) < 0.05 < max(raw.means.values())  # the biased sites centred


def test_centring_takes_a_biased_bootstraps_error_out_of_the_logits(tiny_bert):
    """The same circuit, exact, is the same with or without centres; under bootstraps that err by 1.5e-3 m^3
    (the medium key's law, summary 88-89) the centred one's logits are far nearer the reference."""
    model = _model(tiny_bert, POLY)
    ids, tt = _example(9)
    circuit = E.EncoderCircuit(E.Weights.of(model), POLY, E.TokenLayout.for_model(1024, model.bert.config.hidden_size))
    emb, ref = P.embed(model, ids, tt), P.reference_logits(model, ids, tt)
    bounds, centres = P.calibrate(circuit, [emb], 17, 1)
    plain, _ = P.calibrate(circuit, [emb], 17, 1, centre=False)
    np.testing.assert_allclose(P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres)[0],
                               P.simulate(circuit, emb, 17, 1, bounds=plain)[0], rtol=1e-9, atol=1e-12)
    noise = B.BootstrapNoise(bias=1.5e-3)
    off = np.abs(P.simulate(circuit, emb, 17, 1, bounds=plain, noise=noise)[0] - ref).max()
    kept = np.abs(P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres, noise=noise)[0] - ref).max()
    assert kept < off / 10


def test_the_noise_option_takes_none_a_sigma_or_a_record_and_refuses_the_rest(tmp_path):
    import argparse

    from experiments.encrypted_inference import noise_of

    assert not noise_of("none") and noise_of("2e-6").sigma == 2e-6
    np.savez(tmp_path / "c.npz", input=np.zeros(4), error=np.array([1.0, -1.0, 1.0, -1.0]) * 1e-6)
    assert noise_of(str(tmp_path / "c.json")).sigma == pytest.approx(1e-6)
    np.savez(tmp_path / "broken.npz", input=np.zeros(2), error=np.array([1e-6, np.nan]))
    for bad in ("-1", "nan", "inf", str(tmp_path / "absent.json"), str(tmp_path / "broken.json")):
        with pytest.raises(argparse.ArgumentTypeError):
            noise_of(bad)


def test_the_exact_softmax_gets_the_fewest_steps_that_keep_its_first_row_sum_narrow():
    from cgf_bert.fhe.forms import FIRST_SUM_RATIO, fewest_steps, row_sum_bound

    rows = [torch.tensor([[40.0, -40.0], [0.0, 0.0]], dtype=torch.float64)]  # sums e^(40/2^h) + e^(-40/2^h), and 2
    ratio = {h: row_sum_bound(rows, h)[1] / row_sum_bound(rows, h)[0] for h in range(6)}
    assert ratio[2] == pytest.approx(4 * (np.exp(10) + np.exp(-10)) / 2) and ratio[2] > FIRST_SUM_RATIO >= ratio[3]
    assert fewest_steps(rows, 5).steps == 3 and fewest_steps(rows, 2).steps == 2  # never more steps than squarings
    assert fewest_steps(rows, 5).bound == row_sum_bound(rows, 3) and not fewest_steps(rows, 2).narrow


def test_an_example_with_more_tokens_than_the_softmaxs_keys_is_refused(tiny_bert):
    approx = STEPS.replace(softmax=Spec.make("softmax", "exact_poly", sum_lo=0.5, sum_hi=64.0, norm_steps=2, keys=8))
    with pytest.raises(CgfBertError, match="more valid keys than the softmax's keys=8"):
        _simulate(_model(tiny_bert, approx), approx, 9, top=10_000)


def test_a_long_example_and_a_too_narrow_row_are_refused():
    lay = E.TokenLayout.for_model(1024, 32)
    with pytest.raises(CgfBertError, match="do not fit"):
        lay.pack(np.zeros((33, 32)))
    with pytest.raises(CgfBertError, match="power-of-two"):
        E.TokenLayout(1024, 48)


def test_row_matmul_is_each_row_times_the_matrix_and_rows_past_the_tokens_are_zero():
    lay = E.TokenLayout(256, 16)
    rng = np.random.default_rng(1)
    x, m = rng.normal(size=(16, 16)), rng.normal(size=(12, 10))
    x[:, 12:] = 0.0
    rows = (np.arange(16) < 11).astype(float)
    out = E.row_matmul(B.SimulatedCkks(256, 5), B.SimulatedCkks(256, 5).encrypt(x.ravel()), m, lay, rows)
    got = out.slots.reshape(16, 16)
    np.testing.assert_allclose(got[:11, :10], x[:11, :12] @ m, atol=1e-12)
    assert not got[11:].any() and not got[:, 10:].any() and out.level == 4


def test_a_float64_model_forms_its_cgf_scores_in_float64(tiny_bert):
    """``float32_scores`` means at least float32: it once cast float64 scores down (1e-7 off the circuit)."""
    model = _model(tiny_bert, POLY)
    seen = []
    model.bert.encoder.layer[0].attention.self.tap = lambda module, scores, *rest: seen.append(scores.dtype)
    ids, tt = _example(5)
    model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], token_type_ids=tt[None])
    assert seen == [torch.float64]


@pytest.mark.parametrize("pack, key", [(1, "small"), (2, "medium")])
def test_encrypted_inference_runs_a_student_and_the_teacher_and_records_the_stages(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, pack, key):
    import json
    import sys

    from cgf_bert.approx.softmax import softmax_spec
    from cgf_bert.store.checkpoint import save_checkpoint
    from experiments import encrypted_inference

    torch.manual_seed(0)
    paths = [save_checkpoint(tmp_path / f"{name}.pt", build_model(str(tiny_bert), approx), {"model": str(tiny_bert), "seed": 0})
             for name, approx in (("student", Approximations(softmax=softmax_spec("cgf"))), ("teacher", Approximations()))]
    monkeypatch.setattr(sys, "argv", ["encrypted_inference.py", *map(str, paths), "--examples", "2", "--calibrate", "2",
                                      "--data-dir", str(tiny_mrpc), "--results-dir", str(tmp_path), "--pack", str(pack), "--key", key])
    encrypted_inference.main()
    (record,) = tmp_path.glob("fhe/encrypted_inference-*.json")
    rec = json.loads(record.read_text())
    student, teacher = rec["results"]
    # the medium key's fixed keys, chosen once and recorded, count every rotation of both models
    keys = FixedKeys(32768, tuple(rec["rotation_keys"]["steps"])) if key == "medium" else GeneralKeys(32768)
    assert rec["rotation_keys"]["kind"] == ("fixed" if key == "medium" else "general")
    for res in (student, teacher):
        for ex in res["examples"]:
            counted = sum(st.get("keyswitch", 0) for st in ex["stages"])
            assert counted == pytest.approx(sum(keys.cost(d) for d in ex["rotation_steps"].values())) and counted > 0
    assert student["label"].startswith("cgf_poly") and teacher["label"].startswith("exact_poly")
    for res in (student, teacher):
        assert len(res["examples"]) == 2 and all(ex["bootstraps"] > 0 for ex in res["examples"])
        assert [ex["examples_in_ciphertext"] for ex in res["examples"]] == [pack, pack]  # the two share one ciphertext when packed
        assert {"Q K V", "Q K^T", "softmax", "P V", "LayerNorm 1", "feed-forward"} <= set(res["per_example_mean_by_stage"])
    assert all(ex["same_prediction"] and ex["max_abs_error"] < 1e-9 for ex in student["examples"])
    for res in (student, teacher):  # the level table counts the very operations the stage table does
        ex = res["examples"][0]
        for op in ("mul_plain", "rotate", "mul"):
            assert sum(ex["op_levels"][op].values()) == pytest.approx(sum(st.get(op, 0) for st in ex["stages"]))
    # the exact softmax's reciprocal costs bootstraps CGF's softmax does not
    assert teacher["per_example_mean_by_stage"]["softmax"].get("bootstraps", 0) > student["per_example_mean_by_stage"]["softmax"].get("bootstraps", 0)


needs_fhe = pytest.mark.skipif(__import__("importlib").util.find_spec("desilofhe") is None,
                               reason="desilofhe (the optional fhe extra) is not installed")


# A tiny layer cheap enough to encrypt: low-degree polynomials, quad GELU, ln_affine.
ONE_LAYER = Approximations(softmax=Spec.make("softmax", "cgf_poly", degree=4, exp_lo=-16.0, exp_hi=16.0, squarings=2),
                           gelu=Spec.make("gelu", "quad"), layernorm=Spec.make("layernorm", "ln_affine", var_attention=0.5, var_output=2.0),
                           pooler=Spec.make("pooler", "tanh_poly", degree=4))


def _encrypted_matches_the_model(tiny_bert, ops):
    """The tiny one-layer model under ``ops``: logits within 1e-3 of the model's, bootstraps where the plan put them."""
    model = _model(tiny_bert, ONE_LAYER)
    model.bert.encoder.layer = model.bert.encoder.layer[:1]
    ids, tt = _example(6)
    emb = P.embed(model, ids, tt)
    circuit = E.EncoderCircuit(E.Weights.of(model), ONE_LAYER, E.TokenLayout.for_model(ops.slots, 32))
    reserve = getattr(ops, "reserve", 0)
    bounds, centres = P.calibrate(circuit, [emb], ops.top, reserve)
    drops = P.level_drops(circuit, emb, ops.top, reserve, bounds, centres)
    assert drops  # this layer has levels to spare: the real ciphertexts are dropped
    _, plan, _ = P.simulate(circuit, emb, ops.top, reserve, bounds=bounds, centres=centres, drops=drops)
    log = A.StageLog()
    out = P.run(circuit, A.Counted(ops, log), A.Refresher(ops, log, ops.top, bounds=bounds, centres=centres, drops=drops), emb, log)
    ref = P.reference_logits(model, ids, tt)
    np.testing.assert_allclose(out, ref, atol=1e-3 * np.abs(ref).max())
    booted = sum(d.get("bootstraps", 0) for d in log.stages.values())
    assert booted >= 1 and booted == sum(d.get("bootstraps", 0) for d in plan.stages.values())
    real, planned = log.level_table(), plan.level_table()
    real.pop("keyswitch"), planned.pop("keyswitch")  # the simulation counts them for the bootstrap keys' rotations
    assert real == planned  # every operation at the level the simulation planned, drops and all


@needs_fhe
def test_under_real_encryption_the_circuit_gives_the_models_logits(tiny_bert):
    """One tiny layer under CKKS (ring 2^15, 17 levels, the client refreshing where levels run out)."""
    from cgf_bert.fhe.context import FheContext

    _encrypted_matches_the_model(tiny_bert, B.CkksOps(FheContext(17, thread_count=2)))


@needs_fhe
@pytest.mark.real  # about 12 GB of keys and a few minutes per bootstrap on two cores: selected on purpose (-m real)
def test_with_real_bootstraps_the_circuit_gives_the_models_logits(tiny_bert):
    _encrypted_matches_the_model(tiny_bert, B.BootstrapOps("small", thread_count=2))


@needs_fhe
@pytest.mark.real  # the small bootstrap key: about 6 GB and two minutes
def test_a_plaintext_products_output_bootstraps():
    """desilofhe's bootstrap refuses a ciphertext in NTT form, which a plaintext product leaves; the
    exact softmax's reciprocal bootstraps one directly (summary.md, finding 96)."""
    ops = B.BootstrapOps("small", thread_count=2)
    v = np.linspace(-0.9, 0.9, ops.slots)
    x = ops.mul_plain(ops.encrypt(v), np.full(ops.slots, 0.5))
    np.testing.assert_allclose(ops.decrypt(ops.bootstrap(x, 1.0)), 0.5 * v, atol=1e-3)


def _cli(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, *flags) -> dict:
    """encrypted_inference on a tiny CGF student, the record it writes."""
    import json
    import sys

    from cgf_bert.approx.softmax import softmax_spec
    from cgf_bert.store.checkpoint import save_checkpoint
    from experiments import encrypted_inference

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "student.pt", build_model(str(tiny_bert), Approximations(softmax=softmax_spec("cgf"))),
                           {"model": str(tiny_bert), "seed": 0})
    monkeypatch.setattr(sys, "argv", ["encrypted_inference.py", str(path), "--examples", "1", "--calibrate", "2",
                                      "--data-dir", str(tiny_mrpc), "--results-dir", str(tmp_path), *flags])
    encrypted_inference.main()
    (record,) = tmp_path.glob("fhe/encrypted_inference-*.json")
    return json.loads(record.read_text())


def test_a_partial_run_is_the_model_cut_to_its_first_layers(tiny_bert, tiny_mrpc, tmp_path, monkeypatch):
    """--layers 1: the circuit runs layer 0, the pooler and the classifier; the reference is the model cut the same way,
    and the error after the layer is reported against the plaintext layer."""
    from experiments.encrypted_inference import truncated

    rec = _cli(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, "--layers", "1")
    (res,) = rec["results"]
    (ex,) = res["examples"]
    assert res["layers"] == 1 and [e["layer"] for e in ex["per_layer"]] == [0]
    assert ex["per_layer"][0]["max_abs_error"] < 1e-9 and ex["max_abs_error"] < 1e-9
    full = _model(tiny_bert, Approximations(softmax=Spec.make("softmax", "cgf_poly")))
    cut = truncated(_model(tiny_bert, Approximations(softmax=Spec.make("softmax", "cgf_poly"))), 1)
    ids, tt = _example(6)
    assert not np.allclose(P.reference_logits(full, ids, tt), P.reference_logits(cut, ids, tt))  # a different model, honestly


def test_logits_driven_past_float64_are_reported_never_counted_as_a_prediction(tiny_bert, tiny_mrpc, tmp_path, monkeypatch):
    """A NaN's argmax is 0, which may be the reference's: a non-finite result is 'not finite' and not
    equal, and the record stays strict JSON with a note where each value was."""
    rec = _cli(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, "--noise", "1e300")
    (ex,) = rec["results"][0]["examples"]
    assert ex["finite"] is False and ex["same_prediction"] is False and ex["max_abs_error"] is None
    assert rec["non_finite"] and all(n["reason"].startswith("the circuit's values left float64") for n in rec["non_finite"])


@needs_fhe
def test_the_command_runs_under_ckks_with_interactive_refreshes(tiny_bert, tiny_mrpc, tmp_path, monkeypatch):
    rec = _cli(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, "--layers", "1", "--backend", "interactive", "--threads", "2")
    (ex,) = rec["results"][0]["examples"]
    assert rec["keys"]["interactive"] is True and rec["backend"] == "interactive"
    assert ex["same_prediction"] and ex["max_abs_error"] < 1e-3 * np.abs(ex["reference_logits"]).max()
    assert ex["per_layer"][0]["max_abs_error"] < 1e-3 * ex["per_layer"][0]["max_abs_value"]
    assert ex["wall_seconds"] > 0 and sum(s.get("bootstraps", 0) for s in ex["stages"]) == ex["bootstraps"]
    # the plan's own logits (exact, no noise) beside the encrypted ones: close, and not the same numbers
    assert ex["simulated_logits"] != ex["encrypted_logits"]
    np.testing.assert_allclose(ex["simulated_logits"], ex["encrypted_logits"], atol=1e-3 * np.abs(ex["reference_logits"]).max())


@pytest.mark.parametrize("backend", ["sim", "bootstrap"])
def test_a_gpu_mode_this_desilofhe_cannot_serve_is_refused_when_parsed(backend, tmp_path, monkeypatch, capsys):
    """--mode gpu: refused for the simulation, and where desilofhe is the CPU build (or absent), in one
    line with exit 2 before any checkpoint is read or key made (missing.pt is never opened)."""
    import importlib.util

    from conftest import run_script

    if backend == "bootstrap" and importlib.util.find_spec("desilofhe") is not None:
        import desilofhe

        try:
            desilofhe.Engine(max_level=2, mode="gpu")
            pytest.skip("this desilofhe runs on a GPU here: nothing to refuse")
        except Exception:
            pass
    code, _, err = run_script(monkeypatch, capsys, "experiments.encrypted_inference", "missing.pt", "--mode", "gpu",
                              "--backend", backend, "--results-dir", tmp_path)
    want = "the simulation runs on numpy" if backend == "sim" else \
        ("cannot run on a GPU" if importlib.util.find_spec("desilofhe") else "encrypted evaluation needs desilofhe")
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", [("--noise", "1e-6"), ("--noise-bias", "1.5e-3")])
def test_bootstrap_noise_for_the_clients_refresh_is_refused_when_parsed(tmp_path, monkeypatch, capsys, flag):
    """The interactive backend's refresh is a decryption and a fresh encryption: no bootstrap error to draw."""
    from conftest import run_script

    code, _, err = run_script(monkeypatch, capsys, "experiments.encrypted_inference", "missing.pt", *flag,
                              "--backend", "interactive", "--results-dir", tmp_path)
    assert code == 2 and "adds no bootstrap error" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_operations_are_counted_at_the_level_they_run():
    log = A.StageLog()
    ops = A.Counted(LevelledNumpyOps(), log)
    x, y = Levelled(np.ones(4), 5), Levelled(np.ones(4), 3)
    ops.mul_plain(x, np.ones(4))
    ops.mul(x, y)  # aligned to the lower operand
    ops.rotate(x, 1)
    ops.rotate(x, 0)  # no rotation at all
    ops.cheb_basis(Levelled(np.zeros(4), 9), 4)  # T_2 .. T_4: three products
    assert log.level_table() == {"mul_plain": {"5": 1}, "mul": {"9": 3, "3": 1}, "rotate": {"5": 1}}


def _manual_ranges(model, examples):
    """GELU inputs and LayerNorm v = var + eps by a forward written out here (the independent reference)."""
    bert, gelu, var = model.bert, {}, {}
    for ids, tt in examples:
        with torch.no_grad():
            h = bert.embeddings(input_ids=ids[None], token_type_ids=tt[None])
            for k, layer in enumerate(bert.encoder.layer):
                a = layer.attention.output.dense(layer.attention.self(h)[0])
                r1 = a + h
                v1 = r1.var(-1, unbiased=False) + layer.attention.output.LayerNorm.eps
                h1 = layer.attention.output.LayerNorm(r1)
                u = layer.intermediate.dense(h1)
                r2 = layer.output.dense(layer.intermediate.intermediate_act_fn(u)) + h1
                v2 = r2.var(-1, unbiased=False) + layer.output.LayerNorm.eps
                h = layer.output.LayerNorm(r2)
                for store, key, t in ((gelu, k, u), (var, k, torch.cat([v1, v2]))):
                    lo, hi = store.get(key, (np.inf, -np.inf))
                    store[key] = (min(lo, float(t.min())), max(hi, float(t.max())))
    return gelu, var


def test_the_polynomial_form_takes_each_layers_intervals_from_the_measured_inputs(tiny_bert):
    from cgf_bert.approx.chebyshev import ChebyshevFit
    from cgf_bert.fhe import forms as F
    from cgf_bert.model.replaced import counting

    approx = Approximations(softmax=Spec.make("softmax", "cgf_poly"))
    model = _model(tiny_bert, approx)
    examples = [_example(n, seed=s)[0:2] for s, n in enumerate((7, 12, 20))]
    span = F.op_ranges(model, examples)
    gelu, var = _manual_ranges(model, examples)
    for k in gelu:
        assert span[("gelu", k)] == pytest.approx(gelu[k], rel=1e-9) and span[("layernorm", k)] == pytest.approx(var[k], rel=1e-9)
    assert F.polynomial_form(approx, model, examples, keys=32, own_exp=True).softmax == approx.softmax  # already a polynomial: kept
    form = F.polynomial_form(approx, model, examples, keys=32)
    assert form.softmax == F.cgf_form(approx.softmax, model, examples)  # its exp cut to the measured arguments
    assert form.softmax.depth < approx.softmax.depth
    with torch.no_grad():
        exact = [model(input_ids=i[None], attention_mask=torch.ones_like(i)[None], token_type_ids=t[None])["logits"] for i, t in examples]
    model.set_approx(form)
    with counting(model.bert) as counter, torch.no_grad():
        poly = [model(input_ids=i[None], attention_mask=torch.ones_like(i)[None], token_type_ids=t[None])["logits"] for i, t in examples]
    assert counter.result()["outside"] == 0  # the calibration's own inputs lie inside every interval
    for k in gelu:
        g, ln = form.gelu.for_layer(k), form.layernorm.for_layer(k)
        assert g.values["lo"] < gelu[k][0] and g.values["hi"] > gelu[k][1]
        assert ChebyshevFit("gelu", g.values["degree"], g.values["lo"], g.values["hi"]).max_error() <= F.FIT_TOL
        assert ln.values["var_lo"] < var[k][0] / 1.5 and ln.values["var_hi"] > var[k][1] * 1.5
        v = torch.from_numpy(np.geomspace(ln.values["var_lo"], ln.values["var_hi"], 999))
        y = ChebyshevFit("rsqrt", ln.values["degree"], ln.values["var_lo"], ln.values["var_hi"])(v)
        for _ in range(ln.values["newton"]):
            y = y * (1.5 - 0.5 * v * y * y)
        assert float((y * v.sqrt() - 1).abs().max()) <= F.RSQRT_TOL
    for e, p in zip(exact, poly):
        np.testing.assert_allclose(p.numpy(), e.numpy(), atol=2e-2)


def _manual_cgf_arguments(model, examples, c):
    """Per layer, CGF's exp argument s - mu - c var from Q and K written out here (the independent reference)."""
    bert, heads, out = model.bert, model.bert.config.num_attention_heads, {}
    for ids, tt in examples:
        with torch.no_grad():
            h = bert.embeddings(input_ids=ids[None], token_type_ids=tt[None])[0]
            for k, layer in enumerate(bert.encoder.layer):
                sa = layer.attention.self
                q, kk = (f(h).view(len(ids), heads, -1).transpose(0, 1) for f in (sa.query, sa.key))
                s = q @ kk.transpose(1, 2) / math.sqrt(q.shape[-1])
                x = s - s.mean(-1, keepdim=True) - c * ((s - s.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True)
                lo, hi = out.get(k, (np.inf, -np.inf))
                out[k] = (min(lo, float(x.min())), max(hi, float(x.max())))
                out_ = layer(h[None])
                h = (out_[0] if isinstance(out_, tuple) else out_)[0]
    return out


def test_cgfs_exp_takes_the_fewest_squarings_its_measured_arguments_allow(tiny_bert):
    from cgf_bert.approx.polyexp import PolyExp
    from cgf_bert.fhe import forms as F

    own = Spec.make("softmax", "cgf_poly")  # d=8 [-256, 16] k=8, as trained
    model = _model(tiny_bert, Approximations(softmax=own))
    examples = [_example(n, seed=s) for s, n in enumerate((7, 12, 20))]
    span = F.cgf_arguments(model, examples, [0.5] * len(model.bert.encoder.layer))
    manual = _manual_cgf_arguments(model, examples, 0.5)
    form = F.cgf_form(own, model, examples)

    def error(lo, k):  # the largest relative error of exp on [lo, 16] with k squarings, on a grid of its own
        x = torch.linspace(lo, 16.0, F.EXP_GRID, dtype=torch.float64)
        return float((PolyExp(8, lo, 16.0, k)(x) / torch.exp(x) - 1).abs().max())

    for k, (lo, hi) in manual.items():
        assert span[("arg", k)] == pytest.approx((lo, hi), rel=1e-9)
        v = form.for_layer(k).values
        assert v["exp_lo"] <= F.EXP_MARGIN * lo and v["exp_hi"] >= F.EXP_MARGIN * hi  # the margin is held
        assert v["exp_lo"] / 2.0 ** v["squarings"] == -1.0 and v["degree"] == 8  # the fit's left end and degree kept
        assert error(v["exp_lo"], v["squarings"]) <= F.EXP_REL_TOL
        k_ = v["squarings"] - 1  # one squaring fewer would not hold the margin, or would miss the tolerance
        assert k_ < 0 or v["exp_lo"] / 2 > F.EXP_MARGIN * lo or error(v["exp_lo"] / 2, k_) > F.EXP_REL_TOL
    assert form.depth < own.depth  # the tiny BERT's arguments are far inside [-256, 16]
    assert F.fewer_squarings(own, -200.0, 5.0) == own  # a wide layer keeps its squarings
    assert F.fewer_squarings(own, -10.0, 5.0).values["squarings"] == 4  # [-16, 16]
    # a row shift of up to 200 would put the lanes without a key at to_unit(-200) = -12.5 of [-16, 16]: more squarings
    wide_shift = F.fewer_squarings(own, -10.0, 5.0, shift=(0.0, 200.0))
    poly = PolyExp(8, wide_shift.values["exp_lo"], 16.0, wide_shift.values["squarings"])
    assert wide_shift.values["squarings"] > 4 and abs(poly.to_unit(-225.0)) <= 2.0
    with torch.no_grad():  # inside its intervals the narrowed model is the trained one
        want = [model(input_ids=i[None], attention_mask=torch.ones_like(i)[None], token_type_ids=t[None])["logits"] for i, t in examples]
        model.set_approx(Approximations(softmax=form))
        got = [model(input_ids=i[None], attention_mask=torch.ones_like(i)[None], token_type_ids=t[None])["logits"] for i, t in examples]
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-6, atol=1e-9)


def test_cgfs_attention_refreshes_its_input_once_where_one_bootstrap_holds_it(tiny_bert):
    narrow = Spec.make("softmax", "cgf_poly", exp_lo=-32.0, squarings=5)  # depth 9: 1 + 4 + 9 + 2 = 16 levels
    approx = POLY.replace(softmax=narrow)
    model = _model(tiny_bert, approx)
    out, ref, _, boot = _simulate(model, approx, 9, top=17)
    inside = lambda booted: [s for s in booted if "exp input" in s or "probs" in s]  # noqa: E731  (between the scores and P V)
    assert not inside(boot.booted) and boot.booted["layer 1 input"]  # the layer input took it
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-10)
    _, _, _, boot = _simulate(_model(tiny_bert, POLY), POLY, 9, top=17)  # depth 12: 19 levels, no one bootstrap holds them
    assert inside(boot.booted)


def test_the_forms_intervals_come_from_the_measured_examples_and_the_exact_row_sums_from_the_calibration(tiny_bert):
    from cgf_bert.fhe import forms as F

    model = _model(tiny_bert, Approximations())
    calibration, measure = [_example(7)], [_example(n, seed=s) for s, n in enumerate((12, 20, 30))]
    form = F.polynomial_form(Approximations(), model, calibration, keys=32, measure=measure)
    span = F.op_ranges(model, measure)
    for k in range(len(model.bert.encoder.layer)):
        g = form.gelu.for_layer(k).values
        assert g["lo"] < span[("gelu", k)][0] and g["hi"] > span[("gelu", k)][1]
    measured = F.measured_forms(model, measure)
    assert form.gelu == measured["gelu"] and form.layernorm == measured["layernorm"] and form.pooler == measured["pooler"]
    assert form.softmax == F.exact_form(Approximations().softmax.with_polynomial(), model, calibration, 32, None)


def test_the_polynomial_form_keeps_a_checkpoints_own_polynomial_layers(tiny_bert):
    from cgf_bert.fhe import forms as F

    own = Spec.make("layernorm", "exact", layers={1: Spec.make("layernorm", "ln_poly", var_lo=0.01, var_hi=10.0, newton=4)})
    approx = Approximations(softmax=Spec.make("softmax", "cgf_poly"), layernorm=own)
    model = _model(tiny_bert, approx)
    form = F.polynomial_form(approx, model, [_example(9)], keys=32)
    assert form.layernorm.for_layer(1) == own.for_layer(1)
    assert all(form.layernorm.for_layer(k).name == "ln_poly" for k in range(len(model.bert.encoder.layer)))
    assert form.layernorm.for_layer(0) != own.for_layer(1) and form.gelu.depth is not None and form.pooler.depth is not None


def test_a_fit_no_degree_can_meet_is_refused_before_any_work():
    from cgf_bert.fhe import forms as F

    with pytest.raises(CgfBertError, match="no fit of degree"):
        F.fit_form("gelu", -500.0, 500.0)
    with pytest.raises(CgfBertError, match="1/sqrt"):
        F.rsqrt_form(1e-9, 1e9)


def test_a_rotation_takes_the_fewest_signed_power_of_two_steps():
    """``signed_steps`` against a brute force over every set of distinct signed powers of two (64 slots), and the
    rotation key alone: one key switch per set bit of the step mod the slots (-1 is 15 of them at 2^15 slots)."""
    import itertools

    from cgf_bert.fhe.ops import keyswitches, signed_steps

    n = 64
    steps = [s * (1 << i) for i in range(6) for s in (1, -1)]
    for k in range(-n, n):
        left, right = signed_steps(k, n)
        assert (left - right - k) % n == 0 and left >= 0 and right >= 0
        fewest = min(m for m in range(6) for c in itertools.combinations(steps, m)
                     if sum(c) % n == k % n and len({abs(s) for s in c}) == m)
        assert keyswitches(k, n) == fewest, k
    assert [keyswitches(k, 32768, both_ways=False) for k in (1, -1, -16, 512, -512, 3 * 512)] == [1, 15, 11, 1, 6, 2]
    assert [keyswitches(k, 32768) for k in (1, -1, -16, 512, -512, 3 * 512, 7)] == [1, 1, 1, 1, 1, 2, 2]


def test_the_bootstrap_keys_are_refused_without_their_rotation_keys():
    with pytest.raises(CgfBertError, match="none were given"):
        B.BootstrapOps("medium")
    with pytest.raises(CgfBertError, match="got 15 fixed"):
        B.BootstrapOps("small", keys=FixedKeys.chosen({3: 1}, 32768))
    with pytest.raises(CgfBertError, match="small or medium"):
        B.BootstrapOps("large")


def test_the_stage_log_prices_rotations_by_their_key_switches():
    log = A.StageLog()
    sim = B.SimulatedCkks(32768, 17, keys=GeneralKeys(32768, both_ways=False))
    ops = A.Counted(sim, log)
    x = sim.encrypt(np.zeros(32768))
    for k in (1, -1, 3):
        ops.rotate(x, k)
    counts = log.stages["input"]
    assert counts["rotate"] == 3 and counts["keyswitch"] == 1 + 15 + 2
    costs = {"mul": 0.0, "square": 0.0, "mul_plain": 0.0, "rotate": 0.5, "bootstraps": 0.0}
    assert A.stage_seconds(counts, costs) == 0.5 * 18
    assert A.stage_seconds({"rotate": 3}, costs) == 0.5 * 3  # a record from before key switches were counted


@needs_fhe
def test_a_rotation_made_of_rotation_and_roll_key_steps_is_the_rotation():
    """``BootstrapOps.rotate`` on desilofhe's general keys (a small ring: the same keys' kind, made in seconds)."""
    import desilofhe

    e = desilofhe.Engine(max_level=3, thread_count=2)
    sk = e.create_secret_key()
    ops = B.BootstrapOps.__new__(B.BootstrapOps)  # its keys, without the bootstrap key's minutes and gigabytes
    ops.e, ops.slots, ops.rotation_key = e, int(e.slot_count), e.create_rotation_key(sk)
    x = np.random.default_rng(0).normal(size=ops.slots)
    ct = e.encrypt(x, e.create_public_key(sk))
    for roll_key in (e.create_roll_key(sk), None):  # the small key's set, and the rotation key alone
        ops.roll_key, ops.keys = roll_key, GeneralKeys(ops.slots, roll_key is not None)
        for k in (1, -1, 7, -24, 3 * 512, ops.slots - 3):
            np.testing.assert_allclose(e.decrypt(ops.rotate(ct, k), sk), np.roll(x, -k), atol=1e-6)


@needs_fhe
def test_a_plaintext_product_by_a_light_plaintext_is_the_product():
    import desilofhe

    from cgf_bert.fhe.ops import plain_product

    e = desilofhe.Engine(max_level=3, thread_count=2)
    sk = e.create_secret_key()
    rng = np.random.default_rng(2)
    x, v = rng.uniform(-1, 1, e.slot_count), rng.uniform(-1, 1, e.slot_count)
    ct = e.encrypt(x, e.create_public_key(sk))
    got = plain_product(e, ct, v)
    assert got.level == ct.level - 1
    np.testing.assert_allclose(e.decrypt(got, sk), x * v, atol=1e-6)


@needs_fhe
def test_a_rotation_made_of_fixed_key_steps_is_the_rotation():
    """The medium key's set: fixed keys chosen for some rotations, every rotation the fewest of them (``FixedKeys.path``)."""
    import desilofhe

    e = desilofhe.Engine(max_level=3, thread_count=2)
    sk = e.create_secret_key()
    ops = B.BootstrapOps.__new__(B.BootstrapOps)
    ops.e, ops.slots = e, int(e.slot_count)
    ops.keys = FixedKeys.chosen({512: 10, -1: 10, 7: 3}, ops.slots, n=4)
    ops.fixed = {s: e.create_fixed_rotation_key(sk, s) for s in ops.keys.steps}
    x = np.random.default_rng(1).normal(size=ops.slots)
    ct = e.encrypt(x, e.create_public_key(sk))
    for k in (1, -1, 7, 512, -24, 3 * 512, ops.slots - 3):
        assert len(ops.keys.path(k)) == ops.keyswitches(k)
        np.testing.assert_allclose(e.decrypt(ops.rotate(ct, k), sk), np.roll(x, -k), atol=1e-6)


@needs_fhe
def test_ckks_costs_times_rotations_by_the_general_keys_with_their_key_switches():
    """A smoke test of the measurement on a small ring: every step timed with both key sets, counted as
    ``keyswitches`` counts it. What a key switch costs is the record's to say, not a test's."""
    import desilofhe
    from experiments.ckks_costs import GENERAL_STEPS, general_rotations

    e = desilofhe.Engine(max_level=3, thread_count=2)
    sk = e.create_secret_key()
    c = e.encrypt(np.zeros(e.slot_count), e.create_public_key(sk))
    out, roll = general_rotations(e, sk, c, 1)
    rows = {(r["step"], r["keys"]): r for r in out["rotations"]}
    assert len(rows) == 2 * len(GENERAL_STEPS) and roll is not None
    assert rows[(-1, "rotation key")]["keyswitches"] == int(np.log2(e.slot_count)) and rows[(-1, "rotation and roll keys")]["keyswitches"] == 1
    assert all(r["seconds"] > 0 for r in rows.values())


def test_bootstrap_inputs_shapes_span_the_bootstrap_range_and_errors_are_measured_against_the_input():
    """Each shape stays on [-1, 1] with the mean its label states; the error is the bootstrap's change, on a
    stand-in engine whose bootstrap adds a known vector (the real one runs as the experiment, minutes long)."""
    from experiments.bootstrap_inputs import FROM_LEVEL, SHAPES, bootstrap_errors

    rng = np.random.default_rng(0)
    samples = {name: s.make(rng, 4096) for name, s in SHAPES.items()}
    expected = {"uniform": 0.0, "small": 0.0, "positive": 0.5, "variance": -0.495, "constant": 0.5, "near_one": 0.9, "negative": -0.5}
    assert set(expected) == set(SHAPES) and all(np.abs(x).max() <= 1 for x in samples.values())
    assert all(abs(samples[n].mean() - m) < 0.02 for n, m in expected.items()) and samples["constant"].std() == 0

    added = rng.normal(0, 1e-5, 4096)

    class Engine:  # a ciphertext is its slot vector; the bootstrap adds ``added`` and returns at level 16
        encrypt = staticmethod(lambda x, pk: np.array(x))

        @staticmethod
        def level_down(c, level):
            assert level == FROM_LEVEL  # bootstrapped from where ckks_costs bootstraps
            return c

        decrypt = staticmethod(lambda c, sk: np.asarray(c))

        @staticmethod
        def bootstrap(c, *keys):
            return type("Ct", (np.ndarray,), {"level": 16})(c.shape, buffer=(c + added).astype(np.float64))

    row = bootstrap_errors(Engine, None, None, (), samples["positive"])
    assert row["max_error"] == pytest.approx(np.abs(added).max()) and row["rms_error"] == pytest.approx(np.sqrt(np.mean(added**2)))
    assert row["mean"] == pytest.approx(samples["positive"].mean()) and row["level_after"] == 16
    assert row["mean_error"] == pytest.approx(added.mean())  # signed: the offset's direction


def test_the_mean_by_stage_kind_adds_a_tables_layers_then_averages_over_the_examples():
    """Two examples' stage tables: the first's two softmax layers add up (6 s), the second's one is 6 s, and an
    operation one example lacks counts as 0 in the other (the mean of 1 and 0 bootstraps)."""
    first = [{"stage": "layer 0 / softmax", "seconds": 2.0, "bootstraps": 1}, {"stage": "layer 1 / softmax", "seconds": 4.0}]
    second = [{"stage": "layer 0 / softmax", "seconds": 6.0}, {"stage": "pooler + classifier", "seconds": 1.0}]
    assert A.mean_by_kind([first, second]) == {"softmax": {"seconds": 6.0, "bootstraps": 0.5}, "pooler + classifier": {"seconds": 0.5}}
