"""The feed-forward activation (GELU) and the pooler's activation (tanh): their kinds.

A GELU kind's function is ``(x) -> y`` elementwise on the feed-forward's inner states
(B, T, intermediate); a pooler kind's ``(x) -> y`` on the pooled [CLS] state (B, hidden). The
``exact`` kinds are the base model's own functions: a model whose spec is exact keeps its own
module untouched, so its numbers are stock transformers' (``model.replaced``). The polynomial
kinds count the inputs that leave their interval (``counter``), never clip them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cgf_bert import CgfBertError
from cgf_bert.approx.chebyshev import ChebyshevFit
from cgf_bert.approx.spec import define_op
from cgf_bert.registry import Param

GELU = define_op("gelu", per_layer=True, title="GELU", signature="(x (B, T, intermediate)) -> same shape, elementwise")
POOLER = define_op("pooler", per_layer=False, title="pooler", signature="(x (B, hidden)) -> same shape, elementwise")


def _fit(fn: str, p: dict) -> ChebyshevFit:
    try:
        return ChebyshevFit(fn, p["degree"], p["lo"], p["hi"])
    except ValueError as e:
        raise CgfBertError(str(e)) from None


def _fitted(fn: str, x: torch.Tensor, p: dict, counter, tabulated: bool = False) -> torch.Tensor:
    fit = _fit(fn, p)
    if counter is not None:
        counter.add(x.detach(), fit.lo, fit.hi)
    # float64 is the references' dtype: Clenshaw itself there; the table elsewhere, where asked
    return fit.tabulated(x) if tabulated and x.dtype != torch.float64 else fit(x)


def _fit_params(what: str, degree: int, lo: float, hi: float, why: str) -> tuple[Param, ...]:
    return (
        Param("degree", int, degree, f"degree of the Chebyshev fit of {what}", min=1, max=128),
        Param("lo", float, lo, f"lower end of the interval the {what} fit covers ({why})"),
        Param("hi", float, hi, f"upper end of the interval the {what} fit covers"),
    )


def _fit_kind(fn: str, name: str, slug: str) -> dict:
    """The registry properties every Chebyshev-fit kind shares: label, slug, depth, interval, check, counting."""
    return dict(label=lambda p: f"{name} d={p['degree']} [{p['lo']:g},{p['hi']:g}]",
                slug=lambda p: f"{slug}{p['degree']}_{p['lo']:g}_{p['hi']:g}", depth=lambda p: _fit(fn, p).depth,
                interval=lambda p: (p["lo"], p["hi"]), check=lambda p: _fit(fn, p), counts_outside=True, input_division=False)


@GELU.register("exact")
def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    """The base model's own activation (erf GELU in BERT): not a polynomial."""
    return F.gelu(x)


@GELU.register(
    "gelu_poly",
    # [-18, 25]: the MRPC dev range of every layer's GELU inputs in the teacher and the CGF student is
    # [-17, 24] (results/analysis/attention_analysis-20261125-040918.json); degree 64 is within 1.3e-3 there.
    _fit_params("GELU", 64, -18.0, 25.0, "inputs outside are counted, never clipped"),
    **_fit_kind("gelu", "gelu_poly", "gelupoly"),
)
def gelu_poly(x: torch.Tensor, degree: int = 64, lo: float = -18.0, hi: float = 25.0, counter=None) -> torch.Tensor:
    """GELU by its Chebyshev interpolant on [lo, hi] (what CKKS runs)."""
    # the table, not Clenshaw: the feed-forward's inner states are the widest tensors of the model
    return _fitted("gelu", x, dict(degree=degree, lo=lo, hi=hi), counter, tabulated=True)


@GELU.register("quad", label=lambda p: "quad", slug=lambda p: "quad", depth=lambda p: 1, input_division=False)
def quad_gelu(x: torch.Tensor) -> torch.Tensor:
    """MPCFormer's Quad: 0.125 x^2 + 0.25 x + 0.5 (one level; far from GELU away from 0, so it needs distillation)."""
    return 0.125 * x * x + 0.25 * x + 0.5


@POOLER.register("exact")
def exact_tanh(x: torch.Tensor) -> torch.Tensor:
    """The base model's own pooler activation, tanh: not a polynomial."""
    return torch.tanh(x)


@POOLER.register(
    "tanh_poly",
    _fit_params("tanh", 32, -6.0, 6.0, "the pooler's inputs; outside are counted, never clipped"),
    **_fit_kind("tanh", "tanh_poly", "tanhpoly"),
)
def tanh_poly(x: torch.Tensor, degree: int = 32, lo: float = -6.0, hi: float = 6.0, counter=None) -> torch.Tensor:
    """tanh by its Chebyshev interpolant on [lo, hi]."""
    return _fitted("tanh", x, dict(degree=degree, lo=lo, hi=hi), counter)
