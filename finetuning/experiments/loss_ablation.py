"""Which distillation terms close the CGF student's gap (CGF c=0.5 by default)? The reference recipe (--alpha, --temperature,
--beta) alone and with each set of extra terms, on the same seeds, paired against the exact
fine-tunes of those seeds and against the recipe. Runs with a matching record are reused.

A setting is 'recipe' or terms joined by '+': NAME=WEIGHT[,param=value...] (see distill.py --help).

    cd finetuning
    python -m experiments.loss_ablation --seeds 42 7 123
    python -m experiments.loss_ablation --settings recipe attn_kl=1 "cka_intra=1+cka_inter=1" --seeds 42 7 123 1234 2026
"""

import dataclasses
import time

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, field_type, run_main
from cgf_bert.config import EXACT, MAIN_SEEDS, TEACHER_PATH, DistillConfig, TrainConfig
from cgf_bert.objective import LossTerm
from cgf_bert.report.compare import compare_settings, has_paired, replot_loss_ablation, settings_table
from cgf_bert.store.names import method_label
from cgf_bert.store.provenance import RESULTS_DIR, command_line, repo_relative
from cgf_bert.store.records import save_experiment
from cgf_bert.train.sweeps import find_record, run_or_reuse

# Weights: 1 for the distribution and CKA terms (their values start near 0.2-1.2 on the pretrained
# CGF student, like the beta-weighted hidden term's 1.6); 0.1 for attn_out, whose raw MSE starts
# at 34 because CGF rows do not sum to 1 (measured on 3 training batches, summary.md).
SETTINGS = ["recipe", "attn_kl=1", "attn_out=0.1", "cka_intra=1+cka_inter=1", "cka_global=1"]


def parse_setting(text: str) -> tuple[LossTerm, ...]:
    """'recipe' -> no extra term; 'a=1+b=2' -> the terms a and b."""
    return () if text == "recipe" else tuple(LossTerm.parse(t) for t in text.split("+"))


def main():
    p = ArgumentParser(description=__doc__)
    add_config_args(p, TrainConfig, skip=("seed",), approx=Approximations(softmax=softmax_spec("cgf", coeff=0.5)))  # the student of the results table
    add_config_args(p, DistillConfig)
    p.add_argument("--settings", nargs="+", default=SETTINGS, help="term sets to compare (default: %(default)s)")
    p.add_argument("--seeds", type=field_type(TrainConfig, "seed"), nargs="+", default=[42, 7, 123], help=f"seeds (default: %(default)s; the main table has {' '.join(map(str, MAIN_SEEDS))})")
    p.add_argument("--teacher", default=TEACHER_PATH, help="exact teacher (default: %(default)s)")
    p.add_argument("--no-train", dest="train", action="store_false", help="only tabulate the runs already on record; train nothing")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="train even where a matching record exists")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="run records and the experiment summary (default: %(default)s)")
    args = p.parse_args()
    settings = {s: parse_setting(s) for s in args.settings}  # a bad term fails here, before any work
    cfg = config_from_args(TrainConfig, args, seed=args.seeds[0])
    base = config_from_args(DistillConfig, args)
    groups = {}
    for label, extra in settings.items():
        dcfg = dataclasses.replace(base, terms=base.terms + extra)
        recs = []
        for seed in args.seeds:
            run = dataclasses.replace(cfg, seed=seed)
            rec = run_or_reuse(run, dcfg, args.teacher, args.results_dir, args.reuse) if args.train else find_record(run, dcfg, args.results_dir)
            if rec:
                recs.append(rec)
        if recs:
            groups[f"{method_label(dcfg)}" if label == "recipe" else f"+ {label}"] = recs
    if not groups:
        print("no runs on record for these settings (run without --no-train)")
        return
    exact = [r for s in args.seeds if (r := find_record(dataclasses.replace(cfg, approx=EXACT, seed=s), None, args.results_dir))]
    base_label = next(iter(groups)) if "recipe" in settings else None
    rows = compare_settings(groups, exact, base_label)
    print(f"{cfg.approx.label()} students, dev accuracy (points), seeds {args.seeds}:")
    print(settings_table(rows, base_label))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {"command": command_line(), "approx": cfg.approx.to_json(), "base": [t.to_json() for t in base.terms],
           "settings": {k: [t.to_json() for t in v] for k, v in settings.items()}, "seeds": args.seeds,
           "exact_records": [r["name"] for r in exact], "base_label": base_label, "rows": rows}
    # the figure from the record, as replot draws it; none without a paired difference to draw
    png = replot_loss_ablation(out, f"{args.results_dir}/experiments/loss_ablation-{stamp}.png") if has_paired(rows) else None
    out["plot"] = repo_relative(png) if png else None
    print(f"plot: {png}\nsaved {save_experiment(f'loss_ablation-{stamp}', out, args.results_dir)}")


if __name__ == "__main__":
    run_main(main)
