"""The feed-forward activation (GELU) and the pooler's activation (tanh): their kinds.

A GELU kind's function is ``(x) -> y`` elementwise on the feed-forward's inner states
(B, T, intermediate); a pooler kind's ``(x) -> y`` on the pooled [CLS] state (B, hidden). The
``exact`` kinds are the base model's own functions: a model whose spec is exact keeps its own
module untouched, so its numbers are stock transformers' (``model.bert.set_approx``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cgf_bert.approx.spec import define_op

GELU = define_op("gelu", per_layer=True, title="GELU", signature="(x (B, T, intermediate)) -> same shape, elementwise")
POOLER = define_op("pooler", per_layer=False, title="pooler", signature="(x (B, hidden)) -> same shape, elementwise")


@GELU.register("exact")
def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    """The base model's own activation (erf GELU in BERT): not a polynomial."""
    return F.gelu(x)


@POOLER.register("exact")
def exact_tanh(x: torch.Tensor) -> torch.Tensor:
    """The base model's own pooler activation, tanh: not a polynomial."""
    return torch.tanh(x)
