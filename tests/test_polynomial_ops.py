"""The polynomial GELU, LayerNorm and pooler kinds against their exact functions, and a fully polynomial model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.chebyshev import ChebyshevFit
from cgf_bert.approx.counter import OutsideCounter
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.approx.spec import Spec
from cgf_bert.model.bert import BertMRPC, bert_from_config
from cgf_bert.store.checkpoint import load_model, save_checkpoint


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("fn, exact, lo, hi, degree", [("gelu", gelu, -18.0, 25.0, 64), ("tanh", torch.tanh, -6.0, 6.0, 32),
                                                        ("rsqrt", torch.rsqrt, 0.1, 130.0, 32)])
def test_chebyshev_fit_is_within_its_bound_inside_the_interval(fn, exact, lo, hi, degree):
    fit = ChebyshevFit(fn, degree, lo, hi)
    x = torch.linspace(lo, hi, 5001, dtype=torch.float64)
    err = (fit(x) - exact(x)).abs().max().item()
    # Chebyshev interpolation is within (2 + 2/pi log d) of the best uniform approximation; the grid bound is that error
    assert err <= fit.max_error() * 1.01 + 1e-15
    # and it converges: twice the degree is much closer (the functions are smooth on the interval)
    assert ChebyshevFit(fn, 2 * degree, lo, hi).max_error() < err / 4


def test_gelu_poly_default_is_close_on_the_measured_range_and_counts_what_leaves_it():
    spec = Spec.make("gelu", "gelu_poly")
    x = torch.linspace(-17, 24, 4001, dtype=torch.float64)
    assert (spec(x) - gelu(x)).abs().max() < 2e-3
    counter = OutsideCounter()
    wide = torch.tensor([-30.0, -1.0, 0.0, 2.0, 40.0], dtype=torch.float64)
    spec(wide, counter=counter)
    assert counter.result() == {"outside": 2, "entries": 5}
    assert spec.depth == 7  # ceil(log2 64) + 1


@pytest.mark.parametrize("lo, hi, degree", [(-18.0, 25.0, 64), (-48.0, 48.0, 128)])
def test_the_tabulated_fit_is_the_polynomial_to_float32_rounding_and_so_is_its_gradient(lo, hi, degree):
    # reference: the same Chebyshev series by numpy in float64 (Clenshaw of this module not involved)
    import numpy as np

    fit = ChebyshevFit("gelu", degree, lo, hi)
    series = np.polynomial.chebyshev.Chebyshev(fit.coeffs, domain=[lo, hi])
    x = torch.linspace(lo - 0.5, hi + 0.5, 200_001)  # a little outside too: Clenshaw's values there
    xg = x.clone().requires_grad_()
    y = fit.tabulated(xg)
    y.sum().backward()
    inside = ((x >= lo) & (x <= hi)).numpy()
    xs = x.double().numpy()[inside]
    scale = np.abs(series(xs)).max()
    assert np.abs(y.detach().double().numpy()[inside] - series(xs)).max() <= 4 * 2**-23 * scale  # a few float32 ulps of the outputs
    assert np.abs(xg.grad.double().numpy()[inside] - series.deriv()(xs)).max() <= 1e-3 * np.abs(series.deriv()(xs)).max()
    assert torch.equal(y.detach()[~inside], fit(x)[~inside])  # outside: Clenshaw's own float32 values, not the table
    assert torch.isnan(fit.tabulated(torch.tensor([float("nan"), 0.0])))[0]  # nan stays nan, not a table entry


def test_gelu_poly_in_float64_is_clenshaw_itself():
    x = torch.linspace(-18, 25, 1001, dtype=torch.float64)
    assert torch.equal(Spec.make("gelu", "gelu_poly")(x), ChebyshevFit("gelu", 64, -18.0, 25.0)(x))


def test_quad_is_mpcformers_formula():
    x = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    torch.testing.assert_close(Spec.make("gelu", "quad")(x), torch.tensor([0.5, 0.5, 0.875, 2.375]))
    assert Spec.make("gelu", "quad").depth == 1


def test_tanh_poly():
    spec = Spec.make("pooler", "tanh_poly", degree=32, lo=-6.0, hi=6.0)
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    assert (spec(x) - torch.tanh(x)).abs().max() < 1e-3
    assert spec.depth == 6


def test_ln_poly_is_layernorm_inside_its_interval_and_counts_variances_outside():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64) * torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)[:, None, None]  # var 0.25 .. 64
    w, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    spec = Spec.make("layernorm", "ln_poly")
    ref = F.layer_norm(x, (16,), w, b, 1e-12)
    counter = OutsideCounter()
    # the first guess is within 15 % on [0.1, 130]; three Newton steps take it to ~4e-6 (e -> 1.5 e^2)
    torch.testing.assert_close(spec(x, w, b, 1e-12, "attention", counter=counter), ref, rtol=1e-5, atol=1e-5)
    assert counter.result() == {"outside": 0, "entries": 15}
    counter = OutsideCounter()
    spec(x * 100, w, b, 1e-12, "output", counter=counter)  # variances 2.5e3 .. 6.4e5: all above 130
    assert counter.result()["outside"] > 0
    # without Newton steps the polynomial's first guess alone is far off at this degree
    rough = Spec.make("layernorm", "ln_poly", newton=0)(x, w, b, 1e-12, "output")
    assert (rough - ref).abs().max() > 1e-3
    assert spec.depth == 2 + 6 + 3 * 3 + 1


def test_ln_affine_divides_by_its_constant_per_position():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    w, b = torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    spec = Spec.make("layernorm", "ln_affine", var_attention=4.0, var_output=0.25)
    c = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(spec(x, w, b, 0.0, "attention"), c / 2.0)
    torch.testing.assert_close(spec(x, w, b, 0.0, "output"), c / 0.5)
    # a row whose variance equals the constant is normalised exactly as LayerNorm does
    row = c[0, 0] / c[0, 0].pow(2).mean().sqrt() * 2.0  # variance 4
    torch.testing.assert_close(spec(row, w, b, 0.0, "attention"), F.layer_norm(row, (8,), w, b, 0.0))
    with pytest.raises(CgfBertError, match="one of"):
        spec(x, w, b, 0.0, "embeddings")


def test_bad_intervals_are_refused_when_the_spec_is_made():
    with pytest.raises(CgfBertError, match="finite lo < hi"):
        Spec.make("gelu", "gelu_poly", lo=3.0, hi=-3.0)
    with pytest.raises(CgfBertError, match="finite lo < hi"):
        Spec.make("layernorm", "ln_poly", var_lo=10.0, var_hi=1.0)


FULLY_POLYNOMIAL = Approximations(
    softmax=softmax_spec("cgf_poly"), gelu=Spec.make("gelu", "gelu_poly"),
    layernorm=Spec.make("layernorm", "ln_poly", layers={0: Spec.make("layernorm", "ln_affine", var_attention=2.0)}),
    pooler=Spec.make("pooler", "tanh_poly"),
)


def test_a_fully_polynomial_model_keeps_its_state_dict_and_round_trips_through_a_checkpoint(tiny_bert, tmp_path):
    torch.manual_seed(0)
    exact = BertMRPC(bert_from_config(tiny_config())).eval()
    keys = list(exact.state_dict())
    batch = {"input_ids": torch.randint(5, 20, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        before = exact(**batch)["logits"]
        poly = exact.set_approx(FULLY_POLYNOMIAL)(**batch)["logits"]
    assert list(exact.state_dict()) == keys and torch.isfinite(poly).all() and not torch.allclose(before, poly)
    assert FULLY_POLYNOMIAL.label() == ("cgf_poly c=0.5 d=8 [-256,16] k=8, GELU gelu_poly d=64 [-18,25], "
                                        "LayerNorm ln_poly d=32 [0.1,130] newton=3, layer 0 ln_affine v=(2,1), pooler tanh_poly d=32 [-6,6]")
    with torch.no_grad():
        torch.testing.assert_close(exact.set_approx(Approximations())(**batch)["logits"], before)  # exact again: the model's own modules
    path = save_checkpoint(tmp_path / "p.pt", exact.set_approx(FULLY_POLYNOMIAL), {"model": str(tiny_bert), "seed": 0})
    assert list(torch.load(path, weights_only=True)["state_dict"]) == keys  # a replaced op adds no weights


def test_the_checkpoints_approximations_come_back(tiny_bert, tmp_path):
    from cgf_bert.model.bert import build_model

    model = build_model(str(tiny_bert), FULLY_POLYNOMIAL)
    path = save_checkpoint(tmp_path / "p.pt", model, {"model": str(tiny_bert), "seed": 0})
    loaded, meta = load_model(path)
    assert meta["approx"] == FULLY_POLYNOMIAL and loaded.approx == FULLY_POLYNOMIAL
    assert type(loaded.bert.encoder.layer[0].output.LayerNorm).__name__ == "ApproxLayerNorm"
    batch = {"input_ids": torch.randint(5, 20, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch)["logits"], model.eval()(**batch)["logits"])


def test_range_analysis_reports_the_pooler_input_and_each_ops_share_outside_its_interval():
    from cgf_bert.analysis.ranges import analyse

    torch.manual_seed(0)
    model = BertMRPC(bert_from_config(tiny_config())).eval()
    model.set_approx(Approximations(gelu=Spec.make("gelu", "gelu_poly", degree=8, lo=-0.05, hi=0.05)))  # a narrow interval
    batch = {"input_ids": torch.randint(5, 20, (3, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6]),
             "token_type_ids": torch.zeros(3, 6, dtype=torch.long)}
    grabbed = {}
    hooks = [model.bert.pooler.dense.register_forward_hook(lambda m, i, o: grabbed.__setitem__("pooler", o.detach())),
             model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, i, o: grabbed.__setitem__("gelu0", o.detach()))]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    result = analyse(model, [batch], torch.device("cpu"))
    pooler = result["pooler_input"]
    assert pooler["count"] == 3 * 32 and pooler["min"] == pytest.approx(grabbed["pooler"].min().item())
    assert pooler["outside"]["interval_from"] == "default tanh_poly d=32 [-6,6]"  # exact tanh: compared with the default fit
    real = grabbed["gelu0"][batch["attention_mask"].bool()]  # GELU inputs of real tokens only
    want = int(((real < -0.05) | (real > 0.05)).sum())
    g = result["layers"][0]["gelu_input"]["outside"]
    assert g["below"] + g["above"] == want > 0 and g["interval_from"] == "gelu_poly d=8 [-0.05,0.05]"
