"""LayerNorm: its kinds.

A kind's function is ``(x, weight, bias, eps) -> y`` over the last dim of the residual sum
(B, T, hidden), with the LayerNorm's own affine weights. The ``exact`` kind is the base model's
own LayerNorm (an input-dependent 1/sqrt of the variance), kept untouched where the spec is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cgf_bert.approx.spec import define_op

LAYERNORM = define_op("layernorm", per_layer=True, title="LayerNorm",
                      signature="(x (B, T, hidden), weight (hidden,), bias (hidden,), eps) -> same shape as x")


@LAYERNORM.register("exact")
def exact_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Standard LayerNorm (divides by the input-dependent sqrt of the variance)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
