"""Which layers tolerate CGF? CGF in one layer at a time, exact softmax in the others:
(a) swapped in at evaluation on the exact teacher (no training), and (b) trained so with CE
on --train-seeds, next to the all-exact and all-CGF fine-tunes of the same seeds.

    cd finetuning
    python -m experiments.layer_sensitivity                      # swap at eval, and CE runs on seed 42
    python -m experiments.layer_sensitivity --train-seeds        # swap at eval only
"""

import dataclasses
import time

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.approx.spec import Spec
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, field_type, run_main
from cgf_bert.config import EXACT, TEACHER_PATH, TrainConfig
from cgf_bert.report.compare import layer_table
from cgf_bert.report.plots import pyplot, save
from cgf_bert.report.stats import mean_std
from cgf_bert.store.checkpoint import load_model
from cgf_bert.store.provenance import RESULTS_DIR, command_line, repo_relative
from cgf_bert.store.records import save_experiment
from cgf_bert.train.sweeps import find_record, run_or_reuse, swap_at_eval


def one_layer(cgf: Spec, i: int) -> Spec:
    """Exact everywhere but layer ``i``, which runs ``cgf``."""
    return softmax_spec("exact", layers={i: cgf})


STYLES = {"teacher, all exact": ("gray", "--"), "teacher, all CGF at eval": ("tab:red", ":"),
          "CE fine-tune, all exact": ("black", "--"), "CE fine-tune, all CGF": ("tab:purple", ":")}


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"mean over {n} seeds"


def reference_lines(refs: dict[str, float | None], n: int) -> list[tuple[float, str, tuple[str, str]]]:
    """(accuracy, label, style) per distinct reference value: references of equal value are one line
    named by all of them (two lines would hide each other); the CE ones say their seeds (``n``)."""
    merged: dict[float, tuple[list[str], tuple[str, str]]] = {}  # value -> (names, the first name's style)
    for name, y in refs.items():
        if y is not None:
            names, _ = merged.setdefault(round(y, 9), ([], STYLES[name]))
            names.append(f"{name} ({_seeds(n)})" if name.startswith("CE") else name)
    return [(y, " = ".join(names), style) for y, (names, style) in merged.items()]


def plot(swap: list[dict], trained: dict[int, list[float]], refs: dict[str, float | None], path: str, cgf: Spec):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4), layout="constrained")
    layers = list(range(len(swap) - 2))
    n = max((len(v) for v in trained.values()), default=0)  # the CE references ran on the same seeds
    ax.plot(layers, [r["accuracy"] * 100 for r in swap[1:-1]], "o-", label="swapped in at eval (exact teacher)")
    if trained:
        ls = sorted(trained)
        ax.plot(ls, [mean_std(trained[i])[0] * 100 for i in ls], "s-", label=f"trained with CE ({_seeds(n)})")
    for y, label, (colour, style) in reference_lines(refs, n):
        ax.axhline(y * 100, color=colour, ls=style, lw=1, label=label)
    ax.set_xticks(layers)
    ax.set_xlabel(f"layer running {cgf.label()} (all others exact)")
    ax.set_ylabel("MRPC dev accuracy (%)")
    ax.set_title("CGF in one layer at a time")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return save(fig, path)


def replot(record: dict, path: str):
    """The figure of a layer_sensitivity record, at ``path``."""
    trained = {int(i): v["accuracy"] for i, v in record["trained"].items()}
    return plot(record["swap"], trained, record["references"], path, Spec.from_json("softmax", record["cgf"]))


def main():
    p = ArgumentParser(description=__doc__)
    add_config_args(p, TrainConfig, skip=("seed",), approx=Approximations(softmax=softmax_spec("cgf", coeff=0.5)))
    p.add_argument("--checkpoint", default=TEACHER_PATH, help="exact checkpoint for the swap at eval (default: %(default)s)")
    p.add_argument("--train-seeds", type=field_type(TrainConfig, "seed"), nargs="*", default=[42], help="seeds for the CE runs; none to skip (default: %(default)s)")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="train even where a matching record exists")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="run records and the experiment summary (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(TrainConfig, args, seed=(args.train_seeds or [42])[0])
    cgf = cfg.approx.softmax
    layers = load_model(args.checkpoint)[0].bert.config.num_hidden_layers
    specs = [EXACT.softmax] + [one_layer(cgf, i) for i in range(layers)] + [cgf]
    swap = swap_at_eval(args.checkpoint, specs, cfg)
    trained: dict[int, list[float]] = {}
    names: dict[int, list[str]] = {}
    for seed in args.train_seeds:
        for i in range(layers):
            rec = run_or_reuse(dataclasses.replace(cfg, approx=cfg.approx.replace(softmax=one_layer(cgf, i)), seed=seed), None, None, args.results_dir, args.reuse)
            trained.setdefault(i, []).append(rec["best"]["accuracy"])
            names.setdefault(i, []).append(rec["name"])
    ref_recs = {k: [find_record(dataclasses.replace(cfg, approx=approx, seed=s), None, args.results_dir) for s in args.train_seeds]
                for k, approx in (("CE fine-tune, all exact", EXACT), ("CE fine-tune, all CGF", cfg.approx))}
    refs = {"teacher, all exact": swap[0]["accuracy"], "teacher, all CGF at eval": swap[-1]["accuracy"],
            **{k: mean_std([r["best"]["accuracy"] for r in v])[0] if v and all(v) else None for k, v in ref_recs.items()}}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = plot(swap, trained, refs, f"{args.results_dir}/experiments/layer_sensitivity-{stamp}.png", cgf)
    out = {"command": command_line(), "checkpoint": repo_relative(args.checkpoint), "cgf": cgf.to_json(), "swap": swap,
           "trained": {str(i): {"accuracy": v, "records": names[i]} for i, v in trained.items()}, "train_seeds": args.train_seeds,
           "references": refs, "reference_records": {k: [r["name"] for r in v if r] for k, v in ref_recs.items()}, "plot": repo_relative(png) if png else None}
    print(f"{cgf.label()} in one layer at a time, dev accuracy (points), swap at eval on {args.checkpoint}:")
    print(layer_table(out))
    print(f"plot: {png}\nsaved {save_experiment(f'layer_sensitivity-{stamp}', out, args.results_dir)}")


if __name__ == "__main__":
    run_main(main)
