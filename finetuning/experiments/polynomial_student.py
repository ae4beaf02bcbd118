"""How much does each polynomial replacement cost a checkpoint, with no training? Swap at eval on MRPC
dev: the checkpoint's own ops; its softmax in its polynomial form (cgf -> cgf_poly, exact ->
exact_poly); GELU as gelu_poly and as MPCFormer's quad; LayerNorm as ln_poly and as ln_affine
(constants calibrated on the teacher's training activations); the pooler's tanh as tanh_poly; and
every op at once (fully polynomial). Beside each row: dev accuracy, agreement with the
checkpoint's own predictions, the replaced op's depth and the deepest encoder layer's depth from the
declared depths (attention + LayerNorm + feed-forward + LayerNorm; '-' while an op is not
polynomial), and the inputs that left a polynomial's interval. Last, the form the encrypted circuit
runs (``fhe.forms.polynomial_form``: each op's interval and degree measured on training examples, as
``experiments.encrypted_inference`` measures them), once per --forms COUNT:TOKENS. One JSON record
and a PNG in results/experiments/.

    cd finetuning
    python -m experiments.polynomial_student ../checkpoints_teacher/teacher.pt
    python -m experiments.polynomial_student STUDENT.pt --teacher ../checkpoints_teacher/teacher.pt --calibrate-examples 1000
"""

import argparse
import textwrap
import time
from pathlib import Path

from cgf_bert import CgfBertError
from cgf_bert.analysis.ranges import ln_affine_spec, mean_ln_variances
from cgf_bert.approx.spec import OPS, Spec
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, number, run_main
from cgf_bert.config import TEACHER_PATH, TrainConfig
from cgf_bert.data.loader import make_loader
from cgf_bert.fhe import forms as F
from cgf_bert.report.plots import pyplot, save
from cgf_bert.store.checkpoint import load_model, read_checkpoint
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, repo_relative
from cgf_bert.store.records import save_experiment
from cgf_bert.train.engine import resolve_device
from cgf_bert.train.run import prepare_data
from cgf_bert.train.sweeps import swap_at_eval


def settings(own, ln_affine: Spec) -> list:
    """The rows: the checkpoint's own, each op replaced alone, then all of them (with each LayerNorm kind)."""
    polynomial = own.softmax.depth is not None  # a cgf_poly student: its softmax is the circuit's already
    softmax = own.softmax if polynomial else own.softmax.with_polynomial()
    single = [*([] if polynomial else [softmax]), Spec.make("gelu", "gelu_poly"), Spec.make("gelu", "quad"), Spec.make("layernorm", "ln_poly"),
              ln_affine, Spec.make("pooler", "tanh_poly")]
    full = own.replace(softmax=softmax, gelu=Spec.make("gelu", "gelu_poly"), pooler=Spec.make("pooler", "tanh_poly"))
    return [own, *single, full.replace(layernorm=Spec.make("layernorm", "ln_poly")), full.replace(layernorm=ln_affine)]


def circuit_forms(path: str, data, forms: list[tuple[int, int]], keys: int) -> list:
    """The checkpoint's polynomial form as the encrypted circuit runs it, per (count, tokens): intervals
    measured in float64 (as the circuit's model) on the first ``count`` training examples of at most
    ``tokens`` tokens; ``keys``, the most tokens an exact softmax's row may have, is the eval's length."""
    model, meta = load_model(path)
    model = model.eval().double()
    out = []
    for count, tokens in forms:
        calibration = [(i, t) for i, t, _ in F.examples_of(data["train"], tokens, count)]
        if not calibration:
            raise CgfBertError(f"--forms {count}:{tokens}: no training example has at most {tokens} tokens")
        out.append(F.polynomial_form(meta["approx"], model, calibration, keys))
    return out


def form_pair(text: str) -> tuple[int, int]:
    """'8:32' -> (8, 32): a count of training examples and the most tokens each may have."""
    try:
        count, tokens = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected COUNT:TOKENS, e.g. 8:32") from None
    if count < 1 or tokens < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: COUNT must be at least 1 and TOKENS at least 2")
    return count, tokens


def replaced_kinds(row: dict) -> str:
    """A row's legend label: the op it replaces and the kind it takes ('GELU: gelu_poly'), or, for
    every op at once, the kinds ('every op: cgf_poly, gelu_poly, ln_poly, tanh_poly'). Short, and
    distinct where labels cut to a width are not (they differ at their end)."""
    if "form" in row:
        return f"the circuit's form ({row['form']['calibrate_examples']} train examples <= {row['form']['max_tokens']} tokens)"
    if "approx" in row:
        return "every op: " + ", ".join(s["name"] for s in row["approx"].values() if s["name"] != "exact")
    op = next(k for k in OPS if k in row)
    return f"{OPS[op].title}: {row[op]['name']}"


def plot(results: dict[str, list[dict]], path: str):
    """Dev accuracy against CKKS depth of each replacement, one marker per checkpoint; a checkpoint's
    own ops are its dotted line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.8), layout="constrained")
    several = len(results) > 1
    for n, ((name, rows), marker) in enumerate(zip(results.items(), "os^D")):
        tag = f"{n + 1}: " if several else ""  # the checkpoints are named in the title
        own = rows[0]["accuracy"] * 100
        ax.axhline(own, color="gray", ls=":", lw=1, label=textwrap.fill(f"{tag}its own ops ({rows[0]['label']}): {own:.2f} %", 50))
        for r in rows[1:]:
            x = r["depth"] if r["depth"] is not None else r["layer_depth"]
            if x is not None:
                ax.scatter(x, r["accuracy"] * 100, marker=marker, label=f"{tag}{replaced_kinds(r)}", zorder=3)
    ax.set_xlabel("CKKS depth: the replaced op's (one op) or the deepest layer's (every op)")
    ax.set_ylabel("MRPC dev accuracy (%)")
    names = [f"{n + 1}: {Path(name).name}" if several else Path(name).name for n, name in enumerate(results)]
    ax.set_title(textwrap.fill("Polynomial replacements swapped in at eval: " + "; ".join(names), 80), fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)  # beside the axes: no point hidden behind it
    return save(fig, path)


def replot(record: dict, path: str):
    """The figure of a polynomial_student record, at ``path`` (checkpoints named by file in its title, as ``main`` names them)."""
    return plot({ck: entry["rows"] for ck, entry in record["checkpoints"].items()}, path)


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints to score (the teacher, students)")
    p.add_argument("--teacher", default=TEACHER_PATH, help="exact checkpoint whose training activations calibrate ln_affine (default: %(default)s)")
    p.add_argument("--calibrate-examples", type=number(int, "calibrate-examples", min=1), default=500,
                   help="training examples the LayerNorm constants are averaged over (default: %(default)s)")
    p.add_argument("--forms", nargs="*", type=form_pair, default=[(8, 32), (500, 128)], metavar="COUNT:TOKENS",
                   help="a row each: the encrypted circuit's polynomial form, intervals measured on the first COUNT training "
                        "examples of at most TOKENS tokens, for intervals and an exact softmax's bounds alike (8:32: what encrypted_inference "
                        "measured before --form-examples; 500:128: about its default now; default: 8:32 500:128)")
    add_config_args(p, TrainConfig, only=("device", "data_dir", "eval_batch_size", "max_length"))
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record and plot go to RESULTS_DIR/experiments/ (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(TrainConfig, args)
    metas = {path: read_checkpoint(path)[1] for path in [args.teacher, *args.checkpoints]}  # every file checked before any work
    device = resolve_device(cfg.device)
    teacher, tmeta = load_model(args.teacher)
    tokenizer, data = prepare_data(tmeta["model"], cfg.data_dir, cfg.max_length, limit=None)
    train = data["train"].select(range(min(args.calibrate_examples, len(data["train"]))))
    variances = mean_ln_variances(teacher, make_loader(train, tokenizer, cfg.eval_batch_size), device)
    ln_affine = ln_affine_spec(variances)
    results, started = {}, time.time()
    for path in args.checkpoints:
        forms = circuit_forms(path, data, args.forms, cfg.max_length)
        rows = swap_at_eval(path, settings(metas[path]["approx"], ln_affine) + forms, cfg)
        for r, (count, tokens) in zip(rows[len(rows) - len(forms):], args.forms):
            r["form"] = {"calibrate_examples": count, "max_tokens": tokens}
        results[path] = rows  # by path: two checkpoints of one file name in different folders stay apart
        print(f"\n{path} ({rows[0]['label']}): dev accuracy with each replacement swapped in (no training)")
        print(f"  {'replaced':<72} {'acc':>6} {'Δ acc':>6} {'agree':>6} {'depth':>5} {'layer':>5} {'outside':>9}")
        for r in rows:
            o = r.get("out_of_range")
            outside = f"{o['outside'] / o['entries']:.1e}" if o else "-"
            dash = lambda v: "-" if v is None else str(v)  # noqa: E731
            label = replaced_kinds(r) if "form" in r else r["label"]
            print(f"  {label[:72]:<72} {r['accuracy'] * 100:6.2f} {(r['accuracy'] - rows[0]['accuracy']) * 100:+6.2f} "
                  f"{r['agreement'] * 100:5.1f}% {dash(r['depth']):>5} {dash(r['layer_depth']):>5} {outside:>9}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = plot(results, f"{args.results_dir}/experiments/polynomial_student-{stamp}.png")
    out = {"command": command_line(), "code_version": code_version(), "teacher": repo_relative(args.teacher),
           "ln_variances": variances, "calibrate_examples": len(train), "wall_seconds": round(time.time() - started, 1),
           "checkpoints": {repo_relative(p): {"trained": {k: metas[p].get(k) for k in ("model", "seed", "epoch", "dev", "code_version")},
                                              "rows": results[p]} for p in args.checkpoints},
           "plot": repo_relative(png)}
    print(f"plot: {png}\nsaved {save_experiment(f'polynomial_student-{stamp}', out, args.results_dir)}")


if __name__ == "__main__":
    run_main(main)
