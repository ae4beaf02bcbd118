"""The encoder as explicit steps h -> h over the hidden states (B, T, d): embedding, layers, blocks, head."""

from __future__ import annotations

from typing import Callable

import torch

from cgf_bert.model.bert import BertMRPC

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (h (B, T, d), mask (B, 1, T, T)) -> h


def encoder_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 padding mask -> the (B, 1, T, T) boolean mask (True = attend) each layer takes."""
    m = attention_mask.bool()
    return m[:, None, None, :].expand(-1, 1, m.shape[1], -1)


def embed(model: BertMRPC, batch: dict) -> torch.Tensor:
    """The embedding output h_0 (B, T, d)."""
    return model.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))


def head(model: BertMRPC, h: torch.Tensor) -> torch.Tensor:
    """Logits (B, 2) from the last hidden states: pooler, then the classifier (dropout is off in eval)."""
    return model.classifier(model.dropout(model.bert.pooler(h)))


def layer_step(model: BertMRPC, i: int) -> Step:
    layer = model.bert.encoder.layer[i]
    return lambda h, mask: layer(h, mask)


def attention_step(model: BertMRPC, i: int) -> Step:
    layer = model.bert.encoder.layer[i]
    return lambda h, mask: layer.attention(h, mask)[0]


def ffn_step(model: BertMRPC, i: int) -> Step:
    layer = model.bert.encoder.layer[i]
    return lambda a, mask: layer.feed_forward_chunk(a)


