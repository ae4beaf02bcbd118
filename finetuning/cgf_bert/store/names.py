"""Names and labels of runs, rendered from their recipe values (never parsed back)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from cgf_bert.approx.approximations import Approximations
from cgf_bert.config import EXACT, PRECISION, TASK, DistillConfig, TrainConfig
from cgf_bert.objective import LossTerm, objective_label, objective_slug
from cgf_bert.store.records import distill_config, train_config


def method_label(dcfg: DistillConfig | None) -> str:
    """'CE', or 'KD beta=10 (pretrained init)': how a variant was trained."""
    return "CE" if dcfg is None else f"{objective_label(dcfg.terms)} ({dcfg.init} init)"


@dataclass(frozen=True)
class Variant:
    """A results-table row's identity, by value: what was replaced, how it was trained (the
    objective and the student's start; None for CE), the precision and the task. Rows, reference
    figures and contrasts are keyed by it; its label is only rendered."""

    approx: Approximations
    method: tuple[tuple[LossTerm, ...], str] | None
    precision: str = PRECISION
    task: str = TASK

    @classmethod
    def of(cls, cfg: TrainConfig, dcfg: DistillConfig | None) -> "Variant":
        return cls(cfg.approx, None if dcfg is None else (dcfg.terms, dcfg.init), cfg.precision, cfg.task)

    @classmethod
    def of_record(cls, rec: dict) -> "Variant":
        return cls.of(train_config(rec), distill_config(rec))

    def label(self) -> str:
        """'exact', 'cgf c=0.65 CE', 'cgf c=0.5 KD beta=10 (pretrained init)'; a precision other than
        fp32 and a task other than MRPC are named at the end ('exact, bf16')."""
        method = "CE" if self.method is None else f"{objective_label(self.method[0])} ({self.method[1]} init)"
        label = "exact" if self.method is None and self.approx == EXACT else f"{self.approx.label()} {method}"
        label = label if self.precision == PRECISION else f"{label}, {self.precision}"
        return label if self.task == TASK else f"{label}, {self.task}"


def variant_label(cfg: TrainConfig, dcfg: DistillConfig | None) -> str:
    """The label of the row a run belongs to (``Variant.label``)."""
    return Variant.of(cfg, dcfg).label()


def run_name(script: str, cfg: TrainConfig, dcfg: DistillConfig | None = None) -> str:
    """'20261125-031500-distill-cgf0.5-b10-pretrained-s42': time, script, variant, precision unless fp32, seed."""
    task = "" if cfg.task == TASK else f"-{cfg.task}"
    method = "" if dcfg is None else f"-{objective_slug(dcfg.terms)}-{dcfg.init}"
    precision = "" if cfg.precision == PRECISION else f"-{cfg.precision}"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{script}{task}-{capped(cfg.approx.slug())}{method}{precision}-s{cfg.seed}"


SLUG_MAX = 120  # file systems cap a name at 255 bytes; the longest suffix (.metrics.jsonl, .state.pt) and the rest fit


def capped(slug: str, limit: int = SLUG_MAX) -> str:
    """The slug itself when short; else its start and a hash of the whole (six per-layer LayerNorm
    constants make a slug of 250 characters). The record holds the full spec either way."""
    if len(slug) <= limit:
        return slug
    return f"{slug[:limit - 9]}-{hashlib.sha256(slug.encode()).hexdigest()[:8]}"


