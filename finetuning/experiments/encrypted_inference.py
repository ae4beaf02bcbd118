"""The whole student under CKKS: every encoder layer, the pooler and the classifier as one circuit
(``cgf_bert.fhe.encoder``), the client encrypting the embedding output and decrypting the logits.

Backends (``--backend``):

- ``sim`` (default): numpy slot vectors that count CKKS levels. The slot layout, every rotation and
  product, the level of every ciphertext and the bootstraps are those of the non-interactive run; what
  it does not have is time: the stage table counts operations, and ``--costs FILE`` (seconds per
  operation, measured by ``python -m experiments.ckks_costs``) prices them. ``--noise RECORD`` adds
  to each bootstrap the error a real one made (every slot's error of an ``experiments.ckks_costs``
  record, resampled and scaled with the bound: ``backends.SimulatedCkks``), so the error through
  the layers and the predictions are those to expect under CKKS, at simulation speed; without it
  the simulation is exact.
- ``interactive``: desilofhe ciphertexts, the client decrypting and re-encrypting where the levels
  run out (counted as bootstraps, reported as interactive).
- ``bootstrap``: desilofhe's bootstrappable engine, real non-interactive bootstraps (small key:
  about 10 GB of keys, a few minutes per bootstrap on two cores; ``--layers`` and
  ``--max-tokens`` keep a run short). The simulated plan is printed first; after each layer the
  output is decrypted (a measurement only) and its error against the plaintext layer reported.

The logits are compared with the plaintext reference (the model in float64 with its polynomial
specs). Operations that are
not polynomial (an exact softmax, erf GELU, LayerNorm, tanh) are replaced by their polynomial
kinds first (``--polynomial``, on by default): ``exact`` -> ``exact_poly`` with the row-sum bound
measured on the calibration examples and the square-and-normalise steps that keep it narrow
(``--norm-steps``; a single division would need a bound 5e16 wide, 17 decades, for the teacher),
GELU -> ``gelu_poly``, LayerNorm -> ``ln_poly``, tanh -> ``tanh_poly``, each layer's on its own
interval (1.25 times the GELU and tanh inputs' range, the LayerNorm variances' range widened
2-fold each way) measured on --form-examples training examples of any length, at the least
degree, and for LayerNorm the fewest Newton steps, that meet ``fhe.forms``' tolerances there; a
checkpoint's own polynomial specs are kept. (Measured on the 8 short calibration examples, the
intervals left 1.3e-3 of the dev set's inputs outside and the form lost 0.74 points of dev
accuracy, against 0.25 from 500 examples: summary 73.) A fixed interval is wrong for some checkpoint: the CGF recipe student of seed 42
has layer-0 variances up to about 135, past ``ln_poly``'s default [0.1, 130], and the default's
fit out there, through its Newton steps, stopped the calibration with a non-finite value. A CGF
softmax keeps its exp's degree, but each layer takes the fewest squarings whose interval holds 1.25
times its measured arguments (``--own-exp`` keeps the checkpoint's): that student's layers 1-5 stay
in [-22, 10] where layer 0 needs [-256, 16]. Where the whole attention then fits the levels of one
bootstrap, the layer's input is refreshed once instead of the lane ciphertexts at the exp's input.

``--pack K`` packs K dev examples (of at most 64/K tokens) into one ciphertext's rows: one circuit
serves them, so each example's stage table and projected time are the ciphertext's divided by K.

A rotation is priced by its key switches (``accounting.stage_seconds``), as the bootstrap backend's keys
make it (``--key``: with the small key's rotation and roll keys, its fewest signed power-of-two steps; with
the medium key, the fewest of 15 fixed keys chosen for the rotations of the first checkpoint's circuit on
its calibration examples, ``fhe.keys``), and
each example's rotation steps are recorded, so ``experiments.reprice --key`` prices them for the other keys.

Bootstrap centres and bounds are calibrated on --calibrate training examples: each site's centre is
the mean of what it refreshes, subtracted before the bootstrap and added back after (a bootstrap's
error grows with its input's mean, summary.md finding 88; --no-centre leaves it out), and its bound
(the public scale the centred value is divided by) twice the largest |value - centre| seen there. A
dev value beyond its bound is counted (it would be wrong under CKKS), as are the inputs that leave a
polynomial's interval in the reference.

Level drops (``accounting.Refresher``; --no-drop leaves them out): a first simulation of each ciphertext finds,
for the input and each bootstrap's output, the levels no step before the next bootstrap needs, and the run
drops them as the ciphertext is made. The values and the bootstraps are the same; the products and rotations
run lower, so faster (the layer's input, bootstrapped for the attention, reached the exp's input with 9 levels
to spare). Each example records its drops (``level_drops``).

    cd finetuning
    python -m experiments.encrypted_inference ../checkpoints/STUDENT.pt ../checkpoints_teacher/teacher.pt --examples 8
    python -m experiments.encrypted_inference ../checkpoints/STUDENT.pt --backend bootstrap --layers 1 --examples 1 --max-tokens 24
"""

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from cgf_bert import CgfBertError
from cgf_bert.cli import (
    ArgumentParser,
    add_config_args,
    config_from_args,
    note,
    number,
    run_main,
)
from cgf_bert.config import TASK, TrainConfig
from cgf_bert.data.tasks import data_fingerprint
from cgf_bert.fhe import accounting as A
from cgf_bert.fhe import backends as B
from cgf_bert.fhe import encoder as E
from cgf_bert.fhe import forms as F
from cgf_bert.fhe import keys as K
from cgf_bert.fhe import pipeline as P
from cgf_bert.fhe import staged as S
from cgf_bert.fhe.figures import plot, price
from cgf_bert.model.replaced import counting
from cgf_bert.store.checkpoint import load_model, read_checkpoint
from cgf_bert.store.provenance import (
    RESULTS_DIR,
    code_version,
    command_line,
    machine,
    repo_relative,
)
from cgf_bert.store.records import free_stamp, strict_json, write_json
from cgf_bert.train.run import prepare_data

NON_FINITE = {"": "the circuit's values left float64 (an iteration driven past its range, e.g. by bootstrap noise)"}
SLOTS, TOP = 32768, 17  # desilofhe 2.0's bootstrappable engine: 2^15 slots, 17 levels after a bootstrap


def _shared(table: list[dict], share: float) -> list[dict]:
    """A ciphertext's stage table as one packed example's share of it (every count and time times ``share``)."""
    return [{key: (v if key == "stage" else v * share) for key, v in r.items()} for r in table]


def noise_of(text: str) -> B.BootstrapNoise:
    """``--noise``: none, an ``experiments.ckks_costs`` record (its slots' measured errors) or a Gaussian's sigma."""
    if text == "none":
        return B.BootstrapNoise()
    try:
        sigma = float(text)
    except ValueError:
        try:
            return B.BootstrapNoise.measured(text)
        except CgfBertError as e:
            raise argparse.ArgumentTypeError(f"none, a ckks_costs record with its slot errors, or a sigma >= 0: {e}") from None
    if not (math.isfinite(sigma) and sigma >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: a sigma must be finite and >= 0")
    return B.BootstrapNoise(sigma)


def cost_table(path: str) -> dict:
    """The ``seconds`` per operation of an ``experiments.ckks_costs`` record, at the top level: every
    operation is priced there. Priced instead at the level it ran (``op_levels``) with the record's
    ``seconds_by_level``, one real layer's products and rotations came to 56-59 % of their measured
    time, the top-level prices to 95-100 % (summary.md finding 63): a fresh ciphertext's costs by
    level do not carry over to the circuit's."""
    try:
        seconds = json.loads(Path(path).read_text())["seconds"]
        return {op: float(seconds[op]) for op in A.Counted.COSTED}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{path}: not a cost record with seconds for {', '.join(A.Counted.COSTED)} ({e})") from None


# (top, reserve) of each backend: the level a bootstrap (or the client's refresh) returns, and the
# levels its own scaling takes first (desilofhe 2.0's bootstrappable engine: 17 levels; one for
# x / bound before the bootstrap, the product by the integer bound after it keeping the level:
# ``backends.scaled_bound``). The plan and the calibration need only these, so they run, and a
# circuit that cannot fit fails, before any key is made.
# The simulation plans the non-interactive run: its levels are the bootstrap backend's.
LEVELS = {"sim": (TOP, 1), "interactive": (TOP, 0), "bootstrap": (TOP, 1)}
# the options that shape a run's circuit, its examples and its keys: a run in pieces (--state) keeps them
SHAPING = ("examples", "calibrate", "polynomial", "norm_steps", "form_examples", "own_exp", "backend", "key", "pack", "layers",
           "max_tokens", "max_length")


class Backend:
    """The encrypted backend of ``--backend``, its keys made on first use and then kept for every checkpoint;
    the rotation keys (``fhe.keys``) chosen once, for the first checkpoint's circuit, and counted by every simulation."""

    def __init__(self, args, version: str = ""):
        self.args, self.ops, self.keys, self.version, self.told = args, None, None, version, False
        self.top, self.reserve = LEVELS[args.backend]
        self.pieces = S.Pieces(Path(args.state), None if args.stop_after is None else 60 * args.stop_after) if args.state else None
        if self.pieces:
            self.pieces.agree("options", {k: getattr(args, k) for k in SHAPING} | {"checkpoints": [repo_relative(c) for c in args.checkpoints]})

    def piece(self) -> dict:
        """What a ciphertext's piece of a run records of this process: the keys' time where its keys were made
        (they are made again at every start), a reuse after."""
        ops, first = self.ops, not self.told
        keygen = ops.keygen_s
        self.told = True
        return {"code_version": self.version, "machine": machine(torch.device("cpu")), "threads": self.args.threads,
                **({"keygen_seconds": round(keygen, 1)} if first else {"keys": "made for an earlier ciphertext of this piece"})}

    def rotation_keys(self, counts: dict | None, began: dict | None = None):
        """The keys of ``--key`` (``counts``: a circuit's rotations, what the medium key's are chosen for); the
        interactive backend's, a fixed key for every step; ``began``: those a run in pieces began with (their ``to_json``)."""
        if self.keys is None:
            self.keys = (K.from_json(began, SLOTS) if began else
                         K.rotation_keys("fixed" if self.args.backend == "interactive" else self.args.key, SLOTS, counts))
            note(f"  rotation keys: {self.keys.describe()}")
        return self.keys

    def __call__(self):
        if self.ops is None:
            self.ops = make_backend(self.args, self.keys, self.pieces.secret_key if self.pieces else None)
            if (self.ops.top, getattr(self.ops, "reserve", 0)) != (self.top, self.reserve):
                raise CgfBertError(f"the {self.args.backend} backend gives {self.ops.top} levels, the plan was made for {self.top}")
        return self.ops


def make_backend(args, keys=None, secret_key=None):
    """The encrypted backend (keys made here; the secret key read from ``secret_key`` if that file exists, else written there)."""
    if args.backend == "interactive":
        from cgf_bert.fhe.context import FheContext

        ops = B.CkksOps(FheContext(TOP + 1, thread_count=args.threads, mode=args.mode, secret_key=secret_key))
    else:
        note(f"making the keys ({args.key} bootstrap key; measured here: the small one 1.5-2.5 min and 10 GB with its rotation key, "
             "the medium one about 20 GB)...")
        ops = B.BootstrapOps(args.key, thread_count=args.threads, mode=args.mode, keys=keys if args.key == "medium" else None,
                             secret_key=secret_key)
    if ops.slots != SLOTS:
        raise CgfBertError(f"the {args.backend} backend has {ops.slots} slots, the layout is planned for {SLOTS}")
    return ops


def noise_needs_bootstraps(args) -> None:
    """``--noise`` models a bootstrap's error: the client's refresh (``--backend interactive``) has none."""
    if (args.noise or args.noise_bias) and args.backend == "interactive":
        flag = "--noise" if args.noise else "--noise-bias"
        raise CgfBertError(f"{flag}: the interactive backend refreshes by decrypting and encrypting again, which adds no bootstrap error")


def state_name(path: str) -> str:
    """A state folder as a record names it: relative to the repository, or only its name (no machine's path)."""
    rel = repo_relative(path)
    return rel if not Path(rel).is_absolute() else Path(path).name


def pieces_need_ckks(args) -> None:
    """``--state`` keeps ciphertexts (the simulation has none)."""
    if args.state and args.backend == "sim":
        raise CgfBertError("--state: the simulation keeps no ciphertexts; a run in pieces is --backend interactive or bootstrap")


def gpu_available(args) -> None:
    """``--mode gpu`` checked when the arguments are parsed: the simulation has no device, and desilofhe's
    CPU build refuses a GPU engine (found in a fraction of a millisecond, before any model or key)."""
    if args.mode != "gpu":
        return
    if args.backend == "sim":
        raise CgfBertError("--mode gpu: the simulation runs on numpy; a GPU serves --backend interactive or bootstrap")
    from cgf_bert.fhe.context import desilofhe

    lib = desilofhe()
    try:
        lib.Engine(max_level=2, mode="gpu")
    except Exception as e:  # the CPU build: RuntimeError("Not supported mode"); no device: the CUDA error
        raise CgfBertError(f"--mode gpu: this desilofhe cannot run on a GPU ({e}); its CUDA build on a machine with one can") from None


def truncated(model, layers: int | None):
    """The model cut to its first ``layers`` encoder layers (then the pooler and classifier), the reference of a partial run."""
    if layers is None:
        return model
    if layers > len(model.bert.encoder.layer):
        raise CgfBertError(f"--layers {layers}: the model has {len(model.bert.encoder.layer)} encoder layers")
    model.bert.encoder.layer = model.bert.encoder.layer[:layers]
    model.bert.config.num_hidden_layers = layers
    return model


def pinned(path: str, label: str, bounds: dict, centres: dict, keys, drops: bool) -> dict:
    """What a run in pieces keeps fixed per checkpoint: the centres and level drops only where the circuit has
    them, so that a state begun before they existed goes on under --no-centre or --no-drop."""
    return {"checkpoint": repo_relative(path), "label": label, "bounds": bounds, "rotation_keys": keys.to_json()} | (
        {"centres": centres} if centres else {}) | ({"level_drops": True} if drops else {})


def evaluate(path: str, args, data, backend: Backend, name: str = "model0") -> dict:
    """One checkpoint's record (``name``: its ciphertexts' names in a ``--state`` folder)."""
    model, meta = load_model(path)
    model = truncated(model.eval().double(), args.layers)
    lay = E.TokenLayout.for_model(SLOTS, model.bert.config.hidden_size)
    top, reserve = backend.top, backend.reserve
    fit = lay.rows // args.pack  # tokens an example may have for ``pack`` of them to share a ciphertext
    calibration = [(i, t) for i, t, _ in F.examples_of(data["train"], fit, args.calibrate)]
    measure = [(i, t) for i, t, _ in F.examples_of(data["train"], math.inf, args.form_examples)]
    approx = F.polynomial_form(meta["approx"], model, calibration, lay.rows, args.norm_steps, own_exp=args.own_exp,
                               measure=measure) if args.polynomial else meta["approx"]
    exact = args.polynomial and meta["approx"].softmax.depth is None and approx.softmax.name == "exact_poly"  # exact_form made it
    if approx != meta["approx"]:
        note(f"  polynomial form (intervals from {len(measure)} training examples"
             + (f", the exact softmax's from {len(calibration)}" if exact else "") + f"): {approx.label()}")
    if exact:
        sm = approx.softmax.values
        chosen = F.Steps(sm["norm_steps"], (sm["sum_lo"], sm["sum_hi"]))
        note(f"  exact softmax: {chosen.steps} square-and-normalise steps, first row sums in [{sm['sum_lo']:.3g}, {sm['sum_hi']:.3g}]"
             + ("" if chosen.narrow else f", wider than {F.FIRST_SUM_RATIO:g}"))
    model.set_approx(approx)
    circuit = E.EncoderCircuit(E.Weights.of(model), approx, lay)
    began = backend.pieces.agreed(name) if backend.pieces else None
    if began and "bounds" in began:  # going on: the calibration it began with, not minutes of simulation to find it again
        bounds, centres = began["bounds"], began.get("centres", {}) if args.centre else {}
        if args.centre and bounds and not centres:
            raise CgfBertError(f"--state {args.state}: its run was begun without bootstrap centres: go on with --no-centre")
        keys = backend.rotation_keys(None, began["rotation_keys"])
        note(f"  bounds, centres and rotation keys: those the run in {state_name(args.state)} began with")
    else:
        # packed and alone: a pack's circuit bootstraps other sites than a lone example's (a dev pack may be one short)
        groups = P.packs(calibration, args.pack, lay.rows) + ([[ex] for ex in calibration] if args.pack > 1 else [])
        steps: dict = {}
        bounds, centres = P.calibrate(circuit, (P.one([P.embed(model, ids, tt) for ids, tt in g]) for g in groups), top, reserve,
                                      steps=steps, centre=args.centre)
        keys = backend.rotation_keys(steps)
    if backend.pieces:  # a run in pieces goes on only with the circuit it began with (the form, checked here)
        try:
            backend.pieces.agree(name, pinned(path, approx.label(), bounds, centres, keys, args.drop))
        except CgfBertError as e:
            if began and args.drop != ("level_drops" in began):
                raise CgfBertError(f"{e}; it was begun " + ("without level drops: go on with --no-drop" if args.drop
                                                            else "with level drops: go on without --no-drop")) from None
            raise
    rows = []
    limit = min(fit, args.max_tokens or fit)
    chosen = F.examples_of(data["validation"], limit, args.examples)
    if not chosen:
        raise CgfBertError(f"no dev example has at most {limit} tokens")
    if len(chosen) < args.examples:
        note(f"  only {len(chosen)} dev examples have at most {limit} tokens")
    k = 0
    for c, group in enumerate(P.packs([(ids, tt) for ids, tt, _ in chosen], args.pack, lay.rows)):
        with counting(model.bert) as counter:
            refs = [P.reference(model, ids, tt) for ids, tt in group]
        hidden = [np.concatenate([h[i] for _, h in refs]) for i in range(len(refs[0][1]))]  # the packed rows, in order
        emb = P.one([P.embed(model, ids, tt) for ids, tt in group])
        start = time.perf_counter()
        planned: list[dict] = []
        with np.errstate(over="ignore", invalid="ignore"):  # values driven past float64 are reported below, not warned about
            drops = P.level_drops(circuit, emb, top, reserve, bounds, centres) if args.drop else {}
            got, log, boot = P.simulate(circuit, emb, top, reserve, bounds=bounds, centres=centres, noise=args.noise, seed=c, drops=drops,
                                        keys=keys, measure=args.backend != "sim" and bool(args.noise),
                                        probe=P.layer_errors(circuit, B.SimulatedCkks(lay.slots, top), hidden, planned))
        wall = time.perf_counter() - start
        simulated = np.atleast_2d(got)
        share = 1.0 / len(group)  # the ciphertext's cost, shared by the examples packed in it
        table = _shared(log.table(), share)
        levels = {op: {lv: n * share for lv, n in d.items()} for op, d in log.level_table().items()}
        plan = {kind: d.get("bootstraps", 0) for kind, d in A.summed(table).items()}
        per_layer, wall_seconds = planned, None
        if args.backend != "sim":
            try:
                measured = S.encrypted(circuit, backend, bounds, emb, hidden, backend.pieces, f"{name}-pack{c}",
                                       [ids.tolist() for ids, _ in group], backend.piece, note, centres, drops)
            except S.Stopped as stop:  # the stopped run's record keeps the examples finished so far, against the model
                stop.finished[name] = {"checkpoint": repo_relative(path), "label": approx.label(), "layers": len(model.bert.encoder.layer),
                                       "examples": rows, "per_example_mean_by_stage": A.mean_by_kind([r["stages"] for r in rows])}
                raise
            got, per_layer, table = measured.logits, measured.per_layer, _shared(measured.table, share)
            wall_seconds = round(sum(r.get("seconds", 0) + r.get("bootstrap_seconds", 0) for r in table), 1)
        got = np.atleast_2d(got)
        for j, ((ids, _), (ref, _)) in enumerate(zip(group, refs)):
            row = {"tokens": len(ids), "label": chosen[k][2], "ciphertext": c, "examples_in_ciphertext": len(group),
                   "reference_logits": ref.tolist(), "simulated_logits": simulated[j].tolist(),
                   "bootstraps": round(sum(plan.values()), 2), "bootstrap_plan": plan, "bound_overflows": boot.overflows,
                   "bootstrap_input_means": boot.means, "watched_peaks": boot.watched, "poly_inputs_outside": counter.result(), "simulation_seconds": round(wall * share, 1),
                   "projected_seconds": price(table, args.costs), "op_levels": levels,
                   "rotation_steps": log.steps_by_kind(share), "mean_levels": A.mean_levels(levels), "level_drops": drops}
            if args.backend != "sim":
                row.update(simulated_per_layer=planned, encrypted_logits=got[j].tolist(), wall_seconds=wall_seconds, pieces=measured.pieces,
                           bootstrap_errors=measured.bootstrap_errors, bootstrap_offsets=measured.bootstrap_offsets,
                           simulated_bootstrap_errors=boot.errors, simulated_bootstrap_offsets=boot.offsets)
            finite = bool(np.isfinite(got[j]).all())  # a NaN's argmax is 0: it must not count as a prediction
            row.update(finite=finite, max_abs_error=float(np.abs(got[j] - ref).max()),
                       same_prediction=finite and bool(got[j].argmax() == ref.argmax()), per_layer=per_layer, stages=table)
            rows.append(row)
            note(f"  example {k}: {len(ids)} tokens" + (f" (one of {len(group)} in ciphertext {c})" if len(group) > 1 else "")
                 + f"; plan: {row['bootstraps']:g} bootstraps ("
                 + ", ".join(f"{kind} {b:g}" for kind, b in plan.items() if b) + ")"
                 + (f", projected {row['projected_seconds'] / 60:.0f} min" if args.costs else "")
                 + f"; logits {np.round(got[j], 4)} vs {np.round(ref, 4)} (max error {row['max_abs_error']:.1e})"
                 + (f", {len(boot.overflows)} bound overflows" if boot.overflows else "") + ("" if finite else ", NOT FINITE"))
            k += 1
    return {"checkpoint": repo_relative(path), "trained": {k: meta.get(k) for k in ("seed", "epoch", "dev", "code_version")},
            "approx": approx.to_json(), "label": approx.label(), "layers": len(model.bert.encoder.layer),
            "layout": {"slots": lay.slots, "width": lay.width, "rows": lay.rows},
            "calibration_examples": len(calibration), "form_examples": len(measure), "examples_per_ciphertext": args.pack, "bounds": bounds, "centres": centres, "examples": rows,
            "per_example_mean_by_stage": A.mean_by_kind([r["stages"] for r in rows])}


def finished_line(examples: list[dict]) -> str:
    """'predictions equal on 7/8, max logit error 1.2e-03', and how many examples' logits are not finite."""
    ok = sum(r["same_prediction"] for r in examples)
    lost = sum(not r["finite"] for r in examples)
    err = max(r["max_abs_error"] for r in examples) if not lost else float("inf")
    return (f"predictions equal on {ok}/{len(examples)}, max logit error {err:.1e}"
            + (f" ({lost} examples' logits not finite: a value the circuit cannot hold)" if lost else ""))


def replot(record: dict, path: str):
    """The figure of an encrypted_inference record, at ``path``: refused for a record from before the
    per-layer errors were kept (its error panel would be empty)."""
    results = record["results"]
    if not all("layers" in r and r["examples"] and all(ex.get("per_layer") for ex in r["examples"]) for r in results):
        raise CgfBertError("the record keeps no per-layer errors (a run from before they were measured): its error panel cannot be drawn")
    return plot(results, path, measured=record["backend"] != "sim", noise=record.get("bootstrap_noise"), costs=record.get("costs"))


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints to run (students, the teacher)")
    p.add_argument("--examples", type=number(int, "examples", min=1), default=8, help="dev examples (the first that fit a ciphertext; default: %(default)s)")
    p.add_argument("--calibrate", type=number(int, "calibrate", min=1), default=8,
                   help="training examples the bootstrap bounds and the exact softmax's row-sum bound are measured on (default: %(default)s)")
    p.add_argument("--no-polynomial", dest="polynomial", action="store_false",
                   help="refuse a checkpoint whose ops are not all polynomial instead of replacing them by their polynomial kinds")
    p.add_argument("--norm-steps", type=number(int, "norm-steps", min=0),
                   help="square-and-normalise steps of an exact softmax's polynomial form (exact_poly's norm_steps; default: the "
                        f"fewest whose first row-sum bound, measured on --calibrate examples, is at most {F.FIRST_SUM_RATIO:g} wide)")
    p.add_argument("--form-examples", type=number(int, "form-examples", min=1), default=500,
                   help="training examples (any length) the polynomial form's intervals are measured on: GELU, LayerNorm, tanh, "
                        "CGF's exp (an exact softmax's exp interval and row sums: the --calibrate examples, which fit the rows) (default: %(default)s)")
    p.add_argument("--own-exp", action="store_true",
                   help="keep a CGF checkpoint's exp polynomial in every layer (default: each layer's squarings cut to the fewest "
                        "whose interval holds 1.25 times its exp arguments measured on --form-examples examples, fhe.forms.cgf_form)")
    p.add_argument("--costs", type=cost_table, help="seconds per operation (a record of experiments.ckks_costs) to price the stages")
    p.add_argument("--backend", choices=("sim", "interactive", "bootstrap"), default="sim",
                   help="sim: numpy slot vectors that count CKKS levels (default); interactive: CKKS, the client refreshing "
                        "ciphertexts where levels run out; bootstrap: CKKS with desilofhe's non-interactive bootstraps")
    p.add_argument("--noise", type=noise_of, default=B.BootstrapNoise(), metavar="none|RECORD|SIGMA",
                   help="the simulation's bootstrap error: each slot's error drawn from those a real bootstrap made (RECORD: an "
                        "experiments.ckks_costs record, e.g. ../results/fhe/ckks_costs-20261201-212609.json, the small key) "
                        "or Gaussian of SIGMA on [-1, 1], scaled back with the bound (default: none, an exact simulation)")
    p.add_argument("--noise-bias", type=number(float, "noise-bias"), default=0.0, metavar="K",
                   help="the simulation's bootstrap also errs in every slot by K m^3, m the mean over all slots of its input on "
                        "[-1, 1]: the offset real bootstraps add (summary.md 88-93: K = -1.5e-3 on the medium key, the offset "
                        "opposing the mean; pass it as --noise-bias=-1.5e-3) (default: %(default)s)")
    p.add_argument("--key", choices=("small", "medium"), default="small",
                   help="bootstrap key of --backend bootstrap, and the keys the simulation counts rotations for: small (8.5 GB "
                        "of keys, 245 s a bootstrap here, with the rotation and roll keys: a rotation takes its fewest signed "
                        "powers of two) or medium (about 20 GB in all, 65 s, with 15 fixed rotation keys chosen for the circuit's "
                        "rotations, printed: a rotation takes the fewest of them) (default: %(default)s)")
    p.add_argument("--threads", type=number(int, "threads", min=1), help="desilofhe's threads (default: the library's)")
    p.add_argument("--mode", choices=("cpu", "gpu"), default="cpu",
                   help="desilofhe's device for --backend interactive or bootstrap: cpu, or gpu with desilofhe's CUDA build "
                        "on a machine with a GPU (default: %(default)s)")
    p.add_argument("--pack", type=number(int, "pack", min=1), default=1,
                   help="examples per ciphertext: consecutive dev examples share one (their tokens in its rows; attention "
                        "never crosses them) and its cost; calibration is packed the same way (default: %(default)s)")
    p.add_argument("--no-drop", dest="drop", action="store_false",
                   help="run every step at the level the last bootstrap left, instead of dropping, as each ciphertext is "
                        "made, the levels no step before its next bootstrap needs (the same values and bootstraps, the "
                        "products and rotations lower, so faster). A --state run begun before level drops existed goes on "
                        "only with this")
    p.add_argument("--no-centre", dest="centre", action="store_false",
                   help="bootstrap each value as it is, instead of less a public centre (its site's mean over the --calibrate "
                        "examples) added back after: a real bootstrap errs by an offset that grows as the cube of its input's "
                        "mean (summary.md, finding 88). A --state run begun before centres existed goes on only with this")
    p.add_argument("--layers", type=number(int, "layers", min=1),
                   help="run only the first N encoder layers, then the pooler and classifier (the reference is the model cut the same way)")
    p.add_argument("--max-tokens", type=number(int, "max-tokens", min=2),
                   help="score only dev examples of at most this many tokens (default: those that fit a ciphertext)")
    p.add_argument("--state", metavar="DIR",
                   help="run in pieces (--backend interactive or bootstrap): after each encoder layer the ciphertext and the "
                        "measurements so far go to DIR, and the same command goes on from the last finished layer. DIR holds "
                        "the client's secret key: keep it out of the repository. Going on, the run keeps the bootstrap bounds, centres "
                        "and rotation keys it began with (no calibration again); the polynomial form is measured again and must agree")
    p.add_argument("--stop-after", type=number(float, "stop-after", min=0), metavar="MIN",
                   help="with --state: begin no encoder layer that would end (timed as the last) more than MIN minutes after "
                        "the start; the run stops with its state saved and a partial record. 0: after the plan, begin none and make "
                        "no key, only the partial record of what DIR holds (after a run that was killed)")
    add_config_args(p, TrainConfig, only=("data_dir", "max_length"))
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record and plot go to RESULTS_DIR/fhe/ (default: %(default)s)")
    p.checks += [gpu_available, noise_needs_bootstraps, pieces_need_ckks]
    args = p.parse_args()
    if args.stop_after is not None and not args.state:  # refused before any work (each flag alone parses)
        raise CgfBertError("--stop-after: a run stopped part-way goes on only from a --state folder")
    if args.stop_after == 0 and not [p for p in Path(args.state).glob("*.json") if p.name != "state.json"]:
        raise CgfBertError(f"--stop-after 0 records what {args.state} holds, and it holds no run's progress")
    args.noise = dataclasses.replace(args.noise, bias=args.noise_bias)
    cfg = config_from_args(TrainConfig, args)
    metas = {c: read_checkpoint(c)[1] for c in args.checkpoints}  # every file checked before any work
    _, data = prepare_data(next(iter(metas.values()))["model"], cfg.data_dir, cfg.max_length)
    started, results, version = time.time(), [], code_version()  # the code that runs, not the code at the end
    backend = Backend(args, version)
    if backend.pieces:
        backend.pieces.agree("data", data_fingerprint(TASK, cfg.data_dir))
        backend.pieces.secret_key  # noqa: B018 (refused here, not after calibration, if progress has lost its key)
    try:
        for j, path in enumerate(args.checkpoints):
            note(f"{path}:")
            results.append(evaluate(path, args, data, backend, f"model{j}"))
    except S.Stopped as stop:  # the state is on disk; what was measured so far is recorded
        finished = {f"model{j}": res for j, res in enumerate(results)} | stop.finished  # checkpoints done, then the stopped one's examples
        done = [res for res in finished.values() if res["examples"]]
        stamp = free_stamp(Path(args.results_dir) / "fhe", "encrypted_inference_partial-{}.json", "encrypted_inference_partial-{}.png", start=started)
        png = plot(done, f"{args.results_dir}/fhe/encrypted_inference_partial-{stamp}.png", measured=args.backend != "sim",
                   noise=args.noise.to_json() if args.noise else None, costs=args.costs) if done else None
        out = {"command": command_line(), "code_version": version, "machine": machine(torch.device("cpu")), "backend": args.backend,
               "state": state_name(args.state), "stopped": str(stop), "finished": finished, "plot": png and repo_relative(png),
               "progress": backend.pieces.progress()}
        out, out["non_finite"] = strict_json(out, NON_FINITE)
        path = write_json(Path(args.results_dir) / "fhe" / f"encrypted_inference_partial-{stamp}.json", out)
        more = "the command without --stop-after 0" if args.stop_after == 0 else "the same command"
        for res in done:
            print(f"{res['label']}: {finished_line(res['examples'])} (the examples finished so far)")
        print(f"{stop}, its state in {args.state}: {more} goes on from there.\nsaved {path} (what was measured so far)"
              + (f"\nplot: {png} (the examples finished so far)" if png else ""))
        return
    ops = backend.ops
    keys = None if ops is None else {"keygen_seconds": round(ops.keygen_s, 1), "key_bytes": getattr(ops, "key_bytes", None),
                                     "interactive": ops.interactive}
    noise = args.noise.to_json() if args.noise else None
    stamp = free_stamp(Path(args.results_dir) / "fhe", "encrypted_inference-{}.json", "encrypted_inference-{}.png", start=started)
    png = plot(results, f"{args.results_dir}/fhe/encrypted_inference-{stamp}.png", measured=args.backend != "sim", noise=noise, costs=args.costs)
    out = {"command": command_line(), "code_version": version, "machine": machine(torch.device("cpu")), "backend": args.backend, "mode": args.mode,
           "bootstrap_noise": noise,
           "keys": keys, "rotation_keys": backend.keys.to_json(), "levels_after_bootstrap": backend.top, "levels_reserved": backend.reserve, "wall_seconds": round(time.time() - started, 1), "costs": args.costs,
           "results": results, "plot": repo_relative(png), "state": state_name(args.state) if args.state else None}
    for res in results:
        boots = np.mean([r["bootstraps"] for r in res["examples"]])
        over = sum(bool(r["bound_overflows"]) for r in res["examples"])
        strayed = sum(bool((r["poly_inputs_outside"] or {}).get("outside")) for r in res["examples"])
        what = {"sim": f"slot simulation, bootstrap noise {args.noise.sigma:.1e} rms" + (f", offset {args.noise.bias:g} m^3" if args.noise.bias else "") if args.noise else "slot simulation, no CKKS noise", "interactive": "CKKS, interactive refreshes", "bootstrap": "CKKS, non-interactive"}[args.backend]
        print(f"{res['label']} [{what}; {res['layers']} encoder layers]: {finished_line(res['examples'])}, {boots:.0f} bootstraps per example"
              + (f"; {over} examples overflowed a bootstrap bound (under CKKS those values are wrong)" if over else "")
              + (f"; in {strayed} examples a polynomial's inputs left its interval (the reference itself is off there)" if strayed else ""))
    out, out["non_finite"] = strict_json(out, NON_FINITE)
    print(f"plot: {png}\nsaved {write_json(Path(args.results_dir) / 'fhe' / f'encrypted_inference-{stamp}.json', out)}")


if __name__ == "__main__":
    run_main(main)
