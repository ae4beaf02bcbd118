"""The polynomial form of a checkpoint's ops: what an encrypted evaluator runs in place of each op
that is not a polynomial, with the exact softmax's intervals and row-sum bound measured on
calibration examples (never fixed constants)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.spec import Spec
from cgf_bert.model.attention import self_attentions

POLYNOMIAL = {"gelu": Spec.make("gelu", "gelu_poly"), "layernorm": Spec.make("layernorm", "ln_poly"),
              "pooler": Spec.make("pooler", "tanh_poly")}

# The widest first row-sum bound (hi / lo) the exact softmax's circuit is given. Goldschmidt's e starts
# about 8 lo/hi below 1, and a bootstrap's worst slot error is 3e-5 of its bound (records ckks_costs):
# at 1e3 the start keeps 30 times that margin; the teacher's single division (a bound 5e16 wide) had none.
FIRST_SUM_RATIO = 1e3
EXP_MARGIN = 1.25  # the exact softmax's exp interval: this times the calibration's centred scores' range


def centred_rows(model, examples) -> list[torch.Tensor]:
    """Every attention row's scores centred on their mean (float64), every layer and head, per example."""
    rows = []

    def tap(module, scores, mask, probs, value, out):
        x = scores.double() - scores.double().mean(-1, keepdim=True)
        rows.append(x.reshape(-1, x.shape[-1]))

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
    return rows


def row_sum_bound(rows: list[torch.Tensor], steps: int = 0) -> tuple[float, float]:
    """(lo/2, 2 hi) of the rows' ``sum exp(x / 2^steps)``."""
    s = torch.cat([torch.exp(x / 2.0**steps).sum(-1) for x in rows])
    return float(s.min()) / 2, float(s.max()) * 2


@dataclass(frozen=True)
class Steps:
    """Square-and-normalise steps and the first row-sum bound they leave."""

    steps: int
    bound: tuple[float, float]

    @property
    def narrow(self) -> bool:
        return self.bound[1] / self.bound[0] <= FIRST_SUM_RATIO


def fewest_steps(rows: list[torch.Tensor], squarings: int) -> Steps:
    """The fewest square-and-normalise steps (at most ``squarings``) whose first row-sum bound is at
    most FIRST_SUM_RATIO wide; ``squarings`` if none is."""
    for h in range(squarings + 1):
        found = Steps(h, row_sum_bound(rows, h))
        if found.narrow:
            return found
    return found


def exact_form(form: Spec, model, calibration, keys: int, steps: int | None) -> Spec:
    """``exact_poly`` with its exp interval (EXP_MARGIN times the centred scores' range) and its row-sum
    bound measured on the calibration examples, and ``steps`` square-and-normalise steps (None: the
    fewest whose first bound is at most FIRST_SUM_RATIO wide)."""
    rows = centred_rows(model, calibration)
    k = form.values["squarings"]
    lo_x, hi_x = EXP_MARGIN * min(float(x.min()) for x in rows), EXP_MARGIN * max(float(x.max()) for x in rows)
    if steps is not None and steps > k:
        raise CgfBertError(f"--norm-steps {steps}: the exact softmax's polynomial has {k} squarings")
    chosen = fewest_steps(rows, k) if steps is None else Steps(steps, row_sum_bound(rows, steps))
    lo, hi = chosen.bound
    return Spec.make("softmax", "exact_poly", **{**form.values, "exp_lo": math.floor(lo_x), "exp_hi": math.ceil(hi_x),
                                                 "sum_lo": lo, "sum_hi": hi, "norm_steps": chosen.steps, "keys": keys})


def polynomial_form(approx: Approximations, model, calibration, keys: int, steps: int | None = None) -> Approximations:
    """Each op the circuit cannot run replaced by its polynomial kind (the checkpoint's own kept); the
    exact softmax's bound and steps from ``exact_form`` (``keys``: the most tokens an example has)."""
    out = approx
    for op, spec in POLYNOMIAL.items():
        if getattr(approx, op).depth is None:
            out = out.replace(**{op: spec})
    if approx.softmax.depth is None:
        if approx.softmax.layers:  # exact_form measures one bound for the model, not one per layer
            raise CgfBertError(f"softmax {approx.softmax.label()}: a per-layer softmax gets no polynomial form here; "
                               "give the checkpoint polynomial specs for every layer (e.g. --softmax-layers 1=exact_poly:...)")
        form = approx.softmax.with_polynomial()
        if form.name == "exact_poly":
            form = exact_form(form, model, calibration, keys, steps)
        out = out.replace(softmax=form)
    return out
