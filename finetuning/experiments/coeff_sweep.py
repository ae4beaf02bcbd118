"""Dev accuracy vs the CGF coefficient c: CE fine-tunes (or --distill) per coefficient and seed,
a table (each seed, the mean, and the difference to --base paired by seed) and a PNG plot with
error bars and each seed's line. Runs with an existing record are reused; with --recorded nothing
is trained, and a missing run is refused before any work.

    cd finetuning
    python -m experiments.coeff_sweep --coeffs 0.4 0.5 0.6 0.65 0.7 0.75 0.85 --seeds 42 7 123 1234 2026
    python -m experiments.coeff_sweep --distill --beta 10 --coeffs 0.5 0.65
    python -m experiments.coeff_sweep --recorded --coeffs 0.4 0.5 0.6 --seeds 42 7 123   # tabulate the records only
"""

import dataclasses
import time

from cgf_bert import CgfBertError
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, field_type, number, run_main
from cgf_bert.config import EXACT, MAIN_SEEDS, TEACHER_PATH, DistillConfig, TrainConfig
from cgf_bert.report.compare import replot_coeff_sweep
from cgf_bert.report.stats import fmt_pm, mean_std
from cgf_bert.store.names import method_label
from cgf_bert.store.provenance import RESULTS_DIR, command_line, repo_relative
from cgf_bert.store.records import save_experiment
from cgf_bert.train.sweeps import find_record, run_or_reuse


def main():
    p = ArgumentParser(description=__doc__)
    add_config_args(p, TrainConfig, skip=("approx", "seed"))
    add_config_args(p, DistillConfig)
    p.add_argument("--coeffs", type=number(float, "coeffs", min=0.0), nargs="+", default=[0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.85], help="coefficients (default: %(default)s)")
    p.add_argument("--seeds", type=field_type(TrainConfig, "seed"), nargs="+", default=list(MAIN_SEEDS), help="seeds per coefficient (default: %(default)s)")
    p.add_argument("--distill", action="store_true", help="distill from the exact teacher instead of CE fine-tuning")
    p.add_argument("--teacher", default=TEACHER_PATH, help="teacher for --distill (default: %(default)s)")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="train even where a matching record exists")
    p.add_argument("--recorded", action="store_true", help="train nothing: tabulate the records, refusing if a run has none")
    p.add_argument("--base", type=number(float, "base", min=0.0), help="the coefficient the others are compared with, paired by seed (default: 0.5 if swept, else the first)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="run records and the sweep summary (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(TrainConfig, args, seed=args.seeds[0])
    dcfg = config_from_args(DistillConfig, args) if args.distill else None
    base = args.base if args.base is not None else (0.5 if 0.5 in args.coeffs else args.coeffs[0])
    if base not in args.coeffs:
        raise CgfBertError(f"--base {base:g} is not one of --coeffs {' '.join(f'{c:g}' for c in args.coeffs)}")
    cell = lambda c, seed: dataclasses.replace(cfg, approx=cfg.approx.replace(softmax=softmax_spec("cgf", coeff=c)), seed=seed)  # noqa: E731
    if args.recorded and not args.reuse:
        raise CgfBertError("--recorded trains nothing; --no-reuse would retrain every run: give one of them")
    if args.recorded:
        missing = [f"c={c:g} seed {s}" for c in args.coeffs for s in args.seeds if find_record(cell(c, s), dcfg, args.results_dir) is None]
        if missing:
            raise CgfBertError(f"--recorded: no record for {', '.join(missing)} (run them, e.g. with a plan of experiments/plans/)")
    acc: dict[float, list[float]] = {}
    names: dict[float, list[str]] = {}
    for c in args.coeffs:
        for seed in args.seeds:
            rec = run_or_reuse(cell(c, seed), dcfg, args.teacher, args.results_dir, args.reuse or args.recorded)
            acc.setdefault(c, []).append(rec["best"]["accuracy"])
            names.setdefault(c, []).append(rec["name"])
    paired = {c: [(a - b) * 100 for a, b in zip(acc[c], acc[base])] for c in args.coeffs if c != base}
    # The exact softmax on the same seeds is the line to reach; drawn only when every seed has a run (never trained here).
    exact = [find_record(dataclasses.replace(cfg, approx=EXACT, seed=s), None, args.results_dir) for s in args.seeds]
    exact_acc = [r["best"]["accuracy"] for r in exact] if all(exact) else None
    method = method_label(dcfg)
    print(f"CGF {method}, dev accuracy (points) by seed, mean ± std, and paired by seed against c={base:g}:")
    print(f"  {'':<7}" + "".join(f"{'s' + str(s):>8}" for s in args.seeds) + f"  {'mean ± std':>14}  {'vs c=' + format(base, 'g'):>14}")
    for c in args.coeffs:
        d = paired.get(c)
        vs = "-" if d is None else (f"{d[0]:+.2f}" if len(d) == 1 else "{:+.2f} ± {:.2f}".format(*mean_std(d)))
        print(f"  {'c=' + format(c, 'g'):<7}" + "".join(f"{a * 100:8.2f}" for a in acc[c]) + f"  {fmt_pm(acc[c]):>14}  {vs:>14}")
    print(f"  exact {fmt_pm(exact_acc) if exact_acc else '(no exact run on every seed: no line drawn)'}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {"command": command_line(), "method": method, "seeds": args.seeds,
           "accuracy": {str(c): v for c, v in acc.items()}, "records": {str(c): v for c, v in names.items()},
           "base": base, "paired_vs_base": {str(c): d for c, d in paired.items()},
           "exact_accuracy": exact_acc, "exact_records": [r["name"] for r in exact] if exact_acc else None}
    png = replot_coeff_sweep(out, f"{args.results_dir}/experiments/coeff_sweep-{stamp}.png")  # the figure from the record, as replot draws it
    out["plot"] = repo_relative(png)
    print(f"plot: {png}\nsaved {save_experiment(f'coeff_sweep-{stamp}', out, args.results_dir)}")


if __name__ == "__main__":
    run_main(main)
