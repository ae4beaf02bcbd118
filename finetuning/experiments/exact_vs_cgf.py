"""The ceiling probe: how much does swapping exact softmax for CGF cost?

(a) Swap at eval: score an exact checkpoint with CGF at several coefficients, no training.
(b) Paired fine-tunes: exact vs CGF on the same seeds (records reused where they exist).

    cd finetuning
    python -m experiments.exact_vs_cgf --swap-coeffs 0.3 0.5 0.65 0.8 1.0
    python -m experiments.exact_vs_cgf --paired --coeff 0.65 --seeds 42 7 123
"""

import dataclasses
import time
from pathlib import Path

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, field_type, number, run_main
from cgf_bert.config import EXACT, MAIN_SEEDS, TEACHER_PATH, TrainConfig
from cgf_bert.report.compare import paired, plot_accuracy_vs_coeff
from cgf_bert.store.provenance import RESULTS_DIR, command_line, repo_relative
from cgf_bert.store.records import save_experiment
from cgf_bert.train.sweeps import run_or_reuse, swap_at_eval


def replot(record: dict, path: str | Path) -> Path:
    """The swap-at-eval figure of a record (its first row the exact softmax, the others CGF at each c).
    A record from before it named its figure is drawn where that run put it, swap-STAMP.png beside it."""
    rows = record["swap"]["rows"]
    if "plot" not in record:
        path = Path(path).with_name(Path(path).name.replace("exact_vs_cgf-", "swap-", 1))
    coeff = lambda r: r["coeff"] if "coeff" in r else r["softmax"]["coeff"]  # noqa: E731 (the oldest records: coeff beside a softmax name)
    return plot_accuracy_vs_coeff({coeff(r): [r["accuracy"]] for r in rows[1:]}, path,
                                  "Exact checkpoint scored with CGF (no training)", hline=rows[0]["accuracy"],
                                  hline_label="exact softmax, the same checkpoint", single="the checkpoint scored with CGF at c")


def main():
    p = ArgumentParser(description=__doc__)
    add_config_args(p, TrainConfig, skip=("seed",), approx=Approximations(softmax=softmax_spec("cgf", coeff=0.65)))
    p.add_argument("--checkpoint", default=TEACHER_PATH, help="exact checkpoint for the swap (default: %(default)s)")
    p.add_argument("--swap-coeffs", type=number(float, "swap-coeffs", min=0.0), nargs="*", default=[0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 1.0],
                   help="CGF coefficients for the swap at eval (default: %(default)s; none to skip)")
    p.add_argument("--paired", action="store_true", help="also run paired fine-tunes: exact vs the --softmax spec (CGF c=0.65 by default)")
    p.add_argument("--seeds", type=field_type(TrainConfig, "seed"), nargs="+", default=list(MAIN_SEEDS), help="seeds for --paired (default: %(default)s)")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="train even where a matching record exists")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="run records and the experiment summary (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(TrainConfig, args, seed=args.seeds[0])
    out = {"command": command_line()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.swap_coeffs:
        specs = [EXACT.softmax] + [softmax_spec("cgf", coeff=c) for c in args.swap_coeffs]
        rows = swap_at_eval(args.checkpoint, specs, cfg)
        out["swap"] = {"checkpoint": args.checkpoint, "rows": rows}
        print(f"swap at eval, {args.checkpoint}:")
        for r in rows:
            print(f"  {r['label']:>12}: dev accuracy {r['accuracy']:.4f}  F1 {r['f1']:.4f}")
        png = replot(out, f"{args.results_dir}/experiments/swap-{stamp}.png")  # the figure from the record, as replot draws it
        out["plot"] = repo_relative(png)
        print(f"  plot: {png}")
    if args.paired:
        ex, cg = [], []
        for seed in args.seeds:
            ex.append(run_or_reuse(dataclasses.replace(cfg, approx=EXACT, seed=seed), results_dir=args.results_dir, reuse=args.reuse))
            cg.append(run_or_reuse(dataclasses.replace(cfg, seed=seed), results_dir=args.results_dir, reuse=args.reuse))
        d = paired(ex, cg)
        out["paired"] = {"approx": cfg.approx.to_json(), "exact": [r["name"] for r in ex], "cgf": [r["name"] for r in cg], **d}
        print(f"paired fine-tunes, {cfg.approx.label()} minus exact (dev accuracy, points):")
        for s, x in zip(d["seeds"], d["diffs"]):
            print(f"  seed {s}: {x * 100:+.2f}")
        print(f"  mean {d['mean'] * 100:+.2f} ± {d['std'] * 100:.2f} over {len(d['seeds'])} seeds")
    print(f"saved {save_experiment(f'exact_vs_cgf-{stamp}', out, args.results_dir)}")


if __name__ == "__main__":
    run_main(main)
