"""Run records: one JSON per run (config, per-epoch metrics, best epoch, test predictions)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from cgf_bert.approx.approximations import EXACT, Approximations
from cgf_bert.approx.softmax import legacy_softmax
from cgf_bert.config import TASK, DistillConfig, TrainConfig
from cgf_bert.data.tasks import get_task
from cgf_bert.objective import LossTerm
from cgf_bert.store.atomic import atomic_write
from cgf_bert.store.provenance import RESULTS_DIR

# ---------------------------------------------------------------- configs in records
# A record holds its configs as JSON (``config_json``). Records written before a field existed
# are read by one rule (``migrate``), applied wherever records are read, so that every consumer
# (reuse, tables, resume) sees the same values.


def config_json(cfg) -> dict[str, Any]:
    """A TrainConfig or DistillConfig as JSON: the approximations as their specs, the objective as its terms."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.to_json() if isinstance(v, Approximations) else [t.to_json() for t in v] if f.name == "terms" else v
    return out


def migrate(rec: dict) -> dict:
    """``rec`` in today's form (a copy where anything changes; idempotent). The rule for fields a
    record predates: a field is added with the default that keeps the old behaviour.

    - ``config.softmax`` (a spec, or before specs a kind's name with ``coeff`` apart) becomes
      ``config.approx``: that softmax, every other op exact (the only ops there were);
    - no ``config.task``: MRPC, the only task before tasks; no ``data_fingerprint``: the
      fingerprint of the GLUE MRPC TSVs that every such record ran on (``data.tasks``);
    - a distillation whose kd term has no temperature kept it apart as ``distill.temperature``;
    - ``compile`` (off) and ``precision`` (fp32) are absent from the first records: their
      defaults, when the config is built (``train_config``).
    """
    if "config" not in rec:
        return rec
    rec, config = dict(rec), dict(rec["config"])
    if "softmax" in config:
        softmax = legacy_softmax(config.pop("softmax"), config.pop("coeff", None))
        config["approx"] = EXACT.replace(softmax=softmax).to_json()
    config.setdefault("task", TASK)
    rec["config"] = config
    rec.setdefault("data_fingerprint", get_task(config["task"]).reference_fingerprint)
    d = rec.get("distill")
    if d and "temperature" in d:
        d = dict(d)
        temperature = float(d.pop("temperature"))
        d["terms"] = [{**t, "temperature": temperature} if t["loss"] == "kd" and "temperature" not in t else t for t in d["terms"]]
        rec["distill"] = d
    return rec


def train_config(rec: dict) -> TrainConfig:
    """The TrainConfig a record ran with (``migrate``'s rule for the fields it predates)."""
    values = dict(migrate(rec)["config"])
    values["approx"] = Approximations.from_json(values["approx"])
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


def distill_config(rec: dict) -> DistillConfig | None:
    """The DistillConfig of a distillation record (None for a fine-tune)."""
    d = migrate(rec).get("distill")
    if not d:
        return None
    terms = tuple(LossTerm.from_json(t) for t in d["terms"])
    names = {f.name for f in dataclasses.fields(DistillConfig)} - {"terms"}
    return DistillConfig(terms=terms, **{k: v for k, v in d.items() if k in names})


def strict_json(obj: Any, reasons: dict[str, str] | None = None, where: str = "") -> tuple[Any, list[dict[str, str]]]:
    """``obj`` with each non-finite float replaced by None, and a note for each: where, what and
    why (the first of ``reasons``, a key-path fragment -> reason, that matches). Strict JSON
    (RFC 8259) has no nan or inf; a record says what happened instead."""
    notes: list[dict[str, str]] = []

    def walk(x, at):
        if isinstance(x, dict):
            return {k: walk(v, f"{at}.{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):
            why = next((r for key, r in (reasons or {}).items() if key in at), "not a finite number")
            notes.append({"at": at.lstrip("."), "value": str(x), "reason": why})
            return None
        return x

    return walk(obj, where), notes


def free_stamp(folder: str | Path, *names: str, start: float | None = None) -> str:
    """The first time stamp (``%Y%m%d-%H%M%S``, from ``start``, default now) that none of ``names`` (each with
    ``{}`` for the stamp) takes in ``folder``: two runs begun in the same second, side by side, keep both records."""
    t = time.time() if start is None else start
    while True:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(t))
        if not any((Path(folder) / name.format(stamp)).exists() for name in names):
            return stamp
        t += 1


def write_json(path: str | Path, obj: Any) -> Path:
    """Write strict JSON (no NaN or Infinity: RFC 8259) atomically."""
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text), binary=False)


def is_benchmark(rec: dict) -> bool:
    """Whether a record belongs to a benchmark (``results/benchmarks/``): its fine-tunes time the
    machine and stay out of the tables and of record reuse, which take the step-script runs."""
    return "benchmarks" in Path(rec.get("_path", "")).parts


def load_records(results_dir: str | Path = RESULTS_DIR) -> list[dict]:
    """Every run record (``*.json``) under ``results_dir``, oldest first."""
    paths = sorted(Path(results_dir).rglob("*.json"))
    return [migrate(json.loads(p.read_text())) | {"_path": str(p)} for p in paths]

def save_experiment(name: str, payload: dict, results_dir: str | Path = RESULTS_DIR) -> Path:
    """Experiment summaries go to results/experiments/ (kept apart from the run records)."""
    return write_json(Path(results_dir) / "experiments" / f"{name}.json", payload)


