"""One attention layer of a trained checkpoint evaluated under CKKS encryption (desilofhe).

For N real MRPC dev examples (a seeded sample): the layer's scores are computed in plaintext,
encrypted (many rows per ciphertext), the layer's softmax is evaluated homomorphically in its
polynomial form with the --poly exp (for CGF: row mean and variance by rotations, the polynomial
exp, squarings, the public mask and 1/n; ``fhe.circuits`` holds the circuit of each polynomial
kind), multiplied by the plaintext V, and decrypted; the decrypted attention output is put back
into the plaintext model, which finishes the forward pass. Reported: errors against the plaintext
softmax (real exp) and its polynomial form, depth, ring size, slots, time per ciphertext and per
row, and whether the predictions equal the plaintext model's on every example. With --teacher,
the teacher's exact softmax in its polynomial form (exp without a max, the row sum, a Goldschmidt
reciprocal over each assumed --sum-bound) runs under the same scheme on the teacher's same layer,
on the first --exact-examples examples, next to the student on the same examples: the
side-by-side of depth, time and error. A checkpoint whose softmax has no circuit is refused.

    pip install -e ".[fhe]"      # desilofhe, the optional CKKS library
    cd finetuning
    python -m experiments.encrypted_attention ../checkpoints/STUDENT.pt --teacher ../checkpoints_teacher/teacher.pt
"""

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.spec import Spec
from cgf_bert.cli import (
    ArgumentParser,
    Interval,
    field_type,
    note,
    number,
    poly_exp,
    run_main,
)
from cgf_bert.config import TrainConfig
from cgf_bert.data.loader import make_loader
from cgf_bert.fhe.circuits import circuit_for
from cgf_bert.fhe.references import _centre
from cgf_bert.model.layer_io import capture_blocks, forward_with_layer_output
from cgf_bert.store.checkpoint import load_model
from cgf_bert.store.provenance import (
    RESULTS_DIR,
    code_version,
    command_line,
    machine,
    repo_relative,
)
from cgf_bert.store.records import strict_json, write_json
from cgf_bert.train.engine import resolve_device, set_seed
from cgf_bert.train.run import prepare_data

# Why a figure of this record can be non-finite (strict JSON writes null and says so).
NON_FINITE_REASONS = {
    "exact": "a row sum outside the assumed bound: Goldschmidt's error term grows without limit, overflows the "
             "CKKS modulus and corrupts every row of its ciphertext (and the float64 circuit overflows too)",
}


def circuit_of(path: str, spec: Spec, layer: int, poly: PolyExp, **params):
    """The circuit of checkpoint ``path``'s softmax in ``layer``: its polynomial form with exp ``poly``
    and ``params`` set (an exact softmax's sum bounds), or one line saying why there is none."""
    try:
        form = spec.for_layer(layer).with_polynomial(poly)
        return circuit_for(Spec.make(form.op, form.name, **{**form.values, **params}))
    except CgfBertError as e:
        raise CgfBertError(f"{path}: {e}") from None


def exp_arguments(circuit, blocks) -> np.ndarray:
    """Every valid exp argument the circuit's polynomial sees on ``blocks`` (CGF's ``x - c var``; the
    exact circuit's mean-centred scores)."""
    args = []
    for scores, valid, _ in blocks:
        m = np.broadcast_to(np.asarray(valid, bool), scores.shape)
        x = circuit.argument(scores, valid) if hasattr(circuit, "argument") else _centre(scores, valid)[3]
        args.append(x[m])
    return np.concatenate(args)


def fitted_poly(args: np.ndarray, degree: int = 8) -> PolyExp:
    """Degree ``degree`` on the measured range, each end widened to the next power of two (at least
    [-8, 2]), with the squarings that bring the fitted interval to width 2 or less: [-256, 16] gets
    8, as cgf_poly's default."""
    lo = -(2.0 ** max(3, math.ceil(math.log2(max(-float(args.min()), 1.0) * 1.05))))
    hi = 2.0 ** max(1, math.ceil(math.log2(max(float(args.max()), 1.0) * 1.05)))
    return PolyExp(degree, lo, hi, max(0, math.ceil(math.log2((hi - lo) / 2.0))))


def checked_poly(given: PolyExp | None, args: np.ndarray, flag: str, where: str) -> PolyExp:
    """``given``, refused if any argument leaves its interval; else the fit to the measured range."""
    if given is None:
        return fitted_poly(args)
    out = int(((args < given.lo) | (args > given.hi)).sum())
    if out:
        raise CgfBertError(f"{flag} {given.degree},{given.lo:g},{given.hi:g},{given.squarings}: {out} of {args.size} exp arguments of "
                           f"{where} fall outside [{given.lo:g}, {given.hi:g}] (measured {args.min():.3g} .. {args.max():.3g}); "
                           f"leave {flag} out to fit the interval to the measured range")
    return given


def with_layer(spec: Spec, layer: int, plain: Spec) -> Spec:
    """``spec`` with layer ``layer`` running ``plain`` instead."""
    return Spec.make(spec.op, spec.name, layers={**dict(spec.layers), layer: plain}, **spec.values)


def require_fhe() -> None:
    """The optional CKKS library, checked before any data loads."""
    from cgf_bert.fhe.context import desilofhe

    desilofhe()


def context_for(*circuits):
    """The smallest CKKS context for ``circuits``; a clear error if desilofhe is missing."""
    from cgf_bert.fhe.context import FheContext  # needs desilofhe

    return FheContext.for_circuits(*circuits)


@dataclass
class Layer:
    """One model's layer on the sampled examples: blocks grouped by row width, and plaintext logits."""

    blocks: list  # (scores, valid, V) per (example, head), example-major
    logits: torch.Tensor  # (N, 2) plaintext
    batches: list  # the batches, for putting outputs back


def take_layer(model, batches, layer: int) -> Layer:
    blocks, logits = [], []
    for batch in batches:
        b, lg = capture_blocks(model, batch, layer)
        blocks += b
        logits.append(lg)
    return Layer(blocks, torch.cat(logits), batches)


def width_of(k: int) -> int:
    """The power-of-two row width a row of ``k`` keys is padded to (at least 16)."""
    return max(16, 1 << (k - 1).bit_length())


def run_encrypted(blocks, circuit, ctx):
    """Blocks grouped by width (short rows pack more per ciphertext), one report per width."""
    from cgf_bert.fhe.attention import (
        encrypted_attention,  # runs on desilofhe ciphertexts
    )

    outs, probs, reports = [None] * len(blocks), [None] * len(blocks), []
    for w in sorted({width_of(s.shape[1]) for s, _, _ in blocks}):
        idx = [i for i, (s, _, _) in enumerate(blocks) if width_of(s.shape[1]) == w]
        o, p, rep = encrypted_attention([blocks[i] for i in idx], circuit, ctx=ctx, width=w)
        for j, i in enumerate(idx):
            outs[i], probs[i] = o[j], p[j]
        reports.append(rep.as_dict())
        note(rep.summary())
    return outs, probs, reports


def put_back(model, layer_data: Layer, layer: int, outs) -> torch.Tensor:
    """Logits when the layer's attention output is ``outs`` (decrypted), the rest in plaintext."""
    logits, k = [], 0
    heads = model.bert.config.num_attention_heads
    for batch in layer_data.batches:
        n = batch["input_ids"].shape[0] * heads
        logits.append(forward_with_layer_output(model, batch, layer, outs[k:k + n]))
        k += n
    return torch.cat(logits)


def combine(reports: list[dict]) -> dict:
    """The per-width reports as one: sums of counts and times, max of errors and depths."""
    out = {k: sum(r[k] for r in reports) for k in ("rows", "blocks", "ciphertexts", "encrypt_s", "eval_s", "decrypt_s", "total_s")}
    out["per_ct_s"], out["per_row_s"] = out["eval_s"] / out["ciphertexts"], out["eval_s"] / out["rows"]
    out["depth_used"] = max(r["depth_used"] for r in reports)
    out["errors"] = {ref: {k: max(r["errors"][ref][k] for r in reports) if k.endswith("max") else
                           sum(r["errors"][ref][k] * r["rows"] for r in reports) / out["rows"]
                           for k in reports[0]["errors"][ref]} for ref in reports[0]["errors"]}
    for k in ("ring_size", "slots", "keygen_s", "key_bytes"):
        out[k] = reports[0][k]
    out["widths"] = [r["width"] for r in reports]
    counts = {k for r in reports for k in r["flagged"] if not k.endswith("_max")}  # rows and arguments out of bounds
    out["flagged"] = {k: sum(rep["flagged"].get(k, 0) for rep in reports) for k in sorted(counts)}
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    pa, pb = a.argmax(-1), b.argmax(-1)
    return {"same": int((pa == pb).sum()), "of": len(pa), "max_logit_diff": float((a - b).abs().max())}


@torch.no_grad()  # scoped to this call: an in-process caller (a test) keeps its gradients
def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="a student checkpoint whose softmax has a polynomial form with a circuit (CGF)")
    p.add_argument("--teacher", help="an exact checkpoint: also run the exact softmax under encryption, side by side")
    p.add_argument("--layer", type=number(int, "layer", min=0), default=0, help="the attention layer to encrypt, from 0 (default: %(default)s)")
    p.add_argument("--examples", type=number(int, "examples", min=1), default=64, help="dev examples, a seeded sample (default: %(default)s)")
    p.add_argument("--exact-examples", type=number(int, "exact-examples", min=1), default=4,
                   help="the first K of them for the exact-vs-CGF side-by-side (the exact circuit is slow) (default: %(default)s)")
    p.add_argument("--poly", type=poly_exp, default=None, metavar="D,LO,HI,K",
                   help="the student's exp polynomial: degree, interval, squarings (default: degree 8 on the interval "
                        "measured on the sampled examples' layer, see fitted_poly); arguments outside it are refused")
    p.add_argument("--exact-poly", type=poly_exp, default=None, metavar="D,LO,HI,K",
                   help="exp polynomial of the exact circuit, on scores centred by their mean (default: fitted to the "
                        "teacher's measured range, as --poly); arguments outside it are refused")
    p.add_argument("--sum-bound", type=number(float, "sum-bound", above=0.0), action=Interval, metavar=("LO", "HI"),
                   help="assumed bounds of the exact circuit's row sums of exp(s - mean); repeat for one exact run "
                        "per bound (default: 32 65536). Rows outside a bound are counted and their error reported")
    p.add_argument("--seed", type=field_type(TrainConfig, "seed"), default=0, help="seed of the example sample (default: %(default)s)")
    p.add_argument("--data-dir", help="folder of GLUE MRPC TSVs (default: as the step scripts)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record goes to RESULTS_DIR/fhe/ (default: %(default)s)")
    args = p.parse_args()
    args.sum_bound = args.sum_bound or [(32.0, 65536.0)]
    device = resolve_device("cpu")  # the encrypted part is CPU work; the plaintext model is small
    student, meta = load_model(args.checkpoint)
    spec = student.softmax
    if not 0 <= args.layer < student.bert.config.num_hidden_layers:
        raise CgfBertError(f"--layer {args.layer}: the model has layers 0..{student.bert.config.num_hidden_layers - 1}")
    circuit_of(args.checkpoint, spec, args.layer, PolyExp())  # a softmax without a circuit: refused before any data loads
    teacher = load_teacher(args) if args.teacher else None
    require_fhe()
    tokenizer, data = prepare_data(meta["model"], args.data_dir, 128)
    set_seed(args.seed)
    dev = data["validation"]
    sample = dev.select(sorted(np.random.default_rng(args.seed).choice(len(dev), min(args.examples, len(dev)), replace=False).tolist()))
    batches = list(make_loader(sample, tokenizer, 16))
    # The exp intervals come from this layer's measured arguments (or are checked against them), before any encryption.
    cgf_layer = take_layer(student, batches, args.layer)
    probe = circuit_of(args.checkpoint, spec, args.layer, PolyExp())
    args.poly = checked_poly(args.poly, exp_arguments(probe, cgf_layer.blocks), "--poly", f"layer {args.layer} of {args.checkpoint}")
    circuit = circuit_of(args.checkpoint, spec, args.layer, args.poly)
    exact_circuits = exact_circuits_for(args, teacher, batches) if teacher is not None else []
    ctx = context_for(circuit)
    record = {"command": command_line(), "code_version": code_version(), "device": machine(device),
              "checkpoint": repo_relative(args.checkpoint), "softmax": spec.to_json(), "layer": args.layer,
              "examples": len(sample), "example_idx": [int(i) for i in sample["idx"]], "seed": args.seed}

    # The student's layer encrypted; the plaintext references are the student itself (real exp)
    # and the student with the circuit's spec in this layer (the function the circuit computes).
    poly_logits = torch.cat([student.set_softmax(with_layer(spec, args.layer, circuit.spec))(**b)["logits"] for b in batches])
    student.set_softmax(spec)
    start = time.perf_counter()
    outs, _, reports = run_encrypted(cgf_layer.blocks, circuit, ctx)
    enc_logits = put_back(student, cgf_layer, args.layer, outs)
    record["cgf"] = {"circuit": combine(reports), "per_width": reports, "wall_s": time.perf_counter() - start,
                     "predictions_vs_plaintext_cgf": agreement(enc_logits, cgf_layer.logits),
                     "predictions_vs_plaintext_cgf_poly": agreement(enc_logits, poly_logits)}

    if teacher is not None:
        record["side_by_side"] = side_by_side(args, teacher, exact_circuits, student, cgf_layer, circuit, ctx)
    record["poly"] = {"student": vars_of(args.poly), "exact": vars_of(args.exact_poly) if teacher is not None else None}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record, record["non_finite"] = strict_json(record, NON_FINITE_REASONS)
    path = write_json(f"{args.results_dir}/fhe/encrypted_attention-{stamp}.json", record)
    report(record)
    print(f"saved {path}")


def load_teacher(args):
    """The --teacher model; refused unless its softmax is exact."""
    teacher, _ = load_model(args.teacher)
    if not teacher.softmax.is_exact:
        raise CgfBertError(f"--teacher {args.teacher} runs {teacher.softmax.label()}, not the exact softmax")
    return teacher


def exact_circuits_for(args, teacher, batches) -> list:
    """The circuit of the teacher's exact softmax at each --sum-bound, its exp interval measured on the
    side-by-side's examples (or --exact-poly, checked against them)."""
    k = min(args.exact_examples, sum(b["input_ids"].shape[0] for b in batches))
    probe = circuit_of(args.teacher, teacher.softmax, args.layer, PolyExp())
    blocks = take_layer(teacher, _first(batches, k), args.layer).blocks
    args.exact_poly = checked_poly(args.exact_poly, exp_arguments(probe, blocks), "--exact-poly", f"layer {args.layer} of {args.teacher}")
    return [circuit_of(args.teacher, teacher.softmax, args.layer, args.exact_poly, sum_lo=lo, sum_hi=hi) for lo, hi in args.sum_bound]


def _first(batches, k: int) -> list:
    """The batches cut to their first ``k`` examples (batches of 16)."""
    return [{key: v[: k - 16 * i] for key, v in b.items()} for i, b in enumerate(batches[: (k + 15) // 16])]


def side_by_side(args, teacher, exact_circuits, student, cgf_layer: Layer, cgf_circuit, cgf_ctx) -> dict:
    """Exact (teacher) at each assumed row-sum bound and the student on the same first K examples,
    each circuit with its own (smallest) context."""
    k = min(args.exact_examples, cgf_layer.logits.shape[0])
    heads = student.bert.config.num_attention_heads
    batches = _first(cgf_layer.batches, k)
    exact_layer = take_layer(teacher, batches, args.layer)
    sums = np.concatenate([np.exp(s - s.mean(-1, keepdims=True)).sum(-1) for s, _, _ in exact_layer.blocks])
    out = {"examples": k, "teacher": repo_relative(args.teacher),
           "row_sums": {"min": float(sums.min()), "max": float(sums.max()), "rows": int(sums.size)}, "exact": []}
    for exact in exact_circuits:
        e_outs, _, e_reports = run_encrypted(exact_layer.blocks, exact, context_for(exact))
        out["exact"].append({"sum_bound": list(exact.sum_bound), "circuit": combine(e_reports), "per_width": e_reports,
                             "predictions_vs_plaintext_teacher": agreement(put_back(teacher, exact_layer, args.layer, e_outs), exact_layer.logits)})
    c_outs, _, c_reports = run_encrypted(cgf_layer.blocks[: k * heads], cgf_circuit, cgf_ctx)
    c_part = Layer(cgf_layer.blocks[: k * heads], cgf_layer.logits[:k], batches)
    out["cgf"] = {"circuit": combine(c_reports), "per_width": c_reports,
                  "predictions_vs_plaintext_cgf": agreement(put_back(student, c_part, args.layer, c_outs), c_part.logits)}
    return out


def report(rec: dict) -> None:
    print(f"\nlayer {rec['layer']}, {rec['examples']} dev examples, {rec['checkpoint']} ({rec['softmax']})")
    parts = [("student (all examples)", rec["cgf"])]
    if "side_by_side" in rec:
        side = rec["side_by_side"]
        parts.append((f"student (first {side['examples']})", side["cgf"]))
        parts += [(f"exact, sums in {e['sum_bound']} (first {side['examples']})", e) for e in side["exact"]]
        print(f"  teacher row sums of exp(s - mean) on those examples: {side['row_sums']['min']:.3g} .. {side['row_sums']['max']:.3g}")
    for name, part in parts:
        ci = part["circuit"]
        errs = ", ".join(f"vs {ref} max {_g(e['probs_max'])}" for ref, e in ci["errors"].items())
        agree = next(v for k, v in part.items() if k.startswith("predictions_vs_plaintext"))
        print(f"  {name}: depth {ci['depth_used']}, ring 2^{int(np.log2(ci['ring_size']))}, {ci['ciphertexts']} ct, "
              f"{ci['eval_s']:.1f} s ({ci['per_ct_s']:.2f} s/ct, {1e3 * ci['per_row_s']:.1f} ms/row); probs {errs}; "
              f"predictions equal on {agree['same']}/{agree['of']}; out of bounds {ci['flagged']}")


def vars_of(poly: PolyExp) -> dict:
    return {"degree": poly.degree, "lo": poly.lo, "hi": poly.hi, "squarings": poly.squarings}


def _g(x) -> str:
    return "null" if x is None else f"{x:.1e}"


if __name__ == "__main__":
    run_main(main)
