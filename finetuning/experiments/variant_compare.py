"""Attention variants side by side: each softmax spec trained with plain CE and distilled with the
reference KD recipe (--alpha, --temperature, --beta), on the same seeds, paired against the exact
fine-tunes of those seeds. Runs with a matching record are reused.

    cd finetuning
    python -m experiments.variant_compare --seeds 42 7 123
    python -m experiments.variant_compare --variants cgf quad2:shift=5 relu_n relu_pow:power=2 --methods kd
"""

import dataclasses
import time

from cgf_bert.approx.softmax import parse_softmax
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, field_type, run_main
from cgf_bert.config import EXACT, TEACHER_PATH, DistillConfig, TrainConfig
from cgf_bert.report.compare import compare_settings, has_paired, replot_variant_compare, settings_table
from cgf_bert.store.names import variant_label
from cgf_bert.store.provenance import RESULTS_DIR, command_line, repo_relative
from cgf_bert.store.records import save_experiment
from cgf_bert.train.sweeps import find_record, run_or_reuse

VARIANTS = ["cgf", "quad2", "relu_n", "relu_pow"]


def main():
    p = ArgumentParser(description=__doc__)
    add_config_args(p, TrainConfig, skip=("seed", "approx"))
    add_config_args(p, DistillConfig)
    p.add_argument("--variants", nargs="+", type=parse_softmax, default=[parse_softmax(v) for v in VARIANTS],
                   metavar="SPEC", help=f"softmax specs, NAME[:param=value,...] (default: {' '.join(VARIANTS)})")
    p.add_argument("--methods", nargs="+", choices=("ce", "kd"), default=["ce", "kd"], help="CE fine-tuning, KD, or both (default: %(default)s)")
    p.add_argument("--seeds", type=field_type(TrainConfig, "seed"), nargs="+", default=[42, 7, 123], help="seeds (default: %(default)s)")
    p.add_argument("--teacher", default=TEACHER_PATH, help="exact teacher for KD (default: %(default)s)")
    p.add_argument("--no-train", dest="train", action="store_false", help="only tabulate the runs already on record; train nothing")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="train even where a matching record exists")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="run records and the experiment summary (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(TrainConfig, args, seed=args.seeds[0])
    kd = config_from_args(DistillConfig, args)
    groups, division = {}, {}
    for spec in args.variants:
        for method in args.methods:
            dcfg = kd if method == "kd" else None
            recs = []
            for seed in args.seeds:
                run = dataclasses.replace(cfg, approx=cfg.approx.replace(softmax=spec), seed=seed)
                rec = run_or_reuse(run, dcfg, args.teacher, args.results_dir, args.reuse) if args.train else find_record(run, dcfg, args.results_dir)
                if rec:
                    recs.append(rec)
            if recs:
                label = variant_label(dataclasses.replace(cfg, approx=cfg.approx.replace(softmax=spec)), dcfg)
                groups[label], division[label] = recs, spec.kind.input_division
    if not groups:
        print("no runs on record for these variants (run without --no-train)")
        return
    exact = [r for s in args.seeds if (r := find_record(dataclasses.replace(cfg, approx=EXACT, seed=s), None, args.results_dir))]
    rows = compare_settings(groups, exact)
    for r in rows:  # by label: a setting with no records has no row
        r["input_division"] = division[r["setting"]]
    print(f"dev accuracy (points), seeds {args.seeds}:")
    print(settings_table(rows))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {"command": command_line(), "variants": [s.to_json() for s in args.variants], "methods": args.methods, "kd": [t.to_json() for t in kd.terms],
           "seeds": args.seeds, "exact_records": [r["name"] for r in exact], "rows": rows}
    # the figure from the record, as replot draws it; none without a paired difference to draw
    png = replot_variant_compare(out, f"{args.results_dir}/experiments/variant_compare-{stamp}.png") if has_paired(rows) else None
    out["plot"] = repo_relative(png) if png else None
    print(f"plot: {png}\nsaved {save_experiment(f'variant_compare-{stamp}', out, args.results_dir)}")


if __name__ == "__main__":
    run_main(main)
