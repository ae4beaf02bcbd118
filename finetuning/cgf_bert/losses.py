"""Distillation loss terms, resolved by name from a registry (TextBrewer style).

Each term returns its value before weighting; ``kd_step`` weights them and logs each one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import CgfBertError
from .registry import Registry

Outputs = dict[str, "torch.Tensor | tuple[torch.Tensor, ...]"]  # logits, hidden, labels, mask
LossFn = Callable[[Outputs, Outputs], torch.Tensor]
LOSSES: Registry[LossFn] = Registry("loss")
register_loss = LOSSES.register
get_loss = LOSSES.lookup


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2
    (Hinton et al.) so its gradient scale does not shrink as T grows. Batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean") * t * t


def hidden_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers (embedding output and each layer) of the MSE over valid tokens.

    Each state is (B, T, H); ``mask`` is (B, T), 1 for real tokens. Padding positions
    are excluded, so the value does not depend on how a batch was padded.
    """
    if len(student) != len(teacher):
        raise CgfBertError(f"student has {len(student)} hidden states, teacher {len(teacher)}: layer maps differ")
    m = mask.unsqueeze(-1).float()  # (B, T, 1)
    denom = m.sum() * student[0].shape[-1]
    per_layer = [(((s.float() - t.float()) ** 2) * m).sum() / denom for s, t in zip(student, teacher)]
    return torch.stack(per_layer).mean()


@register_loss("ce")
def _ce(s: Outputs, t: Outputs) -> torch.Tensor:
    """Hard-label cross-entropy."""
    return F.cross_entropy(s["logits"], s["labels"])


@register_loss("kd")
def _kd(s: Outputs, t: Outputs) -> torch.Tensor:
    """Logit KD at the temperature in ``s['temperature']``."""
    return logit_kd(s["logits"], t["logits"], s["temperature"])


@register_loss("hidden_mse")
def _hidden(s: Outputs, t: Outputs) -> torch.Tensor:
    """Per-layer hidden-state MSE over valid tokens."""
    return hidden_mse(s["hidden"], t["hidden"], s["mask"])


def kd_terms(alpha: float, beta: float) -> list[dict]:
    """The reference objective as data: (1 - alpha) CE + alpha KD + beta hidden MSE."""
    terms = [{"loss": "ce", "weight": 1.0 - alpha}, {"loss": "kd", "weight": alpha}]
    if beta:
        terms.append({"loss": "hidden_mse", "weight": beta})
    return terms


def needs_hidden(terms: list[dict]) -> bool:
    """Whether the objective compares hidden states (so they must be computed and kept)."""
    return any(t["loss"] == "hidden_mse" for t in terms)


def make_kd_step(teacher: nn.Module | None, terms: list[dict], temperature: float, cache=None):
    """A ``train_step`` for ``fit``: the student is trained against the teacher's outputs.

    With a ``TeacherCache`` the teacher's outputs are looked up by the batch's ``idx``;
    otherwise ``teacher`` runs in eval mode under no_grad on each batch.
    """
    if cache is None:
        teacher.eval()
    fns = [(t["loss"], get_loss(t["loss"]), t["weight"]) for t in terms]
    need_hidden = needs_hidden(terms)

    def kd_step(model: nn.Module, batch):
        if cache is not None:
            t_logits, t_hidden = cache.lookup(batch["idx"], batch["input_ids"].shape[1], batch["input_ids"].device)
        else:
            with torch.no_grad():
                t_out = teacher(**batch, hidden_states=need_hidden)
            t_logits, t_hidden = t_out if need_hidden else (t_out, None)
        s_out = model(**batch, hidden_states=need_hidden)
        s_logits, s_hidden = s_out if need_hidden else (s_out, None)
        s = {"logits": s_logits, "hidden": s_hidden, "labels": batch["labels"], "mask": batch["attention_mask"], "temperature": temperature}
        t = {"logits": t_logits, "hidden": t_hidden}
        values = {name: fn(s, t) for name, fn, _ in fns}
        loss = sum(w * values[name] for name, _, w in fns)
        return loss, {k: v.detach() for k, v in values.items()}

    return kd_step
