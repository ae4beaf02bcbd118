"""What is left of a CGF checkpoint when exp is the polynomial an encrypted (CKKS) evaluator runs?

Scores one checkpoint on MRPC dev with plain CGF (real exp, the reference row) and with
``cgf_poly`` at each (degree, interval, squarings) setting, no training: dev accuracy, the
share of dev predictions equal to plain CGF's, the CKKS depth of the softmax (row statistics
and the polynomial; P @ V adds one), and the exp arguments that fell outside its interval
(counted, never clipped). One JSON record and a PNG (accuracy vs depth) in results/experiments/.

    cd finetuning
    python -m experiments.poly_swap ../checkpoints/STUDENT.pt --settings 8,-32,32,5 8,-256,16,8 4,-256,16,8
"""

import time

from cgf_bert import CgfBertError
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.spec import Spec
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, poly_exp, run_main
from cgf_bert.config import TrainConfig
from cgf_bert.report.plots import pyplot, save
from cgf_bert.store.checkpoint import read_checkpoint
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, repo_relative
from cgf_bert.store.records import save_experiment
from cgf_bert.train.sweeps import swap_at_eval

DEFAULT_SETTINGS = ["8,-32,32,5", "8,-64,16,6", "8,-128,16,7", "8,-256,16,8", "6,-256,16,8", "4,-256,16,8"]


def poly_spec(base: Spec, poly: PolyExp) -> Spec:
    """The checkpoint's softmax in its polynomial form with exp polynomial ``poly`` (its parameters kept)."""
    return base.with_polynomial(poly)


def _shared_points(rows: list[dict]) -> dict[tuple, list[str]]:
    """(depth, accuracy in %) -> the settings there: settings often share both, and one label block
    per point, a line per setting, keeps them from covering each other."""
    points: dict[tuple, list[str]] = {}
    for r in rows:
        if r["depth"] is not None:
            points.setdefault((r["depth"], round(r["accuracy"] * 100, 9)), []).append(r["label"].split(" ", 2)[2])
    return points


def plot(rows: list[dict], path: str, title: str):
    """Dev accuracy against the softmax's CKKS depth per polynomial setting, each point labelled; the
    plain-CGF reference dashed."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6), layout="constrained")
    points = _shared_points(rows[1:])
    for (depth, acc), labels in points.items():
        ax.scatter(depth, acc, color="tab:blue", zorder=3)
        ax.annotate("\n".join(labels), (depth, acc), textcoords="offset points", xytext=(0, 6), ha="center", va="bottom", fontsize=7)
    ax.axhline(rows[0]["accuracy"] * 100, color="gray", ls="--", label=f"{rows[0]['label']} (real exp)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a depth is a count of levels
    if points:  # a depth's width of room each side: the centred labels stay inside the axes
        depths = [d for d, _ in points]
        ax.set_xlim(min(depths) - 1, max(depths) + 1)
    ax.margins(y=0.2)
    ax.set_xlabel("CKKS depth of the softmax (levels: row statistics + polynomial exp)")
    ax.set_ylabel("MRPC dev accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8)
    return save(fig, path)


def replot(record: dict, path: str):
    """The figure of a poly_swap record, at ``path``, titled as ``main`` titles it."""
    return plot(record["rows"], path, f"{record['checkpoint']}: CGF with a polynomial exp")


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="a CGF checkpoint (its coefficient is kept)")
    p.add_argument("--settings", nargs="+", type=poly_exp, default=[poly_exp(s) for s in DEFAULT_SETTINGS], metavar="D,LO,HI,K",
                   help=f"polynomial settings: degree, interval ends, squarings (default: {' '.join(DEFAULT_SETTINGS)})")
    add_config_args(p, TrainConfig, only=("device", "data_dir", "eval_batch_size", "max_length"))
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record and plot go to RESULTS_DIR/experiments/ (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(TrainConfig, args)
    _, meta = read_checkpoint(args.checkpoint)
    base = meta["approx"].softmax
    if base.layers or base.kind.polynomial is None:
        raise CgfBertError(f"{args.checkpoint} runs {base.label()}; poly_swap replaces exp in a checkpoint whose softmax "
                           f"has a polynomial form, the same in every layer")
    specs = [base] + [poly_spec(base, s) for s in args.settings]
    rows = swap_at_eval(args.checkpoint, specs, cfg)
    print(f"{args.checkpoint}: dev accuracy with exp replaced by a polynomial (no training)")
    print(f"  {'softmax':<40} {'depth':>5} {'acc':>7} {'Δ acc':>7} {'agree':>7} {'outside':>10}")
    for r in rows:
        o = r.get("out_of_range")
        outside = f"{o['outside'] / o['entries']:.2e}" if o else "—"
        print(f"  {r['label']:<40} {r['depth'] if r['depth'] is not None else '—':>5} {r['accuracy'] * 100:7.2f} "
              f"{(r['accuracy'] - rows[0]['accuracy']) * 100:+7.2f} {r['agreement'] * 100:6.1f}% {outside:>10}"
              + (f"  non-finite logits on {r['non_finite']['examples']} examples" if "non_finite" in r else ""))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = plot(rows, f"{args.results_dir}/experiments/poly_swap-{stamp}.png", f"{repo_relative(args.checkpoint)}: CGF with a polynomial exp")
    out = {"command": command_line(), "code_version": code_version(), "checkpoint": repo_relative(args.checkpoint),
           "trained": {k: meta.get(k) for k in ("model", "seed", "epoch", "dev", "code_version")}, "rows": rows, "plot": repo_relative(png)}
    print(f"plot: {png}\nsaved {save_experiment(f'poly_swap-{stamp}', out, args.results_dir)}")


if __name__ == "__main__":
    run_main(main)
