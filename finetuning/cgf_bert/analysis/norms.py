"""Norm-based attention analysis (Kobayashi et al., "Attention is Not Only a Weight", EMNLP 2020).

A head's output for query ``i`` is ``sum_j alpha_ij f(x_j)``, ``f`` the value projection followed
by the head's slice of the output projection. The weight ``alpha_ij`` alone says how much a key is
looked at; the norm ``||alpha_ij f(x_j)||`` says how much it contributes. Per layer and head this
module gives the share of each, summed over the keys of a kind ([CLS], [SEP], the other tokens),
averaged over valid query rows. CGF rows do not sum to 1, so their weights are compared as shares
of the row's total (the norm shares are shares by construction): the fairer comparison.
"""

from __future__ import annotations

import torch

from cgf_bert.data.loader import to_device

KINDS = ("cls", "sep", "tokens")


def key_kinds(input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_id: int, sep_id: int) -> dict[str, torch.Tensor]:
    """(B, T) bool masks of the valid keys of each kind."""
    valid = attention_mask.bool()
    cls, sep = (input_ids == cls_id) & valid, (input_ids == sep_id) & valid
    return {"cls": cls, "sep": sep, "tokens": valid & ~cls & ~sep}


def transformed_norms(model, values: torch.Tensor, layer: int) -> torch.Tensor:
    """``||f(x_j)||`` per (B, H, T): each head's values through its slice of the output projection."""
    heads, dh = values.shape[1], values.shape[-1]
    w = model.bert.encoder.layer[layer].attention.output.dense.weight.to(values.dtype)  # (d, H*dh): y = x W^T
    w_h = w.T.reshape(heads, dh, -1)  # (H, dh, d)
    return torch.einsum("bhtk,hkd->bhtd", values, w_h).norm(dim=-1)


@torch.no_grad()
def norm_shares(model, loader, device, cls_id: int, sep_id: int) -> dict[str, torch.Tensor]:
    """``{"weight": (L, H, 3), "norm": (L, H, 3)}``: the mean share of each key kind in a valid query's
    row, by attention weight and by ``||alpha f(x)||``, kinds in ``KINDS`` order."""
    model.eval().to(device)
    sums = {"weight": None, "norm": None}
    rows = 0
    for batch in loader:
        batch = to_device(batch, device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"), needs=("attentions", "values"))
        kinds = key_kinds(batch["input_ids"], batch["attention_mask"], cls_id, sep_id)
        query = batch["attention_mask"].bool()  # (B, T)
        per = {"weight": [], "norm": []}
        for layer, (att, val) in enumerate(zip(out["attentions"], out["values"])):
            att = att.double() * batch["attention_mask"][:, None, None, :]  # (B, H, Q, K), padded keys 0
            contrib = {"weight": att, "norm": att * transformed_norms(model, val.double(), layer)[:, :, None, :]}
            for what, x in contrib.items():
                total = x.sum(-1).clamp_min(1e-300)  # (B, H, Q)
                shares = torch.stack([(x * kinds[k][:, None, None, :]).sum(-1) / total for k in KINDS], -1)  # (B, H, Q, 3)
                per[what].append((shares * query[:, None, :, None]).sum((0, 2)))  # (H, 3), summed over valid queries
        rows += int(query.sum())
        for what in per:
            s = torch.stack(per[what])  # (L, H, 3)
            sums[what] = s if sums[what] is None else sums[what] + s
    return {what: s / rows for what, s in sums.items()}
