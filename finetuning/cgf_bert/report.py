"""Build summary.md's tables from the run records in results/ (never typed by hand)."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

from .config import TrainConfig
from .plots import pyplot, save
from .precision import DEFAULT as FP32
from .records import RESULTS_DIR, distill_config, is_benchmark, load_records, record_variant, train_config, variant_label
from .stats import fmt_pm, mean_std, paired_diff, t_interval
from .sweeps import layer_table, markdown_rows, settings_table

# Recipe fields that must equal TrainConfig's defaults for a run to enter the main table.
RECIPE = ("model", "epochs", "lr", "batch_size", "weight_decay", "max_grad_norm", "freeze_embeddings", "max_length", "group_by_length",
          "precision", "limit")
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


def is_reference_recipe(rec: dict, but: tuple[str, ...] = ()) -> bool:
    """Whether a step-script run used the reference recipe (the fields in ``but`` aside)."""
    cfg, default = train_config(rec), TrainConfig()
    return all(getattr(cfg, k) == getattr(default, k) for k in RECIPE if k not in but) and rec["script"] in ("finetune", "distill")


def accuracy(runs: dict[int, dict]) -> dict[int, float]:
    """Seed -> best dev accuracy."""
    return {s: r["best"]["accuracy"] for s, r in runs.items()}


def latest_per_seed(records: list[dict]) -> dict[int, dict]:
    """One record per seed: the newest (records are sorted oldest first)."""
    return {r["seed"]: r for r in sorted(records, key=lambda r: r["name"])}


def run_seconds(rec: dict) -> float:
    """Training wall time plus, for distillation, computing the teacher's cached outputs."""
    return rec["wall_seconds"] + ((rec.get("distill") or {}).get("teacher_cache_seconds") or 0.0)


def training_records(records: list[dict]) -> list[dict]:
    """Records of step-script runs (not validate, experiment or benchmark records)."""
    return [r for r in records if "best" in r and not is_benchmark(r)]


def reference_groups(records: list[dict]) -> dict[str, dict[int, dict]]:
    """Variant -> seed -> newest record, over the step-script runs on the reference recipe."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in training_records(records):
        if is_reference_recipe(r):
            groups[record_variant(r)].append(r)
    return {name: latest_per_seed(runs) for name, runs in groups.items()}


def paired_deltas(groups: dict[str, dict[int, dict]]) -> dict[str, dict[int, float]]:
    """Variant -> seed -> dev accuracy minus the exact run's of the same seed (seeds both have)."""
    exact = groups.get("exact", {})
    return {name: paired_diff(accuracy(runs), accuracy(exact)) for name, runs in groups.items() if name != "exact"}


# Paired comparisons between CGF rows that the findings turn on: (question, row A, row B), read as A - B.
CONTRASTS = (
    ("KD over plain CE, c=0.5", "cgf c=0.5 KD beta=10 (pretrained init)", "cgf c=0.5 CE"),
    ("logit KD alone over plain CE, c=0.5", "cgf c=0.5 KD beta=0 (pretrained init)", "cgf c=0.5 CE"),
    ("hidden-state term, pretrained init", "cgf c=0.5 KD beta=10 (pretrained init)", "cgf c=0.5 KD beta=0 (pretrained init)"),
    ("hidden-state term, teacher init", "cgf c=0.5 KD beta=10 (teacher init)", "cgf c=0.5 KD beta=0 (teacher init)"),
    ("pretrained over teacher init, beta=10", "cgf c=0.5 KD beta=10 (pretrained init)", "cgf c=0.5 KD beta=10 (teacher init)"),
    ("pretrained over teacher init, beta=0", "cgf c=0.5 KD beta=0 (pretrained init)", "cgf c=0.5 KD beta=0 (teacher init)"),
    ("the two best recipes: beta=0 from the teacher over beta=10 from pretrained", "cgf c=0.5 KD beta=0 (teacher init)", "cgf c=0.5 KD beta=10 (pretrained init)"),
    ("c=0.65 over c=0.5, CE", "cgf c=0.65 CE", "cgf c=0.5 CE"),
    ("attention-output term (issue 11's best) over the recipe", "cgf c=0.5 KD beta=10 + attn_out=0.1 (pretrained init)", "cgf c=0.5 KD beta=10 (pretrained init)"),
)


def contrasts_table(records: list[dict]) -> str:
    """Markdown: for each pair of rows in ``CONTRASTS``, the per-seed difference A - B over common seeds."""
    groups = reference_groups(records)
    lines = [
        "| question | A − B | seeds | Δ acc (points) | 95% CI of Δ | seeds where A > B |",
        "|---|---|---|---|---|---|",
    ]
    for question, a, b in CONTRASTS:
        diffs = paired_diff(accuracy(groups.get(a, {})), accuracy(groups.get(b, {})))
        vals = list(diffs.values())
        ci = fmt_interval(vals)
        wins = f"{sum(v > 0 for v in vals)} of {len(vals)}" if vals else "—"
        lines.append(
            f"| {question} | {a} − {b} | {' '.join(map(str, diffs)) or '—'} | {fmt_pm(vals)} | {ci} | {wins} |"
        )
    return "\n".join(lines)


def row_order(name: str) -> tuple:
    return (name != "exact", name)


def fmt_interval(diffs: list[float]) -> str:
    """'[-2.07, +0.80]': the 95% t interval of the mean difference in points; '—' below two seeds."""
    interval = t_interval(diffs)
    return "—" if interval is None else f"[{interval[0] * 100:+.2f}, {interval[1] * 100:+.2f}]"


def results_table(records: list[dict]) -> str:
    """Markdown: per variant mean ± std over seeds, and paired difference to exact."""
    groups = reference_groups(records)
    deltas = paired_deltas(groups)
    lines = [
        "| variant | seeds | dev accuracy | dev F1 | paired Δ acc vs exact (n) | 95% CI of Δ | wall min / run | BERT-base reference acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(groups, key=row_order):
        runs = groups[name]
        seeds = sorted(runs)
        acc = [runs[s]["best"]["accuracy"] for s in seeds]
        f1 = [runs[s]["best"]["f1"] for s in seeds]
        pairs = list(deltas.get(name, {}).values())
        delta = "—" if not pairs else f"{fmt_pm(pairs, digits=2)} ({len(pairs)})"
        ci = fmt_interval(pairs)
        wall = mean_std(run_seconds(r) / 60 for r in runs.values())[0]
        ref = REFERENCE_BERT_BASE.get(name)
        lines.append(
            f"| {name} | {' '.join(map(str, seeds))} | {fmt_pm(acc)} | {fmt_pm(f1)} | {delta} | {ci} | {wall:.1f} | "
            f"{'—' if ref is None else f'{ref * 100:.2f}'} |"
        )
    return "\n".join(lines)


def precision_table(records: list[dict]) -> str:
    """Markdown: each variant trained at a precision other than fp32 (reference recipe otherwise),
    paired by seed with the same variant's fp32 runs (newest record per seed on both sides);
    variants with no fp32 run of a common seed are left out."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in training_records(records):
        if is_reference_recipe(r, but=("precision",)):
            cfg = train_config(r)
            base = variant_label(dataclasses.replace(cfg, precision=FP32), distill_config(r))
            groups[base, cfg.precision].append(r)
    lines = [
        "| variant | precision | seeds | dev accuracy | fp32, same seeds | paired Δ acc vs fp32 | 95% CI of Δ | seeds where lower precision ≥ fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (base, precision), runs in sorted(groups.items(), key=lambda kv: row_order(kv[0][0])):
        if precision == FP32:
            continue
        low = accuracy(latest_per_seed(runs))
        fp32 = accuracy(latest_per_seed(groups.get((base, FP32), [])))
        diffs = paired_diff(low, fp32)
        if not diffs:
            continue  # a variant run only at this precision (a bf16 screen): nothing to compare with
        vals = list(diffs.values())
        lines.append(
            f"| {base} | {precision} | {' '.join(map(str, low))} | {fmt_pm(low.values())} | {fmt_pm(fp32[s] for s in diffs)} | "
            f"{fmt_pm(vals)} | {fmt_interval(vals)} | {sum(v >= 0 for v in vals)} of {len(vals)} |"
        )
    return "\n".join(lines)


def plot_paired_deltas(records: list[dict], path: str | Path, target: float = -0.005) -> Path | None:
    """PNG: each variant's per-seed paired difference to exact (dots, labelled by seed) and their mean.

    A picture of the results table's Δ column that shows the spread the ± hides; None when no
    variant has a seed in common with the exact row yet.
    """
    deltas = {n: d for n, d in paired_deltas(reference_groups(records)).items() if d}
    if not deltas:
        return None
    plt = pyplot()
    names = sorted(deltas, key=row_order, reverse=True)  # first row at the top
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 2.0))
    for y, name in enumerate(names):
        seeds, vals = zip(*deltas[name].items())
        pts = [v * 100 for v in vals]
        ax.scatter(pts, [y] * len(pts), color="tab:blue", alpha=0.6, zorder=3, label="one seed" if y == 0 else None)
        # Seed labels cycle through four heights in x order, so that tied or close points stay legible.
        for i, (x, s) in enumerate(sorted(zip(pts, seeds))):
            ax.annotate(str(s), (x, y), textcoords="offset points", xytext=(0, (6, -13, 14, -21)[i % 4]), ha="center", fontsize=7, color="tab:blue")
        ax.plot([mean_std(pts)[0]], [y], marker="D", color="black", ms=7, ls="", zorder=4, label="mean" if y == 0 else None)
    ax.axvline(0, color="gray", lw=1)
    ax.axvline(target * 100, color="tab:red", ls="--", lw=1, label=f"target ({target * 100:+.1f} points)")
    ax.set_yticks(range(len(names)), [f"{n} (n={len(deltas[n])})" for n in names])
    ax.set_xlabel("dev accuracy minus the exact run of the same seed (points)")
    ax.set_title("CGF vs exact softmax, paired by seed (MRPC dev)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    return save(fig, path)


def runs_table(records: list[dict]) -> str:
    """Markdown: every run record, with its command, seed, result, time and code version."""
    lines = [
        "| record | command | seed | best epoch | dev acc | dev F1 | wall min | device | code |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(training_records(records), key=lambda r: r["name"]):
        b = r["best"]
        lines.append(
            f"| `{Path(r['_path']).name}` | `{r['command']}` | {r['seed']} | {r['best_epoch']} | {b['accuracy']:.4f} | "
            f"{b['f1']:.4f} | {r['wall_seconds'] / 60:.1f} | {r['device']} | {r['code_version']} |"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` (floats to 3 significant figures)."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return markdown_rows(cols, [[fmt(r.get(c)) for c in cols] for r in rows])


def latest_benchmark(records: list[dict], name: str) -> dict | None:
    """The newest benchmark record that has table ``name``."""
    found = [r for r in records if is_benchmark(r) and Path(r["_path"]).name.startswith("bench-") and name in r]
    return max(found, key=lambda r: r["_path"]) if found else None


def benchmark_table(name: str):
    def render(records: list[dict]) -> str:
        rec = latest_benchmark(records, name)
        if rec is None:
            return f"(no benchmark record with {'an' if name[0] in 'aeiou' else 'a'} {name} table yet)"
        head = f"`{Path(rec['_path']).name}` — {rec['device']}, code {rec['code_version']}, `{rec['command']}`\n\n"
        return head + markdown_table(rec[name], rec["columns"][name])

    return render


# Table markers in summary.md; ``bench_NAME`` renders the newest benchmark record's NAME table
# with the columns the benchmark wrote into its record.
TABLES = {"results": results_table, "contrasts": contrasts_table, "precision": precision_table, "runs": runs_table}


# An experiment's record -> its markdown table, by experiment name; the default is the settings
# table of loss_ablation and variant_compare (rows paired against exact).
EXPERIMENT_TABLES = {"layer_sensitivity": layer_table}


def experiment_table(stem: str):
    """The table of one experiment record (``results/experiments/STEM.json``): loss_ablation's and
    variant_compare's settings table, or the experiment's own in ``EXPERIMENT_TABLES``."""

    def render(records: list[dict]) -> str:
        found = [r for r in records if Path(r.get("_path", "")).parent.name == "experiments" and Path(r["_path"]).stem == stem]
        if not found:
            return f"(no experiment record {stem}.json)"
        rec = found[0]
        table = EXPERIMENT_TABLES.get(stem.split("-")[0], lambda r: settings_table(r["rows"], r.get("base_label")))
        return f"`{stem}.json` — `{rec['command']}`\n\n" + table(rec)

    return render


def table(name: str):
    """The renderer of a ``<!-- table:NAME -->`` marker: ``bench_X`` (the newest benchmark's X),
    ``experiment:STEM`` (one experiment record's table), or a name in ``TABLES``."""
    if name.startswith("bench_"):
        return benchmark_table(name.removeprefix("bench_"))
    if name.startswith("experiment:"):
        return experiment_table(name.removeprefix("experiment:"))
    return TABLES[name]


def render(text: str, records: list[dict]) -> str:
    """Replace each ``<!-- table:NAME -->...<!-- /table -->`` block with a fresh table."""

    def fill(m: re.Match) -> str:
        return f"<!-- table:{m.group(1)} -->\n{table(m.group(1))(records)}\n<!-- /table -->"

    return re.sub(r"<!-- table:([\w:-]+) -->.*?<!-- /table -->", fill, text, flags=re.S)


def rebuild(summary: str | Path, results_dir: str | Path = RESULTS_DIR) -> tuple[int, Path | None]:
    """Rewrite the tables in ``summary`` in place and redraw the paired-difference plot
    (``results/paired_deltas.png``); returns the number of records used and the plot's path."""
    records = load_records(results_dir)
    path = Path(summary)
    path.write_text(render(path.read_text(), records))
    return len(records), plot_paired_deltas(records, Path(results_dir) / "paired_deltas.png")
