"""Distillation objectives as data: the loss registry, weighted terms, the reference preset, and their labels.

A ``LossKind`` (registry entry) holds the function ``(student, teacher, batch, **params) ->
scalar``, the model outputs it needs from student and teacher (``logits``, ``hidden``,
``attentions``), and its parameters (the logit term's temperature); the entries register from
``train/losses.py``. A ``LossTerm`` is a value: a kind's name, its weight and parameter values;
an objective is a tuple of terms (TextBrewer style), stored in run records as data. The
reference objective ``(1 - alpha) CE + alpha KD_T + beta hidden MSE`` is the preset
``kd_preset(alpha, temperature, beta)``. Nothing here runs a loss, so records, names and
tables read objectives without the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from cgf_bert import CgfBertError
from cgf_bert.registry import Param, Registry, resolve_params

Outputs = dict[str, Any]  # a model forward's dict: logits, hidden, attentions


@dataclass(frozen=True)
class LossKind:
    """A registered loss term: its function, the outputs it reads, and its parameters."""

    name: str
    fn: Callable[..., Any]  # (student outputs, teacher outputs, batch, **params) -> scalar
    needs: frozenset[str] = frozenset({"logits"})  # outputs read from the student and the teacher
    params: tuple[Param, ...] = ()
    uses_teacher: bool = True
    stateful: bool = False  # fn takes ``state=``, a dict kept across the steps of one run (a memory)
    doc: str = ""
    prepare: Callable[..., dict] | None = None  # (teacher cache, **params) -> the state a run starts from


LOSSES: Registry[LossKind] = Registry("loss")


def register_loss(name: str, needs: tuple[str, ...] = ("logits",), params: tuple[Param, ...] = (), uses_teacher: bool = True,
                  stateful: bool = False, prepare: Callable[..., dict] | None = None):
    """Decorator: register ``fn`` as loss term ``name`` (``prepare``: a stateful term's first state, made
    once before training from the teacher's cached training outputs)."""

    def deco(fn):
        doc = ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        LOSSES[name] = LossKind(name, fn, frozenset(needs), tuple(params), uses_teacher, stateful or prepare is not None, doc, prepare)
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

    @classmethod
    def parse(cls, text: str) -> "LossTerm":
        """'attn_kl=1', 'value_rel=1,layer=5': the command-line form NAME=WEIGHT[,param=value...]."""
        head, *rest = text.split(",")
        name, eq, weight = head.partition("=")
        params = dict(item.split("=", 1) for item in rest if "=" in item)
        if not eq or len(params) != len(rest):
            raise CgfBertError(f"a loss term is NAME=WEIGHT[,param=value...], got {text!r}")
        return cls.make(name.strip(), weight, **params)

    @property
    def kind(self) -> LossKind:
        return get_loss(self.name)

    def __call__(self, student: Outputs, teacher: Outputs, batch: dict, state: dict | None = None):
        extra = {"state": state if state is not None else {}} if self.kind.stateful else {}
        return self.kind.fn(student, teacher, batch, **dict(self.params), **extra)

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.name, "weight": self.weight, **dict(self.params)}

    @classmethod
    def from_json(cls, obj: dict) -> "LossTerm":
        """Read ``to_json``'s form as it was written (checked when it was made; parameters in
        their declared order), without the registry: records are read where no loss is run."""
        obj = dict(obj)
        name, weight = obj.pop("loss"), obj.pop("weight")
        return cls(name, float(weight), tuple(obj.items()))


def needs(terms: tuple[LossTerm, ...]) -> tuple[str, ...]:
    """The model outputs besides the logits that an objective reads (sorted, for the forward)."""
    return tuple(sorted(set().union(*(t.kind.needs for t in terms)) - {"logits"}))


def kd_preset(alpha: float, temperature: float, beta: float) -> tuple[LossTerm, ...]:
    """The reference objective as data: (1 - alpha) CE + alpha KD_T + beta hidden MSE."""
    # Built as ``LossTerm.make`` would build them (floats, the kd term's one parameter), without
    # the registry, so that configs and records have their defaults before any loss is registered.
    terms = [LossTerm("ce", float(1.0 - alpha)), LossTerm("kd", float(alpha), (("temperature", float(temperature)),))]
    if beta:
        terms.append(LossTerm("hidden_mse", float(beta)))
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


