"""Experiments over softmaxes, coefficients and seeds, reusing run records where they exist.

A run whose record (same recipe, variant and seed) is already in the results folder is not
repeated: its record is read back. Pass ``reuse=False`` to train anew.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .checkpoint import load_model
from .config import DistillConfig, TrainConfig
from .records import RESULTS_DIR, load_records, write_json
from .data import make_loader
from .engine import evaluate, resolve_device
from .runs import distill, finetune, prepare_data
from .plots import pyplot, save
from .stats import mean_std

log = logging.getLogger(__name__)


def _recorded(values: dict, cls) -> dict:
    """A record's ``cls`` settings; a field the record predates takes its default.

    A field is added with the default that keeps the old behaviour (``compile`` came after
    the first runs, off by default), so an older record ran with that default.
    """
    return {f.name: values.get(f.name, f.default) for f in dataclasses.fields(cls)}


def _same_run(rec: dict, cfg: TrainConfig, dcfg: DistillConfig | None) -> bool:
    want = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "data_dir")}
    recorded = _recorded(rec["config"], TrainConfig)
    got = {k: recorded[k] for k in want}
    if cfg.softmax == "exact":
        got["coeff"] = want["coeff"]  # the coefficient means nothing for the exact softmax
    if got != want or rec["script"] != ("distill" if dcfg else "finetune"):
        return False
    return dcfg is None or _recorded(rec["distill"], DistillConfig) == dataclasses.asdict(dcfg)


def find_record(cfg: TrainConfig, dcfg: DistillConfig | None = None, results_dir: str | Path = RESULTS_DIR) -> dict[str, Any] | None:
    """The newest record of this exact run (recipe, variant and seed), or None."""
    found = [r for r in load_records(results_dir) if "config" in r and _same_run(r, cfg, dcfg)]
    return found[-1] if found else None


def run_or_reuse(cfg: TrainConfig, dcfg: DistillConfig | None = None, teacher: str | None = None,
                 results_dir: str | Path = RESULTS_DIR, reuse: bool = True) -> dict[str, Any]:
    """The record of a fine-tune (or distillation with ``dcfg``), training only if none exists."""
    if reuse and (rec := find_record(cfg, dcfg, results_dir)):
        log.warning("reusing %s", Path(rec["_path"]).name)
        return rec
    if dcfg:
        return distill(cfg, dcfg, teacher, results_dir=results_dir)
    return finetune(cfg, results_dir=results_dir)


def swap_at_eval(checkpoint: str | Path, coeffs: list[float], cfg: TrainConfig) -> list[dict[str, Any]]:
    """Score one checkpoint with the exact softmax and with CGF at each coefficient, no training."""
    device = resolve_device(cfg.device)
    model, meta = load_model(checkpoint)  # loaded once; only the softmax changes between rows
    model.to(device)
    tokenizer, data = prepare_data(meta["model"], cfg.data_dir, cfg.max_length)
    loader = make_loader(data["validation"], tokenizer, cfg.eval_batch_size)
    rows = []
    for kind, c in [("exact", None)] + [("cgf", c) for c in coeffs]:
        model.set_softmax(kind, meta["coeff"] if c is None else c)
        rows.append({"softmax": kind, "coeff": c, **evaluate(model, loader, device)})
    return rows


def paired(a: list[dict], b: list[dict]) -> dict[str, Any]:
    """Per-seed accuracy differences b - a over the seeds both have."""
    acc_a = {r["seed"]: r["best"]["accuracy"] for r in a}
    acc_b = {r["seed"]: r["best"]["accuracy"] for r in b}
    seeds = sorted(set(acc_a) & set(acc_b))
    diffs = [acc_b[s] - acc_a[s] for s in seeds]
    m, sd = mean_std(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": m, "std": sd}


def save_experiment(name: str, payload: dict, results_dir: str | Path = RESULTS_DIR) -> Path:
    """Experiment summaries go to results/experiments/ (kept apart from the run records)."""
    return write_json(Path(results_dir) / "experiments" / f"{name}.json", payload)


def plot_accuracy_vs_coeff(points: dict[float, list[float]], path: str | Path, title: str, hline: float | None = None,
                           hline_label: str = "exact softmax") -> Path:
    """PNG of mean dev accuracy vs coefficient with std error bars (one point per coefficient)."""
    plt = pyplot()
    cs = sorted(points)
    stats = [mean_std(points[c]) for c in cs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(cs, [m * 100 for m, _ in stats], yerr=[s * 100 for _, s in stats], marker="o", capsize=4, label="CGF")
    if hline is not None:
        ax.axhline(hline * 100, color="gray", ls="--", label=hline_label)
    ax.set_xlabel("CGF variance coefficient c")
    ax.set_ylabel("MRPC dev accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)
