"""Distillation loss terms: registry entries that declare what they need, and term values.

A ``LossKind`` (registry entry) holds the function ``(student, teacher, batch, **params) ->
scalar``, the model outputs it needs from student and teacher (``logits``, ``hidden``,
``attentions``), and its parameters (the logit term's temperature). A ``LossTerm`` is a value:
a kind's name, its weight and parameter values; an objective is a tuple of terms (TextBrewer
style), stored in run records as data. Each term's value is returned before weighting and
logged. The reference objective ``(1 - alpha) CE + alpha KD_T + beta hidden MSE`` is the
preset ``kd_preset(alpha, temperature, beta)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import CgfBertError
from .registry import Param, Registry, resolve_params

Outputs = dict[str, Any]  # a model forward's dict: logits, hidden, attentions
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossKind:
    """A registered loss term: its function, the outputs it reads, and its parameters."""

    name: str
    fn: Callable[..., torch.Tensor]  # (student outputs, teacher outputs, batch, **params) -> scalar
    needs: frozenset[str] = frozenset({"logits"})  # outputs read from the student and the teacher
    params: tuple[Param, ...] = ()
    uses_teacher: bool = True
    doc: str = ""


LOSSES: Registry[LossKind] = Registry("loss")


def register_loss(name: str, needs: tuple[str, ...] = ("logits",), params: tuple[Param, ...] = (), uses_teacher: bool = True):
    """Decorator: register ``fn`` as loss term ``name``."""

    def deco(fn):
        LOSSES[name] = LossKind(name, fn, frozenset(needs), tuple(params), uses_teacher, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def get_loss(name: str) -> LossKind:
    return LOSSES.lookup(name)


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of an objective: ``weight * kind(student, teacher, **params)``."""

    name: str
    weight: float
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, name: str, weight: float, **params) -> "LossTerm":
        kind = get_loss(name)
        w = Param("weight", float, 1.0, "", min=0.0).check(weight, f"loss {name!r} ")
        return cls(name, w, resolve_params(kind.params, params, f"loss {name!r}"))

    @property
    def kind(self) -> LossKind:
        return get_loss(self.name)

    def __call__(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        return self.kind.fn(student, teacher, batch, **dict(self.params))

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.name, "weight": self.weight, **dict(self.params)}

    @classmethod
    def from_json(cls, obj: dict, temperature: float | None = None) -> "LossTerm":
        """Read ``to_json``'s form; records made before terms carried parameters kept the KD
        temperature apart (pass it as ``temperature``)."""
        obj = dict(obj)
        name, weight = obj.pop("loss"), obj.pop("weight")
        if name == "kd" and "temperature" not in obj and temperature is not None:
            obj["temperature"] = temperature
        return cls.make(name, weight, **obj)


def needs(terms: tuple[LossTerm, ...]) -> tuple[str, ...]:
    """The model outputs besides the logits that an objective reads (sorted, for the forward)."""
    return tuple(sorted(set().union(*(t.kind.needs for t in terms)) - {"logits"}))


# ---------------------------------------------------------------- the terms


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


@register_loss("ce", uses_teacher=False)
def _ce(s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
    """Hard-label cross-entropy."""
    return F.cross_entropy(s["logits"], batch["labels"])


@register_loss("kd", params=(Param("temperature", float, 2.0, "KD temperature T (the KL term is scaled by T^2)", above=0.0),))
def _kd(s: Outputs, t: Outputs, batch: Batch, temperature: float = 2.0) -> torch.Tensor:
    """Logit KD: T^2 KL(teacher_T || student_T)."""
    return logit_kd(s["logits"], t["logits"], temperature)


@register_loss("hidden_mse", needs=("hidden",))
def _hidden(s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
    """Per-layer hidden-state MSE over valid tokens."""
    return hidden_mse(s["hidden"], t["hidden"], batch["attention_mask"])


# ---------------------------------------------------------------- the preset and its label


def kd_preset(alpha: float, temperature: float, beta: float) -> tuple[LossTerm, ...]:
    """The reference objective as data: (1 - alpha) CE + alpha KD_T + beta hidden MSE."""
    terms = [LossTerm.make("ce", 1.0 - alpha), LossTerm.make("kd", alpha, temperature=temperature)]
    if beta:
        terms.append(LossTerm.make("hidden_mse", beta))
    return tuple(terms)


PRESET_DEFAULTS = {"alpha": 0.5, "temperature": 2.0}  # shown in a label only when they differ


def split_preset(terms: tuple[LossTerm, ...]) -> tuple[dict[str, float], tuple[LossTerm, ...]]:
    """(alpha, temperature, beta) of the preset part of an objective, and the other terms."""
    by_name = {t.name: t for t in terms}
    kd = by_name.get("kd")
    preset = {
        "alpha": kd.weight if kd else 0.0,
        "temperature": dict(kd.params)["temperature"] if kd else PRESET_DEFAULTS["temperature"],
        "beta": by_name["hidden_mse"].weight if "hidden_mse" in by_name else 0.0,
    }
    rest = tuple(t for t in terms if t.name not in ("ce", "kd", "hidden_mse"))
    return preset, rest


def objective_label(terms: tuple[LossTerm, ...]) -> str:
    """'KD beta=10', 'KD beta=0 alpha=0.9', 'KD beta=10 + attn_kl=1': the method part of a row label."""
    preset, rest = split_preset(terms)
    parts = [f"KD beta={preset['beta']:g}"]
    parts += [f"{k}={preset[k]:g}" if k != "temperature" else f"T={preset[k]:g}" for k in PRESET_DEFAULTS if preset[k] != PRESET_DEFAULTS[k]]
    return " ".join(parts) + "".join(f" + {t.name}={t.weight:g}" for t in rest)


def objective_slug(terms: tuple[LossTerm, ...]) -> str:
    """'b10', 'b10-attn_kl1': the method part of a run's file name."""
    preset, rest = split_preset(terms)
    return "-".join([f"b{preset['beta']:g}", *(f"{t.name}{t.weight:g}" for t in rest)])


# ---------------------------------------------------------------- the step


def make_kd_step(teacher: nn.Module | None, terms: tuple[LossTerm, ...], cache=None):
    """A ``train_step`` for ``fit``: the student is trained against the teacher's outputs.

    With a ``TeacherCache`` the teacher's outputs are looked up by the batch's ``idx``;
    otherwise ``teacher`` runs in eval mode under no_grad on each batch. Both model calls
    ask for exactly the outputs the terms need.
    """
    if cache is None:
        teacher.eval()
    need = needs(terms)

    def kd_step(model: nn.Module, batch: Batch):
        if cache is not None:
            t_out = cache.lookup(batch["idx"], batch["input_ids"].shape[1], batch["input_ids"].device)
        else:
            with torch.no_grad():
                t_out = teacher(**batch, needs=need)
        s_out = model(**batch, needs=need)
        values = {t.name: t(s_out, t_out, batch) for t in terms}
        loss = sum(t.weight * values[t.name] for t in terms)
        return loss, {k: v.detach() for k, v in values.items()}

    return kd_step
