"""Settings compared paired by seed: rows, their markdown tables and plots (experiments' summaries)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.spec import Spec
from cgf_bert.report.plots import pyplot, save
from cgf_bert.report.stats import mean_std, paired_diff, t_interval


def paired(a: list[dict], b: list[dict]) -> dict[str, Any]:
    """Per-seed accuracy differences b - a over the seeds both have."""
    diffs = paired_diff({r["seed"]: r["best"]["accuracy"] for r in b}, {r["seed"]: r["best"]["accuracy"] for r in a})
    m, sd = mean_std(diffs.values())
    return {"seeds": list(diffs), "diffs": list(diffs.values()), "mean": m, "std": sd}


def plot_accuracy_vs_coeff(points: dict[float, list[float]], path: str | Path, title: str, hline: float | None = None,
                           hline_label: str = "exact softmax", seeds: list[int] | None = None, single: str | None = None,
                           by_seed: bool = False) -> Path:
    """PNG of mean dev accuracy vs coefficient with std error bars (one point per coefficient); with
    one seed per point a plain marker, its label naming the seed (``seeds``, when given) or ``single``.
    ``by_seed`` (every point has one value per seed of ``seeds``, in order) adds each seed's own line:
    the comparison is paired by seed, and a spread of means hides whether the seeds agree."""
    plt = pyplot()
    cs = sorted(points)
    stats = [mean_std(points[c]) for c in cs]
    ns = sorted({len(points[c]) for c in cs})
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    means = [m * 100 for m, _ in stats]
    if ns == [1]:  # a zero-length error bar would read as a measured spread of nothing
        ax.plot(cs, means, "o-", label=single or (f"CGF, seed {seeds[0]}" if seeds and len(seeds) == 1 else "CGF, one seed"))
    else:
        n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        ax.errorbar(cs, means, yerr=[s * 100 for _, s in stats], marker="o", capsize=4, label=f"CGF, mean ± std over {n} seeds")
    if by_seed and seeds and len(seeds) > 1:
        for k, seed in enumerate(seeds):
            ax.plot(cs, [points[c][k] * 100 for c in cs], ls=":", marker=".", lw=1, alpha=0.7, label=f"seed {seed}")
    if hline is not None:
        ax.axhline(hline * 100, color="gray", ls="--", label=hline_label)
    ax.set_xlabel("CGF variance coefficient c")
    ax.set_ylabel("MRPC dev accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(y=0.25)  # headroom: the legend clear of the points and the reference line
    ax.legend(loc="best")
    return save(fig, path)


def replot_coeff_sweep(record: dict, path: str | Path) -> Path:
    """coeff_sweep's figure from its record, titled as the experiment titles it."""
    exact, seeds = record.get("exact_accuracy"), record.get("seeds", [])
    points = {float(c): v for c, v in record["accuracy"].items()}
    return plot_accuracy_vs_coeff(points, path, f"CGF {record['method']}: dev accuracy vs c", hline=mean_std(exact)[0] if exact else None,
                                  hline_label="exact softmax, same seed" + ("" if len(seeds) == 1 else "s"), seeds=seeds,
                                  by_seed=all(len(v) == len(seeds) for v in points.values()))


def _delta(recs: list[dict], ref: list[dict]) -> dict[str, Any] | None:
    """Paired accuracy differences ``recs - ref`` (points), their mean, std and 95% interval."""
    d = paired(ref, recs)
    if not d["seeds"]:
        return None
    ci = t_interval(d["diffs"])
    return {"seeds": d["seeds"], "diffs": [x * 100 for x in d["diffs"]], "mean": d["mean"] * 100, "std": d["std"] * 100,
            "ci": [ci[0] * 100, ci[1] * 100] if ci else None}


def compare_settings(groups: dict[str, list[dict]], exact: list[dict], base: str | None = None) -> list[dict[str, Any]]:
    """One row per setting: its seeds and records, dev accuracy (points), the paired difference to
    the exact fine-tunes of the same seeds and, with ``base``, to that setting."""
    rows = []
    for label, recs in groups.items():
        acc = [r["best"]["accuracy"] * 100 for r in recs]
        m, sd = mean_std(acc)
        rows.append({
            "setting": label, "seeds": [r["seed"] for r in recs], "records": [r["name"] for r in recs],
            "accuracy": {"per_seed": acc, "mean": m, "std": sd},
            "vs_exact": _delta(recs, exact),
            "vs_base": _delta(recs, groups[base]) if base and label != base else None,
        })
    return rows


def _fmt_delta(d: dict | None) -> str:
    if not d:
        return "—"
    ci = f" [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" if d["ci"] else ""
    return f"{d['mean']:+.2f} ± {d['std']:.2f}{ci} ({len(d['seeds'])})"


def markdown_rows(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table of already formatted cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def settings_table(rows: list[dict], base: str | None = None) -> str:
    """Markdown table of ``compare_settings`` rows. Rows that carry ``input_division``
    (variant_compare's) get a column for it: what the variant costs under FHE beside what it scores."""
    division = any("input_division" in r for r in rows)
    head = ["setting", "seeds", "dev accuracy", "paired Δ vs exact [95% CI] (n)"] + ([f"paired Δ vs {base}"] if base else [])
    head += ["divides by an input-dependent sum"] if division else []
    cells = []
    for r in rows:
        a = r["accuracy"]
        row = [r["setting"], " ".join(map(str, r["seeds"])), f"{a['mean']:.2f} ± {a['std']:.2f}", _fmt_delta(r["vs_exact"])]
        if base:
            row.append(_fmt_delta(r["vs_base"]))
        if division:
            row.append({True: "yes", False: "no (public n only)"}.get(r.get("input_division"), "?"))
        cells.append(row)
    return markdown_rows(head, cells)


def layer_table(rec: dict) -> str:
    """Markdown table of a layer_sensitivity record: the swap at eval on the exact checkpoint and
    the CE runs trained so, per layer, each as a Δ to its all-exact reference (the first row)."""
    swap, refs = rec["swap"], rec["references"]
    exact_swap, exact_ce = swap[0]["accuracy"], refs.get("CE fine-tune, all exact")
    seeds = " ".join(map(str, rec.get("train_seeds", []))) or "(none run)"

    def pts(acc: float | None, ref: float | None) -> str:
        if acc is None:
            return "—"
        return f"{acc * 100:.2f}" + (f" ({(acc - ref) * 100:+.2f})" if ref is not None else "")

    def row(name: str, r: dict, ce: float | None, ref_swap: float | None, ref_ce: float | None) -> list[str]:
        return [name, pts(r["accuracy"], ref_swap), f"{r['agreement'] * 100:.1f} %", pts(ce, ref_ce)]

    def trained(i: int) -> float | None:
        accs = rec.get("trained", {}).get(str(i), {}).get("accuracy", [])
        return mean_std(accs)[0] if accs else None

    head = ["CGF in", "swap at eval (Δ to all exact)", "agreement with exact", f"trained with CE, seeds {seeds} (Δ to all exact)"]
    rows = [row("no layer (all exact)", swap[0], exact_ce, None, None)]
    rows += [row(f"layer {i}", r, trained(i), exact_swap, exact_ce) for i, r in enumerate(swap[1:-1])]
    rows += [row("every layer", swap[-1], refs.get("CE fine-tune, all CGF"), exact_swap, exact_ce)]
    return markdown_rows(head, rows)


def _seed_labels(seeds: list[int], diffs: list[float], gap: float) -> list[tuple[float, str]]:
    """(height, text) of the seed labels beside one setting: seeds of equal value share a label
    ('123,1234'), and labels closer than ``gap`` are spread apart, centred on their points."""
    groups: dict[float, list[str]] = {}
    for s, y in zip(seeds, diffs):
        groups.setdefault(round(y, 9), []).append(str(s))
    ys = sorted(groups)
    placed = list(ys)
    for k in range(1, len(placed)):
        placed[k] = max(placed[k], placed[k - 1] + gap)
    shift = (sum(ys) - sum(placed)) / len(ys) if ys else 0.0  # the spread block stays centred on the dots
    return [(p + shift, ",".join(groups[y])) for y, p in zip(ys, placed)]


def plot_settings(rows: list[dict], path: str | Path, title: str) -> Path:
    """Each setting's per-seed paired difference to exact (dots, their seeds beside) and their mean (bar)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(rows) + 2), 4.8), layout="constrained")
    values = [0.0] + [y for r in rows if r["vs_exact"] for y in r["vs_exact"]["diffs"]]
    gap = 0.05 * (max(values) - min(values) or 1.0)  # about a 7 pt line at this height
    for i, r in enumerate(rows):
        d = r["vs_exact"]
        if not d:
            continue
        ax.scatter([i] * len(d["diffs"]), d["diffs"], color="tab:blue", alpha=0.6, zorder=3, label="one seed (its number beside)")
        ax.hlines(d["mean"], i - 0.3, i + 0.3, color="tab:red", lw=2, zorder=4, label="mean over the seeds")
        for y, text in _seed_labels(d["seeds"], d["diffs"], gap):  # right of the mean bar, never on it
            ax.annotate(text, (i + 0.33, y), fontsize=7, va="center", color="dimgray")
    ax.axhline(0, color="gray", ls="--", lw=1, label="exact fine-tune, same seed")
    ax.set_xticks(range(len(rows)), [textwrap.fill(r["setting"], 20) for r in rows], fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.2)  # room for the last setting's seed labels
    ax.set_ylabel("dev accuracy − exact, same seed (points)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    legend = dict(zip(*ax.get_legend_handles_labels()[::-1]))  # one entry per kind of mark
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=3, fontsize=8)
    return save(fig, path)


def _approx_label(record: dict) -> str:
    """The students' ops as loss_ablation labels them (older records kept the softmax alone)."""
    if "approx" in record:
        return Approximations.from_json(record["approx"]).label()
    return Spec.from_json("softmax", record["softmax"]).label()


def has_paired(rows: list[dict]) -> bool:
    """Whether any setting's row has a paired difference to exact: what plot_settings draws."""
    return any(r.get("vs_exact") for r in rows)


def _settings_rows(record: dict) -> list[dict]:
    """The record's rows, refused when none has a paired difference to draw."""
    if not has_paired(record["rows"]):
        raise CgfBertError("no setting in the record has a paired difference to exact: the figure would be empty")
    return record["rows"]


def replot_loss_ablation(record: dict, path: str | Path) -> Path:
    """loss_ablation's figure from its record, titled as the experiment titles it."""
    return plot_settings(_settings_rows(record), path, f"{_approx_label(record)} + KD terms: paired Δ to exact")


def replot_variant_compare(record: dict, path: str | Path) -> Path:
    """variant_compare's figure from its record, titled as the experiment titles it."""
    return plot_settings(_settings_rows(record), path, "Attention variants, CE and KD: paired Δ to exact")
