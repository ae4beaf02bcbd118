"""BERT self-attention with a per-layer softmax, plugged in through transformers' attention interface.

One attention implementation, ``cgf_bert``, is registered with transformers. It reads the
softmax spec its layer carries (``module.softmax_spec``, set by ``BertMRPC.set_approx``), so
any ``BertModel`` checkpoint runs with any registered softmax, layer by layer, without copying
BERT's code. A layer may also carry a ``tap``: a function that sees the layer's scores, mask,
probabilities, values and output, and may return a replacement output (analysis, encryption).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cgf_bert.approx.softmax import EXACT_SOFTMAX
from cgf_bert.approx.spec import Spec

ATTN_IMPLEMENTATION = "cgf_bert"  # the name registered with transformers' AttentionInterface

# tap(module, scores (B,H,Q,K), mask (B,1,Q,K) bool | None, probs (B,H,Q,K), value (B,H,K,D), out (B,H,Q,D)) -> out | None
Tap = Callable[..., "torch.Tensor | None"]


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
    """Scores, the layer's softmax, dropout, times V."""
    spec: Spec = getattr(module, "softmax_spec", EXACT_SOFTMAX)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if spec.kind.float32_scores:
        dtype = torch.promote_types(query.dtype, torch.float32)  # at least float32: float64 stays float64
        with torch.autocast(device_type=query.device.type, enabled=False):
            scores = torch.matmul(query.to(dtype), key.to(dtype).transpose(2, 3)) * scaling  # (B, H, Q, K)
    else:
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Q, K)
    probs = spec(scores, attention_mask, counter=getattr(module, "outside_counter", None))  # a counter only while counting
    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(dropped.to(value.dtype), value)  # (B, H, Q, D)
    tap = getattr(module, "tap", None)
    if tap is not None:
        replaced = tap(module, scores, attention_mask, probs, value, out)
        out = out if replaced is None else replaced
    # The probabilities are returned before dropout: attention-map losses compare distributions.
    return out.transpose(1, 2).contiguous(), probs  # (B, Q, H, D), (B, H, Q, K)


def self_attentions(bert: nn.Module) -> list[nn.Module]:
    """The self-attention module of each encoder layer, in order."""
    return [layer.attention.self for layer in bert.encoder.layer]


def apply_softmax(bert: nn.Module, spec: Spec) -> None:
    """Give each self-attention layer of ``bert`` its plain spec from ``spec``."""
    for module, layer_spec in zip(self_attentions(bert), spec.per_layer(len(bert.encoder.layer))):
        module.softmax_spec = layer_spec


@contextmanager
def tapped(bert: nn.Module, taps: dict[int, Tap]) -> Iterator[None]:
    """Install ``taps`` (layer index -> tap) for the duration of the block."""
    mods = self_attentions(bert)
    try:
        for i, fn in taps.items():
            mods[i].tap = fn
        yield
    finally:
        for i in taps:
            mods[i].tap = None


# transformers builds the padding mask by the attention implementation's name: ours takes
# the boolean (True = attend) mask that SDPA uses, or None when nothing is padded.
AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
