"""LayerNorm: its kinds.

A kind's function is ``(x, weight, bias, eps, where) -> y`` over the last dim of the residual
sum (B, T, hidden), with the LayerNorm's own affine weights; ``where`` is ``"attention"`` (the
LayerNorm after self-attention) or ``"output"`` (after the feed-forward). The ``exact`` kind is
the base model's own LayerNorm (an input-dependent 1/sqrt of the variance), kept untouched where
the spec is exact.

Depths: the row mean (a rotation sum and a plaintext 1/d product, 1 level) and the centred
squares' mean (1 more), then the kind's own work, then the product with the centred input (1);
the affine weight and bias fold into the next linear layer's plaintext weights (no level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cgf_bert import CgfBertError
from cgf_bert.approx.chebyshev import ChebyshevFit
from cgf_bert.approx.spec import define_op
from cgf_bert.registry import Param

LAYERNORM = define_op("layernorm", per_layer=True, title="LayerNorm",
                      signature="(x (B, T, hidden), weight (hidden,), bias (hidden,), eps, where) -> same shape as x")
WHERE = ("attention", "output")  # the two LayerNorms of a BERT layer
STATS_DEPTH = 2  # the mean and the variance


@LAYERNORM.register("exact")
def exact_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, where: str = "output") -> torch.Tensor:
    """Standard LayerNorm (divides by the input-dependent sqrt of the variance)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _centred(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean, the population variance) over the last dim, as LayerNorm computes them."""
    c = x - x.mean(-1, keepdim=True)
    return c, (c * c).mean(-1, keepdim=True)


def _rsqrt_fit(p: dict) -> ChebyshevFit:
    try:
        if p["var_lo"] <= 0:
            raise ValueError(f"ln_poly needs var_lo > 0, got {p['var_lo']:g}")
        return ChebyshevFit("rsqrt", p["degree"], p["var_lo"], p["var_hi"])
    except ValueError as e:
        raise CgfBertError(str(e)) from None


LN_POLY_PARAMS = (
    Param("degree", int, 32, "degree of the Chebyshev fit of 1/sqrt(v) on the variance interval", min=1, max=128),
    # [0.1, 130]: the MRPC dev range of both LayerNorms' input variances in the teacher is [0.14, 127]
    # (results/analysis/attention_analysis-20261125-040918.json); a CGF student's layer 0 reaches 5.3e4.
    Param("var_lo", float, 0.1, "lower end of the variance interval (v = var + eps)", above=0.0),
    Param("var_hi", float, 130.0, "upper end of the variance interval; variances outside are counted, never clipped", above=0.0),
    Param("newton", int, 3, "Newton steps y <- y (3 - v y^2) / 2 after the polynomial's first guess", min=0, max=16),
)


@LAYERNORM.register(
    "ln_poly", LN_POLY_PARAMS,
    label=lambda p: f"ln_poly d={p['degree']} [{p['var_lo']:g},{p['var_hi']:g}] newton={p['newton']}",
    slug=lambda p: f"lnpoly{p['degree']}_{p['var_lo']:g}_{p['var_hi']:g}_n{p['newton']}",
    # a Newton step: v*y, then (v*y)*y, then y*(1.5 - 0.5 v y^2): 3 levels
    depth=lambda p: STATS_DEPTH + _rsqrt_fit(p).depth + 3 * p["newton"] + 1,
    check=_rsqrt_fit, counts_outside=True, interval=lambda p: (p["var_lo"], p["var_hi"]),
)
def ln_poly(x, weight, bias, eps, where="output", degree=32, var_lo=0.1, var_hi=130.0, newton=3, counter=None) -> torch.Tensor:
    """LayerNorm with 1/sqrt(var) as CKKS runs it: a polynomial first guess on [var_lo, var_hi], then Newton steps."""
    fit = _rsqrt_fit(dict(degree=degree, var_lo=var_lo, var_hi=var_hi))
    c, var = _centred(x)
    v = var + eps
    if counter is not None:
        counter.add(v.detach(), fit.lo, fit.hi)
    return c * rsqrt(v, fit, newton) * weight + bias


def rsqrt(v: torch.Tensor, fit: ChebyshevFit, newton: int) -> torch.Tensor:
    """1/sqrt(v) as CKKS runs it: the fit's first guess, then ``newton`` steps y <- y (3 - v y^2) / 2."""
    y = fit(v)
    for _ in range(newton):
        y = y * (1.5 - 0.5 * v * y * y)
    return y


VAR = dict(above=0.0)


@LAYERNORM.register(
    "ln_affine",
    (Param("var_attention", float, 1.0, "the constant the LayerNorm after attention divides by (its sqrt), in place of the variance", **VAR),
     Param("var_output", float, 1.0, "the constant the LayerNorm after the feed-forward divides by (its sqrt)", **VAR)),
    label=lambda p: f"ln_affine v=({p['var_attention']:.3g},{p['var_output']:.3g})",
    slug=lambda p: f"lnaffine{p['var_attention']:.3g}_{p['var_output']:.3g}",
    # the mean (1), then the centred input times gamma / sqrt(constant) (1): the division is by a public constant
    depth=lambda p: 2, input_division=False,
)
def ln_affine(x, weight, bias, eps, where="output", var_attention=1.0, var_output=1.0) -> torch.Tensor:
    """LayerNorm with the variance replaced by a per-layer constant (calibrated on the teacher, then trained): affine, no division.

    Where a row's real variance strays from the constant, its output is scaled by
    sqrt(var / constant) instead of normalised: the residual stream keeps that row's scale, and
    only training (the following weights) can compensate; rows far off (CGF's layer 0) stay off.
    """
    if where not in WHERE:
        raise CgfBertError(f"a LayerNorm is one of {WHERE}, got {where!r}")
    const = var_attention if where == "attention" else var_output
    c, _ = _centred(x)
    return c * (const + eps) ** -0.5 * weight + bias
