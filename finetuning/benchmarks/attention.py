"""CGF vs exact attention (transformers' eager and sdpa) inside the same BERT layer.

A one-layer BERT with the base model's sizes is built once per attention implementation,
all with the same weights, and timed on the same padded batch: forward (eval, no_grad,
as in scoring) and forward+backward (train mode with dropout, as in training).
"""

from __future__ import annotations

import copy

import torch
from transformers import BertConfig, BertModel

from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.attention import ATTN_IMPLEMENTATION, apply_softmax
from cgf_bert.model.bert import resolve_model

from .common import median_seconds

# (label, transformers attention implementation, our softmax kind or None)
VARIANTS = [
    ("eager exact", "eager", None),
    ("sdpa exact", "sdpa", None),
    ("ours exact", ATTN_IMPLEMENTATION, "exact"),
    ("ours cgf", ATTN_IMPLEMENTATION, "cgf"),
]


def one_layer_berts(model: str, device: torch.device) -> dict[str, BertModel]:
    config = BertConfig.from_pretrained(resolve_model(model))
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    state = None
    out = {}
    for label, impl, kind in VARIANTS:
        cfg = copy.deepcopy(config)  # a model keeps its config object: one each
        cfg._attn_implementation = impl
        m = BertModel(cfg, add_pooling_layer=False)
        if kind:
            apply_softmax(m, softmax_spec(kind))
        if state is None:
            state = m.state_dict()
        m.load_state_dict(state)
        m.embeddings.requires_grad_(False)  # frozen in training too: time the layer, not the embedding gradient
        out[label] = m.to(device)
    return out


def padded_batch(batch: int, length: int, vocab: int, device: torch.device):
    """Random tokens; row lengths spread between half and all of ``length``, like real batches."""
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, length), generator=g)  # past the special tokens
    lengths = torch.linspace(length // 2, length, batch).round().long()
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids.to(device), mask.to(device)


def run(model: str, device: torch.device, lengths=(64, 128, 256), batch: int = 16, min_run_time: float = 1.0) -> list[dict]:
    berts = one_layer_berts(model, device)
    vocab = next(iter(berts.values())).config.vocab_size
    rows = []
    for length in lengths:
        ids, mask = padded_batch(batch, length, vocab, device)
        times = {}
        for label, m in berts.items():

            def fwd(m=m):
                with torch.no_grad():
                    return m(input_ids=ids, attention_mask=mask).last_hidden_state

            def fwd_bwd(m=m):
                m.zero_grad(set_to_none=True)
                m(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean().backward()

            m.eval()
            t_fwd = median_seconds(fwd, min_run_time)
            m.train()
            times[label] = (t_fwd, median_seconds(fwd_bwd, min_run_time))
        sdpa = times["sdpa exact"]
        for label, (f, fb) in times.items():
            rows.append({"length": length, "batch": batch, "variant": label, "fwd_ms": f * 1e3, "fwd_bwd_ms": fb * 1e3,
                         "fwd_vs_sdpa": f / sdpa[0], "fwd_bwd_vs_sdpa": fb / sdpa[1]})
    return rows
