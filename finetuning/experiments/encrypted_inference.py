"""The whole student under CKKS: every encoder layer, the pooler and the classifier as one circuit
(``cgf_bert.fhe.encoder``), the client encrypting the embedding output and decrypting the logits.

This module runs the circuit on numpy slot vectors that count CKKS levels (``--backend sim``): the
slot layout, every rotation and product, the level of every ciphertext and the bootstraps are
those of the encrypted run, and the logits are compared with the plaintext reference (the model
in float64 with its polynomial specs). What the simulation does not have is CKKS noise and time:
the stage table counts operations and bootstraps, and with ``--costs FILE`` (seconds per
operation, measured by ``python -m experiments.ckks_costs``) prices them. Operations that are
not polynomial (an exact softmax, erf GELU, LayerNorm, tanh) are replaced by their polynomial
kinds first (``--polynomial``, on by default): ``exact`` -> ``exact_poly`` with the row-sum bound
measured on the calibration examples, GELU -> ``gelu_poly``, LayerNorm -> ``ln_poly``, tanh ->
``tanh_poly``; a checkpoint's own polynomial specs are kept.

Bootstrap bounds (the public scale each refreshed value is divided by) are calibrated on
--calibrate training examples (twice the largest |value| seen at each site); a dev value beyond
its bound is counted (it would be wrong under CKKS), as are the inputs that leave a polynomial's
interval in the reference.

    cd finetuning
    python -m experiments.encrypted_inference ../checkpoints/STUDENT.pt ../checkpoints_teacher/teacher.pt --examples 8
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.spec import Spec
from cgf_bert.cli import (
    ArgumentParser,
    add_config_args,
    config_from_args,
    number,
    run_main,
)
from cgf_bert.config import TrainConfig
from cgf_bert.fhe import encoder as E
from cgf_bert.model.attention import self_attentions
from cgf_bert.model.replaced import counting
from cgf_bert.report.plots import pyplot, save
from cgf_bert.store.checkpoint import load_model, read_checkpoint
from cgf_bert.store.provenance import (
    RESULTS_DIR,
    code_version,
    command_line,
    machine,
    repo_relative,
)
from cgf_bert.store.records import write_json
from cgf_bert.train.run import prepare_data

SLOTS, TOP = 32768, 17  # desilofhe 2.0's bootstrappable engine: 2^15 slots, 17 levels after a bootstrap
POLYNOMIAL = {"gelu": Spec.make("gelu", "gelu_poly"), "layernorm": Spec.make("layernorm", "ln_poly"),
              "pooler": Spec.make("pooler", "tanh_poly")}


def row_sum_bound(model, examples) -> tuple[float, float]:
    """(lo/2, 2 hi) of the rows' ``sum exp(s - mean)`` over valid keys, every layer and head."""
    sums = []

    def tap(module, scores, mask, probs, value, out):
        x = scores.double() - scores.double().mean(-1, keepdim=True)
        sums.append(torch.exp(x).sum(-1).flatten())

    mods = self_attentions(model.bert)
    for m in mods:
        m.tap = tap
    try:
        for ids, tt in examples:
            with torch.no_grad():
                model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], token_type_ids=tt[None])
    finally:
        for m in mods:
            m.tap = None
    s = torch.cat(sums)
    return float(s.min()) / 2, float(s.max()) * 2


def polynomial_form(approx: Approximations, model, calibration) -> Approximations:
    """Each op the circuit cannot run replaced by its polynomial kind (the checkpoint's own kept)."""
    out = approx
    for op, spec in POLYNOMIAL.items():
        if getattr(approx, op).depth is None:
            out = out.replace(**{op: spec})
    if approx.softmax.depth is None:
        form = approx.softmax.with_polynomial()
        if form.name == "exact_poly":
            lo, hi = row_sum_bound(model, calibration)
            form = Spec.make("softmax", "exact_poly", **{**form.values, "sum_lo": lo, "sum_hi": hi})
        out = out.replace(softmax=form)
    return out


def examples_of(split, rows: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """The first ``count`` examples of ``split`` with at most ``rows`` tokens: (ids, token types, label)."""
    out = []
    for ex in split:
        if len(ex["input_ids"]) <= rows:
            out.append((torch.tensor(ex["input_ids"]), torch.tensor(ex["token_type_ids"]), int(ex["labels"])))
        if len(out) == count:
            break
    return out


def cost_table(path: str) -> dict:
    """The ``seconds`` per operation of an ``experiments.ckks_costs`` record."""
    try:
        seconds = json.loads(Path(path).read_text())["seconds"]
        return {op: float(seconds[op]) for op in E.Counted.COSTED}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{path}: not a cost record with seconds for {', '.join(E.Counted.COSTED)} ({e})") from None


def stage_kind(stage: str) -> str:
    return stage.split(" / ")[-1]


def price(table: list[dict], costs: dict | None) -> float | None:
    if costs is None:
        return None
    return sum(row.get(op, 0) * costs[op] for row in table for op in E.Counted.COSTED)


def evaluate(path: str, args, data) -> dict:
    model, meta = load_model(path)
    model = model.eval().double()
    lay = E.TokenLayout.for_model(SLOTS, model.bert.config.hidden_size)
    calibration = [(i, t) for i, t, _ in examples_of(data["train"], lay.rows, args.calibrate)]
    approx = polynomial_form(meta["approx"], model, calibration) if args.polynomial else meta["approx"]
    model.set_approx(approx)
    circuit = E.EncoderCircuit(E.Weights.of(model), approx, lay)
    bounds = E.calibrate(circuit, (E.embed(model, ids, tt) for ids, tt in calibration), TOP)
    rows, stages = [], {}
    for k, (ids, tt, label) in enumerate(examples_of(data["validation"], lay.rows, args.examples)):
        with counting(model.bert) as counter:
            ref = E.reference_logits(model, ids, tt)
        start = time.perf_counter()
        got, log, boot = E.simulate(circuit, E.embed(model, ids, tt), TOP, bounds=bounds)
        wall = time.perf_counter() - start
        table = log.table()
        for r in table:
            agg = stages.setdefault(stage_kind(r["stage"]), {})
            for key, v in r.items():
                if key != "stage":
                    agg[key] = agg.get(key, 0) + v / args.examples
        outside = counter.result()
        rows.append({"tokens": len(ids), "label": label, "reference_logits": ref.tolist(), "circuit_logits": got.tolist(),
                     "max_abs_error": float(np.abs(got - ref).max()), "same_prediction": bool(got.argmax() == ref.argmax()),
                     "bootstraps": int(sum(r.get("bootstraps", 0) for r in table)), "bound_overflows": boot.overflows,
                     "poly_inputs_outside": outside, "simulation_seconds": round(wall, 1),
                     "projected_seconds": price(table, args.costs), "stages": table})
        print(f"  example {k}: {len(ids)} tokens, logits {np.round(got, 4)} vs {np.round(ref, 4)} (max error {rows[-1]['max_abs_error']:.1e}), "
              f"{rows[-1]['bootstraps']} bootstraps" + (f", {len(boot.overflows)} bound overflows" if boot.overflows else ""), flush=True)
    return {"checkpoint": repo_relative(path), "trained": {k: meta.get(k) for k in ("seed", "epoch", "dev", "code_version")},
            "approx": approx.to_json(), "label": approx.label(), "layout": {"slots": lay.slots, "width": lay.width, "rows": lay.rows},
            "calibration_examples": len(calibration), "bounds": bounds, "examples": rows,
            "per_example_mean_by_stage": {k: {m: round(v, 2) for m, v in d.items()} for k, d in stages.items()}}


def plot(results: list[dict], path: str):
    plt = pyplot()
    kinds = list(results[0]["per_example_mean_by_stage"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(results)
    for j, res in enumerate(results):
        st = res["per_example_mean_by_stage"]
        x = np.arange(len(kinds)) + j * width
        axes[0].bar(x, [st.get(k, {}).get("bootstraps", 0) for k in kinds], width, label=res["label"][:60])
        axes[1].bar(x, [st.get(k, {}).get("mul", 0) + st.get(k, {}).get("square", 0) for k in kinds], width)
    for ax, title in zip(axes, ("bootstraps per example", "ciphertext products per example")):
        ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle("The whole encoder as one CKKS circuit (slot simulation): cost by stage, all layers", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints to run (students, the teacher)")
    p.add_argument("--examples", type=number(int, "examples", min=1), default=8, help="dev examples (the first that fit a ciphertext; default: %(default)s)")
    p.add_argument("--calibrate", type=number(int, "calibrate", min=1), default=8,
                   help="training examples the bootstrap bounds and the exact softmax's row-sum bound are measured on (default: %(default)s)")
    p.add_argument("--no-polynomial", dest="polynomial", action="store_false",
                   help="refuse a checkpoint whose ops are not all polynomial instead of replacing them by their polynomial kinds")
    p.add_argument("--costs", type=cost_table, help="seconds per operation (a record of experiments.ckks_costs) to price the stages")
    p.add_argument("--backend", choices=("sim",), default="sim", help="sim: numpy slot vectors that count CKKS levels (default)")
    add_config_args(p, TrainConfig, only=("data_dir", "max_length"))
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record and plot go to RESULTS_DIR/fhe/ (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(TrainConfig, args)
    metas = {c: read_checkpoint(c)[1] for c in args.checkpoints}  # every file checked before any work
    _, data = prepare_data(next(iter(metas.values()))["model"], cfg.data_dir, cfg.max_length)
    started, results = time.time(), []
    for path in args.checkpoints:
        print(f"{path}:", flush=True)
        results.append(evaluate(path, args, data))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = plot(results, f"{args.results_dir}/fhe/encrypted_inference-{stamp}.png")
    out = {"command": command_line(), "code_version": code_version(), "machine": machine(torch.device("cpu")), "backend": args.backend,
           "levels_after_bootstrap": TOP, "wall_seconds": round(time.time() - started, 1), "costs": args.costs,
           "results": results, "plot": repo_relative(png)}
    for res in results:
        ok = sum(r["same_prediction"] for r in res["examples"])
        err = max(r["max_abs_error"] for r in res["examples"])
        boots = np.mean([r["bootstraps"] for r in res["examples"]])
        print(f"{res['label']}: predictions equal on {ok}/{len(res['examples'])}, max logit error {err:.1e}, {boots:.0f} bootstraps per example")
    print(f"plot: {png}\nsaved {write_json(Path(args.results_dir) / 'fhe' / f'encrypted_inference-{stamp}.json', out)}")


if __name__ == "__main__":
    run_main(main)
