"""CGF and exact softmax against plain reference implementations written here."""

import math

import pytest
import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.counter import OutsideCounter
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.softmax import (
    SOFTMAXES,
    VARIANCE_COEFF,
    centred,
    cgf_softmax,
    exact_softmax,
    get_softmax,
    legacy_softmax,
    parse_softmax,
    softmax_spec,
)


def reference_cgf(scores, valid, c):
    """Row by row, from the formula: p_j = exp(s_j - mu - c*var) / n over valid keys, else 0."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    flat_s = scores.double().reshape(-1, scores.shape[-1])
    flat_v = valid.expand_as(scores).reshape(-1, scores.shape[-1])
    flat_o = out.view(-1, scores.shape[-1])
    for r in range(flat_s.shape[0]):
        keys = [j for j in range(flat_s.shape[1]) if flat_v[r, j]]
        vals = [flat_s[r, j].item() for j in keys]
        n = len(vals)
        mu = sum(vals) / n
        var = sum((v - mu) ** 2 for v in vals) / n
        for j, v in zip(keys, vals):
            flat_o[r, j] = math.exp(v - mu - c * var) / n
    return out


def random_case(seed=0, B=3, H=2, Q=5, K=7):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, Q, K, generator=g) * 2
    lengths = torch.tensor([K, 4, 1])[:B]
    valid = (torch.arange(K)[None, :] < lengths[:, None])[:, None, None, :].expand(B, 1, Q, K)  # (B, 1, Q, K)
    return scores, valid


@pytest.mark.parametrize("c", [0.5, 0.65, 0.0])
def test_cgf_matches_reference(c):
    scores, valid = random_case()
    got = cgf_softmax(scores, valid, c)
    torch.testing.assert_close(got.double(), reference_cgf(scores, valid, c), rtol=1e-5, atol=1e-7)


def test_cgf_without_mask_equals_all_valid_mask():
    scores, _ = random_case()
    all_valid = torch.ones(scores.shape[0], 1, 1, scores.shape[-1], dtype=torch.bool)
    torch.testing.assert_close(cgf_softmax(scores, None), cgf_softmax(scores, all_valid))
    torch.testing.assert_close(cgf_softmax(scores, None).double(), reference_cgf(scores, all_valid, VARIANCE_COEFF), rtol=1e-5, atol=1e-7)


def test_masked_keys_are_exactly_zero_even_for_huge_scores():
    scores, valid = random_case()
    scores = scores.masked_fill(~valid, 1e4)
    p = cgf_softmax(scores, valid, 0.5)
    assert (p[~valid.expand_as(p)] == 0).all()
    assert torch.isfinite(p).all()


def test_gradients_finite_with_huge_masked_scores():
    scores, valid = random_case()
    scores = scores.masked_fill(~valid, 1e4).requires_grad_()
    cgf_softmax(scores, valid, 0.5).sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_invariant_to_adding_a_constant_to_a_row():
    scores, valid = random_case()
    shift = torch.randn(*scores.shape[:-1], 1) * 10
    torch.testing.assert_close(cgf_softmax(scores + shift, valid), cgf_softmax(scores, valid), rtol=1e-4, atol=1e-6)


def test_padding_with_masked_keys_leaves_valid_outputs_unchanged():
    scores, valid = random_case()
    pad = torch.randn(*scores.shape[:-1], 3) * 50
    padded_scores = torch.cat([scores, pad], dim=-1)
    padded_valid = torch.cat([valid, torch.zeros(*valid.shape[:-1], 3, dtype=torch.bool)], dim=-1)
    p = cgf_softmax(padded_scores, padded_valid)
    torch.testing.assert_close(p[..., : scores.shape[-1]], cgf_softmax(scores, valid))
    assert (p[..., scores.shape[-1] :] == 0).all()


def test_rows_sum_to_one_when_scores_are_constant():
    scores = torch.full((2, 3, 4, 6), 3.7)
    _, valid = random_case(B=2, H=3, Q=4, K=6)
    p = cgf_softmax(scores, valid, 0.65)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 4))


def test_cgf_runs_in_float32_under_bf16_autocast():
    scores, valid = random_case()
    bf = scores.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cgf_softmax(bf, valid)
    assert got.dtype == torch.bfloat16
    # Same as computing from the bf16 inputs in float32, then rounding once at the end.
    torch.testing.assert_close(got, cgf_softmax(bf.float(), valid).bfloat16(), rtol=0, atol=0)


def test_exact_matches_torch_softmax_over_valid_keys():
    scores, valid = random_case()
    ref = torch.softmax(scores.masked_fill(~valid, float("-inf")), -1)
    torch.testing.assert_close(exact_softmax(scores, valid), ref)


def test_registry_lists_valid_names_on_unknown():
    assert set(SOFTMAXES) >= {"exact", "cgf"}
    with pytest.raises(CgfBertError, match="exact.*cgf|cgf.*exact"):
        get_softmax("taylor")


def plain_cgf(s, valid, c):
    """The formula in plain autograd ops (what the fused backward must reproduce)."""
    m = valid.to(s.dtype)
    n = m.sum(-1, keepdim=True)
    x = (s - (s * m).sum(-1, keepdim=True) / n) * m
    var = (x * x).sum(-1, keepdim=True) / n
    return torch.exp(x - c * var) * m / n


@pytest.mark.parametrize("masked", [True, False])
def test_fused_cgf_gradient(masked):
    """gradcheck in float64 (finite differences), and the same gradient as plain autograd."""
    scores, valid = random_case(seed=4, K=6)
    if not masked:
        valid = torch.ones_like(valid)
    s = scores.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: cgf_softmax(t, valid if masked else None, 0.65), (s,))
    g = torch.randn_like(s)
    (ours,) = torch.autograd.grad(cgf_softmax(s, valid if masked else None, 0.65), s, g)
    (ref,) = torch.autograd.grad(plain_cgf(s, valid, 0.65), s, g)
    torch.testing.assert_close(ours, ref)
    if masked:
        assert (ours[~valid.expand_as(ours)] == 0).all()  # masked scores get no gradient


# ---------------------------------------------------------------- specs and the polynomial CGF


def test_spec_values_labels_and_json():
    spec = softmax_spec("cgf", coeff=0.65)
    assert spec == parse_softmax("cgf:coeff=0.65") == legacy_softmax({"name": "cgf", "coeff": 0.65})
    assert spec == legacy_softmax("cgf", 0.65)  # the legacy form: a name, the coefficient apart
    assert softmax_spec("cgf").values == {"coeff": VARIANCE_COEFF}  # defaults filled in
    assert spec.label() == "cgf c=0.65" and spec.slug() == "cgf0.65" and softmax_spec("exact").label() == "exact"
    assert legacy_softmax(spec.to_json()) == spec
    mixed = softmax_spec("cgf", layers={5: softmax_spec("exact")})
    assert legacy_softmax(mixed.to_json()) == mixed and mixed.for_layer(5).name == "exact" and mixed.for_layer(0) == softmax_spec("cgf")
    with pytest.raises(CgfBertError, match="softmax 'exact' takes no parameter coeff"):
        softmax_spec("exact", coeff=0.5)
    with pytest.raises(CgfBertError, match="coeff must be finite and >= 0, got nan"):
        softmax_spec("cgf", coeff=float("nan"))


def test_kinds_declare_their_properties():
    assert get_softmax("cgf").float32_scores and not get_softmax("exact").float32_scores
    assert get_softmax("exact").input_division and not get_softmax("cgf").input_division
    poly = softmax_spec("cgf_poly", degree=8, squarings=5)
    assert PolyExp(8, -256, 16, 5).depth == 3 + 1 + 5  # T_8 basis, coefficients, squarings
    assert poly.kind.depth(poly.values) == 3 + PolyExp(8, -256, 16, 5).depth  # + the row statistics


def test_polyexp_matches_exp_inside_its_interval():
    p = PolyExp(8, -32.0, 32.0, 5)
    x = torch.linspace(-32, 32, 2001, dtype=torch.float64)
    assert ((p(x) / torch.exp(x) - 1).abs().max()) < 1e-5
    assert p.outside(torch.tensor([-40.0, 0.0, 33.0])) == 2
    # and it drifts from exp outside it (16 % at twice the interval's end): nothing is clipped
    assert abs(p(torch.tensor([-64.0], dtype=torch.float64)).item() / math.exp(-64) - 1) > 0.1


def test_cgf_poly_is_cgf_inside_the_interval_and_counts_what_leaves_it():
    scores, valid = random_case()
    spec = softmax_spec("cgf_poly", coeff=0.5, degree=10, exp_lo=-40.0, exp_hi=20.0, squarings=5)
    counter = OutsideCounter()
    got = spec(scores.double(), valid, counter=counter)
    torch.testing.assert_close(got, cgf_softmax(scores.double(), valid, 0.5), rtol=1e-6, atol=1e-9)
    assert (got[~valid.expand_as(got)] == 0).all()
    # counted over valid keys of real query rows: in self-attention, the rows whose own key is valid
    real = valid & valid.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) if scores.shape[-1] == scores.shape[-2] else valid
    assert counter.result() == {"outside": 0, "entries": int(real.expand_as(scores).sum())}
    narrow = softmax_spec("cgf_poly", exp_lo=-1.0, exp_hi=1.0)
    x, var, _ = centred(scores.double(), valid.double())
    arg = (x - 0.5 * var)[valid.expand_as(scores)]
    counter = OutsideCounter()
    narrow(scores.double(), valid, counter=counter)
    assert counter.result()["outside"] == int(((arg < -1) | (arg > 1)).sum()) > 0  # counted over valid keys only (Q != K here)
    assert OutsideCounter().result() is None  # a fresh counter per call: nothing carried over


def test_cgf_poly_counts_real_query_rows_only():
    """Padding query rows (self-attention: the row of a masked position) hold scores nobody reads."""
    scores = torch.zeros(1, 1, 4, 4)
    scores[0, 0, 2:, :] = 100.0 * torch.arange(4.0)  # wild rows: 2 is real, 3 is padding
    valid = torch.tensor([True, True, True, False])[None, None, None, :].expand(1, 1, 4, 4)
    counter = OutsideCounter()
    softmax_spec("cgf_poly", exp_lo=-8.0, exp_hi=8.0)(scores, valid, counter=counter)
    assert counter.result()["entries"] == 9  # 3 real rows x 3 valid keys
    # row 2 over its valid keys: scores 0, 100, 200 -> x = -100, 0, 100, var = 6667: every argument near -3333
    assert counter.result()["outside"] == 3


def test_cgf_poly_trains():
    """Gradients flow through the polynomial (a student can be distilled into it directly)."""
    scores, valid = random_case()
    s = scores.requires_grad_()
    softmax_spec("cgf_poly")(s, valid).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
