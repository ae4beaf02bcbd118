"""One attention layer of a BERT model taken apart and put back: its per-(example, head) scores,
key masks and values out (what an encrypted evaluator receives), and a replacement attention
output in (what it returns), the rest of the forward pass left to the plaintext model.

Built on the attention taps (``attention.tapped``), so no BERT code is copied.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from cgf_bert.model.attention import tapped

Block = tuple  # (scores (Q, K) float64, valid keys (K,) bool, V (K, D) float64) of one (example, head)


@torch.no_grad()
def capture_blocks(model: nn.Module, batch: dict, layer: int) -> tuple[list[Block], torch.Tensor]:
    """Run ``model`` on ``batch`` and return layer ``layer``'s blocks and the logits (B, 2).

    Only real tokens are kept: an example with ``n`` tokens gives one (n, n) block per head,
    its rows the real query tokens, its columns the real keys (all valid after the cut).
    Blocks are ordered example by example, head by head.
    """
    blocks: list[Block] = []
    lengths = batch["attention_mask"].sum(1).tolist()

    def tap(module, scores, mask, probs, value, out):  # scores (B, H, Q, K), value (B, H, K, D)
        for b, n in enumerate(lengths):
            for h in range(scores.shape[1]):
                blocks.append((scores[b, h, :n, :n].double().cpu().numpy(), np.ones(n, dtype=bool),
                               value[b, h, :n].double().cpu().numpy()))

    model.eval()
    with tapped(model.bert, {layer: tap}):
        logits = model(**batch)["logits"]
    return blocks, logits


@torch.no_grad()
def forward_with_layer_output(model: nn.Module, batch: dict, layer: int, outs: Sequence[np.ndarray]) -> torch.Tensor:
    """Logits (B, 2) when layer ``layer``'s attention output (before the output projection) is
    ``outs`` (one (n, D) array per (example, head), in ``capture_blocks`` order) on real tokens.

    Padding query rows keep the plaintext output: no real token attends to them.
    """
    lengths = batch["attention_mask"].sum(1).tolist()

    def tap(module, scores, mask, probs, value, out):  # out (B, H, Q, D)
        out = out.clone()
        heads = out.shape[1]
        for b, n in enumerate(lengths):
            for h in range(heads):
                out[b, h, :n] = torch.as_tensor(outs[b * heads + h], dtype=out.dtype, device=out.device)
        return out

    model.eval()
    with tapped(model.bert, {layer: tap}):
        return model(**batch)["logits"]
