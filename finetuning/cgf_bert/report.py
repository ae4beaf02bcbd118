"""Build summary.md's tables from the run records in results/ (never typed by hand)."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

from .config import TrainConfig
from .records import RESULTS_DIR, load_records
from .stats import fmt_pm, mean_std

# Recipe fields that must equal TrainConfig's defaults for a run to enter the main table.
RECIPE = ("model", "epochs", "lr", "batch_size", "weight_decay", "max_grad_norm", "freeze_embeddings", "max_length", "group_by_length", "limit")
# BERT-base MRPC dev accuracy from the method's reference results (not measured here).
REFERENCE_BERT_BASE = {
    "exact": 0.8630,
    "cgf c=0.5 KD beta=10 (teacher init)": 0.8595,
    "cgf c=0.5 KD beta=10 (pretrained init)": 0.8595,
    "cgf c=0.5 KD beta=0 (teacher init)": 0.799,
    "cgf c=0.5 KD beta=0 (pretrained init)": 0.799,
    "cgf c=0.65 CE": 0.8194,
    "cgf c=0.5 CE": 0.7273,
}


def variant(rec: dict) -> str:
    """A row label: softmax, coefficient and training method."""
    cfg = rec["config"]
    if cfg["softmax"] == "exact":
        return "exact"
    label = f"cgf c={cfg['coeff']:g}"
    if rec["script"] == "distill":
        d = rec["distill"]
        return f"{label} KD beta={d['beta']:g} ({d['init']} init)"
    return f"{label} CE"


def is_reference_recipe(rec: dict) -> bool:
    default = dataclasses.asdict(TrainConfig())
    return all(rec["config"].get(k) == default[k] for k in RECIPE) and rec["script"] in ("finetune", "distill")


def latest_per_seed(records: list[dict]) -> dict[int, dict]:
    """One record per seed: the newest (records are sorted oldest first)."""
    return {r["seed"]: r for r in sorted(records, key=lambda r: r["name"])}


def results_table(records: list[dict]) -> str:
    """Markdown: per variant mean ± std over seeds, and paired difference to exact."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if is_reference_recipe(r):
            groups[variant(r)].append(r)
    exact = latest_per_seed(groups.get("exact", []))
    lines = [
        "| variant | seeds | dev accuracy | dev F1 | paired Δ acc vs exact (n) | wall min / run | BERT-base reference acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(groups, key=lambda n: (n != "exact", n)):
        runs = latest_per_seed(groups[name])
        seeds = sorted(runs)
        acc = [runs[s]["best"]["accuracy"] for s in seeds]
        f1 = [runs[s]["best"]["f1"] for s in seeds]
        pairs = [runs[s]["best"]["accuracy"] - exact[s]["best"]["accuracy"] for s in seeds if s in exact]
        delta = "—" if name == "exact" or not pairs else f"{fmt_pm(pairs, digits=2)} ({len(pairs)})"
        wall = mean_std(r["wall_seconds"] / 60 for r in runs.values())[0]
        ref = REFERENCE_BERT_BASE.get(name)
        lines.append(
            f"| {name} | {' '.join(map(str, seeds))} | {fmt_pm(acc)} | {fmt_pm(f1)} | {delta} | {wall:.1f} | "
            f"{'—' if ref is None else f'{ref * 100:.2f}'} |"
        )
    return "\n".join(lines)


def runs_table(records: list[dict]) -> str:
    """Markdown: every run record, with its command, seed, result, time and code version."""
    lines = [
        "| record | command | seed | best epoch | dev acc | dev F1 | wall min | device | code |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: r["name"]):
        b = r["best"]
        lines.append(
            f"| `{Path(r['_path']).name}` | `{r['command']}` | {r['seed']} | {r['best_epoch']} | {b['accuracy']:.4f} | "
            f"{b['f1']:.4f} | {r['wall_seconds'] / 60:.1f} | {r['device']} | {r['code_version']} |"
        )
    return "\n".join(lines)


TABLES = {"results": results_table, "runs": runs_table}


def render(text: str, records: list[dict]) -> str:
    """Replace each ``<!-- table:NAME -->...<!-- /table -->`` block with a fresh table."""

    def fill(m: re.Match) -> str:
        return f"<!-- table:{m.group(1)} -->\n{TABLES[m.group(1)](records)}\n<!-- /table -->"

    return re.sub(r"<!-- table:(\w+) -->.*?<!-- /table -->", fill, text, flags=re.S)


def rebuild(summary: str | Path, results_dir: str | Path = RESULTS_DIR) -> int:
    """Rewrite the tables in ``summary`` in place; returns the number of records used."""
    records = [r for r in load_records(results_dir) if "best" in r]
    path = Path(summary)
    path.write_text(render(path.read_text(), records))
    return len(records)
