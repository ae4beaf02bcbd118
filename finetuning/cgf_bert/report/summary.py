"""summary.md's tables and its paired-difference plot, rebuilt from the committed records."""

from __future__ import annotations

import re
from pathlib import Path

from cgf_bert.report.compare import layer_table, settings_table
from cgf_bert.report.plots import pyplot, save
from cgf_bert.report.stats import mean_std
from cgf_bert.report.tables import (
    benchmark_table,
    contrasts_table,
    paired_deltas,
    precision_table,
    reference_groups,
    results_table,
    row_order,
    runs_table,
)
from cgf_bert.store.provenance import RESULTS_DIR
from cgf_bert.store.records import load_records


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
    ax.set_yticks(range(len(names)), [f"{n.label()} (n={len(deltas[n])})" for n in names])
    ax.set_xlabel("dev accuracy minus the exact run of the same seed (points)")
    ax.set_title("CGF vs exact softmax, paired by seed (MRPC dev)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
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


