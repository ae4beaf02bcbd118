"""summary.md's tables and its paired-difference plot, rebuilt from the committed records."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from cgf_bert.report.compare import layer_table, settings_table
from cgf_bert.report.plots import pyplot, save
from cgf_bert.report.stats import mean_std, t_interval
from cgf_bert.report.tables import (
    EQUIVALENCE_MARGIN,
    benchmark_table,
    contrasts_table,
    paired_deltas,
    precision_table,
    reference_groups,
    results_table,
    runs_table,
)
from cgf_bert.store.provenance import RESULTS_DIR
from cgf_bert.store.records import load_records

FAMILIES = ("CGF, CE", "CGF, distilled", "polynomial students", "other softmaxes", "per-layer placement")


def family(key) -> str:
    """The forest plot's group of a row: what kind of comparison it is."""
    a = key.approx
    if a.softmax.layers or a.softmax.is_exact:
        return "per-layer placement"
    if any(op != "softmax" for op in a.replaced()):
        return "polynomial students"
    if a.softmax.name not in ("cgf", "cgf_poly"):
        return "other softmaxes"
    return "CGF, CE" if key.method is None else "CGF, distilled"


def _forest_rows(deltas: dict) -> list[tuple[str, object]]:
    """(y label, key) top to bottom: a family header (key None), then its rows by mean, best first.
    Labels are wrapped whole, never shortened: two settings that differ at the end stay apart."""
    rows: list = []
    for fam in FAMILIES:
        keys = sorted((k for k in deltas if family(k) == fam), key=lambda k: -mean_std(deltas[k].values())[0])
        if keys:
            rows += [(fam, None)] + [(textwrap.fill(k.label(), 70), k) for k in keys]
    return rows


def _row_heights(labels: list[str]) -> list[float]:
    """Each row's height in row units: two 7 pt lines fit one; each line more adds 0.4."""
    return [1 + 0.4 * max(0, t.count("\n") - 1) for t in labels]


def plot_paired_deltas(records: list[dict], path: str | Path, margin: float = EQUIVALENCE_MARGIN) -> Path | None:
    """PNG, a forest plot: each row's paired difference to exact, the mean with its 95 % t interval,
    the seeds as faint points and n beside it; rows grouped by family and ordered by mean within
    each, the equivalence margin shaded. None when no row shares a seed with the exact row yet."""
    deltas = {k: d for k, d in paired_deltas(reference_groups(records)).items() if d}
    if not deltas:
        return None
    plt = pyplot()
    rows = _forest_rows(deltas)
    heights = _row_heights([t for t, _ in rows])
    fig, ax = plt.subplots(figsize=(10, 0.32 * sum(heights) + 1.6))
    ax.axvspan(-margin, margin, color="tab:green", alpha=0.12, lw=0, label=f"equivalence margin (±{margin:g} point)")
    ax.axvline(0, color="gray", lw=1)
    ys = [sum(heights) - sum(heights[:i]) - h / 2 for i, h in enumerate(heights)]  # row centres, top to bottom
    for y, (_, key) in zip(ys, rows):
        if key is None:
            continue
        pts = [v * 100 for v in deltas[key].values()]
        mean = mean_std(pts)[0]
        ci = t_interval(pts)
        ax.scatter(pts, [y] * len(pts), s=12, color="tab:blue", alpha=0.35, lw=0, zorder=2)
        if ci is not None:
            ax.plot(ci, [y, y], color="black", lw=1.4, zorder=3)
        ax.plot([mean], [y], marker="D", color="black", ms=5, zorder=4)
        ax.annotate(f"n={len(pts)}", (1.005, y), xycoords=("axes fraction", "data"), va="center", fontsize=7, color="dimgray")
    ax.set_yticks(ys, [t for t, _ in rows], fontsize=7)
    for tick, (_, key) in zip(ax.get_yticklabels(), rows):
        if key is None:
            tick.set_fontweight("bold")
            tick.set_fontsize(8)
    ax.set_ylim(0, sum(heights))
    ax.set_xlabel("dev accuracy minus the exact run of the same seed (points); diamond: mean, bar: 95 % interval, dots: seeds",
                  fontsize=8)
    ax.set_title("Paired differences to the exact fine-tune, MRPC dev", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", fontsize=7, frameon=False)
    return save(fig, path)


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


