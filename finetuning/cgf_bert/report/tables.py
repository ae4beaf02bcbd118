"""Build summary.md's tables from the run records in results/ (never typed by hand)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from cgf_bert.approx.approximations import EXACT
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.approx.spec import Spec
from cgf_bert.config import PRECISION as FP32
from cgf_bert.config import TrainConfig
from cgf_bert.objective import LossTerm, kd_preset
from cgf_bert.report.compare import markdown_rows
from cgf_bert.report.stats import equivalence, fmt_pm, mean_std, paired_diff, t_interval
from cgf_bert.store.names import Variant
from cgf_bert.store.records import is_benchmark, train_config

# Recipe fields that must equal TrainConfig's defaults for a run to enter the main table.
RECIPE = ("model", "epochs", "lr", "batch_size", "weight_decay", "max_grad_norm", "freeze_embeddings", "max_length", "group_by_length",
          "precision", "limit")


def row(coeff: float | None = None, beta: float | None = None, init: str = "pretrained", extra: tuple[LossTerm, ...] = ()) -> Variant:
    """The reference-recipe row of CGF at ``coeff`` (None: exact), trained with CE or, given
    ``beta``, with the KD preset (alpha 0.5, T 2) plus ``extra`` terms from ``init``."""
    approx = EXACT if coeff is None else EXACT.replace(softmax=softmax_spec("cgf", coeff=coeff))
    return Variant(approx, None if beta is None else (kd_preset(0.5, 2.0, beta) + extra, init))


def recipe_with(**specs: Spec) -> Variant:
    """The best CGF recipe (KD beta=10 + ``attn_out=0.1``, pretrained init) with ``specs`` in place of its ops."""
    base = row(0.5, 10, extra=(LossTerm("attn_out", 0.1),))
    return dataclasses.replace(base, approx=base.approx.replace(**specs))


# Issue 22's polynomial replacements, with the intervals of experiments/plans/fp32_single_replacements.toml.
POLY = {
    "gelu": Spec.make("gelu", "gelu_poly", degree=128, lo=-48.0, hi=48.0),
    "layernorm": Spec.make("layernorm", "ln_poly", layers={0: Spec.make("layernorm", "ln_poly", degree=128, var_lo=0.1, var_hi=1e6, newton=11)},
                           degree=64, var_lo=0.02, var_hi=1e4, newton=9),
    "pooler": Spec.make("pooler", "tanh_poly"),
    "softmax": softmax_spec("cgf_poly", coeff=0.5),
}

EXACT_ROW = row()
# BERT-base MRPC dev accuracy from the method's reference results (not measured here).
REFERENCE_BERT_BASE = {
    EXACT_ROW: 0.8630,
    row(0.5, 10, "teacher"): 0.8595,
    row(0.5, 10): 0.8595,
    row(0.5, 0, "teacher"): 0.799,
    row(0.5, 0): 0.799,
    row(0.65): 0.8194,
    row(0.5): 0.7273,
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


def reference_groups(records: list[dict]) -> dict[Variant, dict[int, dict]]:
    """Variant -> seed -> newest record, over the step-script runs on the reference recipe."""
    groups: dict[Variant, list[dict]] = defaultdict(list)
    for r in training_records(records):
        if is_reference_recipe(r):
            groups[Variant.of_record(r)].append(r)
    return {key: latest_per_seed(runs) for key, runs in groups.items()}


def paired_deltas(groups: dict[Variant, dict[int, dict]]) -> dict[Variant, dict[int, float]]:
    """Variant -> seed -> dev accuracy minus the exact run's of the same seed (seeds both have)."""
    exact = groups.get(EXACT_ROW, {})
    return {key: paired_diff(accuracy(runs), accuracy(exact)) for key, runs in groups.items() if key != EXACT_ROW}


# Paired comparisons between CGF rows that the findings turn on: (question, row A, row B), read as A - B.
CONTRASTS = (
    ("KD over plain CE, c=0.5", row(0.5, 10), row(0.5)),
    ("logit KD alone over plain CE, c=0.5", row(0.5, 0), row(0.5)),
    ("hidden-state term, pretrained init", row(0.5, 10), row(0.5, 0)),
    ("hidden-state term, teacher init", row(0.5, 10, "teacher"), row(0.5, 0, "teacher")),
    ("pretrained over teacher init, beta=10", row(0.5, 10), row(0.5, 10, "teacher")),
    ("pretrained over teacher init, beta=0", row(0.5, 0), row(0.5, 0, "teacher")),
    ("the two best recipes: beta=0 from the teacher over beta=10 from pretrained", row(0.5, 0, "teacher"), row(0.5, 10)),
    ("c=0.65 over c=0.5, CE", row(0.65), row(0.5)),
    ("attention-output term (issue 11's best) over the recipe", row(0.5, 10, extra=(LossTerm("attn_out", 0.1),)), row(0.5, 10)),
    *((f"{what} alone, over the best CGF recipe", recipe_with(**{op: POLY[op]}), recipe_with())
      for op, what in (("gelu", "polynomial GELU"), ("layernorm", "polynomial LayerNorm"), ("pooler", "polynomial pooler tanh"),
                       ("softmax", "cgf_poly for cgf"))),
    ("all of them: the fully polynomial student over the best CGF recipe", recipe_with(**POLY), recipe_with()),
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
            f"| {question} | {a.label()} − {b.label()} | {' '.join(map(str, diffs)) or '—'} | {fmt_pm(vals)} | {ci} | {wins} |"
        )
    return "\n".join(lines)


def row_order(key: Variant) -> tuple:
    """Exact first, then by label."""
    return (key != EXACT_ROW, key.label())


def fmt_interval(diffs: list[float]) -> str:
    """'[-2.07, +0.80]': the 95% t interval of the mean difference in points; '—' below two seeds."""
    interval = t_interval(diffs)
    return "—" if interval is None else f"[{interval[0] * 100:+.2f}, {interval[1] * 100:+.2f}]"


EQUIVALENCE_MARGIN = 1.0  # points of dev accuracy: the match the results claim is tested against it


def fmt_equivalence(diffs_points: list[float], margin: float = EQUIVALENCE_MARGIN) -> str:
    """'yes (p=0.012)', 'no (p=0.31)': both one-sided tests at 5 % reject a gap beyond the margin; '—' below two seeds."""
    e = equivalence(diffs_points, margin)
    return "—" if e is None else f"{'yes' if e['equivalent'] else 'no'} (p={e['p']:.2g})"


def results_table(records: list[dict]) -> str:
    """Markdown: per variant mean ± std over seeds, and paired difference to exact."""
    groups = reference_groups(records)
    deltas = paired_deltas(groups)
    lines = [
        "| variant | seeds | dev accuracy | dev F1 | paired Δ acc vs exact (n) | 95% CI of Δ | equivalent within ±1 point? (TOST, 5 %) | wall min / run | BERT-base reference acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups, key=row_order):
        runs, name = groups[key], key.label()
        seeds = sorted(runs)
        acc = [runs[s]["best"]["accuracy"] for s in seeds]
        f1 = [runs[s]["best"]["f1"] for s in seeds]
        pairs = list(deltas.get(key, {}).values())
        delta = "—" if not pairs else f"{fmt_pm(pairs, digits=2)} ({len(pairs)})"
        ci = fmt_interval(pairs)
        tost = fmt_equivalence([v * 100 for v in pairs])
        wall = mean_std(run_seconds(r) / 60 for r in runs.values())[0]
        ref = REFERENCE_BERT_BASE.get(key)
        lines.append(
            f"| {name} | {' '.join(map(str, seeds))} | {fmt_pm(acc)} | {fmt_pm(f1)} | {delta} | {ci} | {tost} | {wall:.1f} | "
            f"{'—' if ref is None else f'{ref * 100:.2f}'} |"
        )
    return "\n".join(lines)


def precision_table(records: list[dict]) -> str:
    """Markdown: each variant trained at a precision other than fp32 (reference recipe otherwise),
    paired by seed with the same variant's fp32 runs (newest record per seed on both sides);
    variants with no fp32 run of a common seed are left out."""
    groups: dict[tuple[Variant, str], list[dict]] = defaultdict(list)
    for r in training_records(records):
        if is_reference_recipe(r, but=("precision",)):
            key = Variant.of_record(r)
            groups[dataclasses.replace(key, precision=FP32), key.precision].append(r)
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
            f"| {base.label()} | {precision} | {' '.join(map(str, low))} | {fmt_pm(low.values())} | {fmt_pm(fp32[s] for s in diffs)} | "
            f"{fmt_pm(vals)} | {fmt_interval(vals)} | {sum(v >= 0 for v in vals)} of {len(vals)} |"
        )
    return "\n".join(lines)




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












