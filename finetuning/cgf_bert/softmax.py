"""Attention softmax variants, plugged into transformers' BERT through its attention interface.

The registry maps a name to a function ``(scores, valid, coeff) -> probs`` where
``scores`` is (B, H, Q, K) and ``valid`` a boolean mask broadcastable to it (True = key
may be attended) or None when every key is valid.

One attention implementation, ``cgf_bert``, is registered with transformers; it reads the
softmax kind and coefficient from the model config (``config.softmax``,
``config.softmax_coeff``), so a model switches softmax by changing two config fields and
any ``BertModel`` checkpoint runs with either one without copying BERT's code.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .registry import Registry

VARIANCE_COEFF = 0.5  # c in exp(s - mu - c*var): 0.5 is the exact Gaussian log-sum-exp estimate
ATTN_IMPLEMENTATION = "cgf_bert"  # the name registered with transformers' AttentionInterface

SoftmaxFn = Callable[[torch.Tensor, "torch.Tensor | None", float], torch.Tensor]
SOFTMAXES: Registry[SoftmaxFn] = Registry("softmax")
register_softmax = SOFTMAXES.register
get_softmax = SOFTMAXES.lookup


@register_softmax("exact")
def exact_softmax(scores: torch.Tensor, valid: torch.Tensor | None, coeff: float = VARIANCE_COEFF) -> torch.Tensor:
    """Standard softmax over the valid keys (needs a max and a reciprocal; ``coeff`` is unused)."""
    if valid is not None:
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


class _CgfSoftmax(torch.autograd.Function):
    """``exp(x - c*var) * m / n`` with ``x = (s - mu) * m``, and its gradient written out.

    With ``u = g * p`` (``g`` the incoming gradient) and ``S`` its row sum, the gradient is
    ``ds = u - S * (m + 2c * x) / n``: a few elementwise passes, keeping only ``p`` and ``x``,
    where autograd would keep and revisit about ten intermediates of the (B, H, Q, K) scores.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, mask: torch.Tensor | None, coeff: float) -> torch.Tensor:
        if mask is None:
            n = s.new_full((), s.shape[-1])
            x = s - s.mean(dim=-1, keepdim=True)
        else:
            n = mask.sum(dim=-1, keepdim=True)  # (B, 1, Q, 1) public lengths
            # Zero masked scores before any exp so a huge masked score can't give inf * 0 = nan.
            x = (s - (s * mask).sum(dim=-1, keepdim=True) / n) * mask
        var = torch.linalg.vecdot(x, x).unsqueeze(-1) / n
        p = torch.exp(x - coeff * var)
        p = p.mul_(mask / n) if mask is not None else p.div_(n)
        ctx.save_for_backward(p, x, mask, n)
        ctx.coeff = coeff
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, x, mask, n = ctx.saved_tensors
        u = g * p
        scale = u.sum(dim=-1, keepdim=True) / n  # S / n
        shift = x * (2 * ctx.coeff)
        shift = shift.add_(mask) if mask is not None else shift.add_(1.0)
        return u.sub_(shift.mul_(scale)), None, None


@register_softmax("cgf")
def cgf_softmax(scores: torch.Tensor, valid: torch.Tensor | None, coeff: float = VARIANCE_COEFF) -> torch.Tensor:
    """CGF softmax: ``exp(s - mu - coeff*var) / n`` over the ``n`` valid keys, masked keys 0.

    ``mu`` and ``var`` are the mean and population variance of the valid scores of a row.
    No max and no input-dependent division: ``n`` is the public sequence length. Computed
    in float32 whatever the input dtype (autocast off), returned in the input dtype.
    """
    dtype = scores.dtype
    with torch.autocast(device_type=scores.device.type, enabled=False):
        s = scores if scores.dtype == torch.float64 else scores.float()
        mask = None if valid is None else valid.to(s.dtype)  # (B, 1, Q, K), 1 for valid keys
        probs = _CgfSoftmax.apply(s, mask, float(coeff))
    return probs.to(dtype)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Q, D)
    key: torch.Tensor,  # (B, H, K, D)
    value: torch.Tensor,  # (B, H, K, D)
    attention_mask: torch.Tensor | None,  # (B, 1, Q, K) bool, True = attend; None = no padding
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT self-attention with the softmax named by ``module.config.softmax``."""
    config = module.config
    kind = getattr(config, "softmax", "exact")
    softmax = get_softmax(kind)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if kind == "cgf":
        # CGF exponentiates the centred scores directly (no max subtraction), so the scores
        # themselves are formed in float32 too: a bf16 error of 0.05 on a score of 10 would
        # become a 5 % error on its probability.
        with torch.autocast(device_type=query.device.type, enabled=False):
            scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling  # (B, H, Q, K)
    else:
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Q, K)
    probs = softmax(scores, attention_mask, getattr(config, "softmax_coeff", VARIANCE_COEFF))
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs.to(value.dtype), value)  # (B, H, Q, D)
    return out.transpose(1, 2).contiguous(), probs  # (B, Q, H, D)


# transformers builds the padding mask by the attention implementation's name: ours takes
# the boolean (True = attend) mask that SDPA uses, or None when nothing is padded.
AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
