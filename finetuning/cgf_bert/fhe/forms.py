"""The polynomial form of a checkpoint's ops: what an encrypted evaluator runs in place of each op
that is not a polynomial, with every interval measured on calibration examples (never fixed
constants): the exact softmax's exp interval and row-sum bound, and each layer's GELU inputs,
LayerNorm variances and the pooler's tanh inputs. A fit's degree (and LayerNorm's Newton steps)
is the cheapest in levels that meets its tolerance on the whole measured interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.chebyshev import ChebyshevFit
from cgf_bert.approx.layernorm import rsqrt
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.spec import Spec
from cgf_bert.fhe.encoder import EXP_SLOT_LIMIT
from cgf_bert.model.attention import tapped
from cgf_bert.model.replaced import layer_norms

# Each op an encrypted evaluator cannot run, and the polynomial kind it runs instead.
POLYNOMIAL = {"gelu": "gelu_poly", "layernorm": "ln_poly", "pooler": "tanh_poly"}
DEGREES = (8, 16, 32, 64, 128)  # the fits' degrees tried, cheapest first (a power of two fills its levels)
FIT_TOL = 1e-3  # GELU's and tanh's largest |fit - fn| on the interval (gelu_poly's default d=64 gives 1.3e-3 on [-18, 25])
RSQRT_TOL = 1e-4  # LayerNorm's largest relative error of 1/sqrt(v) after Newton, 3 times a bootstrap's slot error
VAR_MARGIN = 2.0  # a LayerNorm's variance interval: [lo / this, hi * this] of the calibration's (it spans decades)

# The widest first row-sum bound (hi / lo) the exact softmax's circuit is given. Goldschmidt's e starts
# about 8 lo/hi below 1, and a bootstrap's worst slot error is 3e-5 of its bound (records ckks_costs):
# at 1e3 the start keeps 30 times that margin; the teacher's single division (a bound 5e16 wide) had none.
FIRST_SUM_RATIO = 1e3
EXP_MARGIN = 1.25  # the exact softmax's exp interval: this times the calibration's centred scores' range
# CGF's exp with fewer squarings: its largest relative error on the narrowed interval (the trained
# d=8 [-256, 16] k=8 gives 1.5e-8; k=5 on [-32, 16] 5.2e-8), 30 times below a bootstrap's slot error.
EXP_REL_TOL = 1e-6
EXP_GRID = 20001  # points of [lo, hi] that relative error is checked on


def examples_of(split, rows: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """The first ``count`` examples of ``split`` with at most ``rows`` tokens: (ids, token types, label)."""
    out = []
    for ex in split:
        if len(ex["input_ids"]) <= rows:
            out.append((torch.tensor(ex["input_ids"]), torch.tensor(ex["token_type_ids"]), int(ex["labels"])))
        if len(out) == count:
            break
    return out


def centred_rows(model, examples) -> list[torch.Tensor]:
    """Every attention row's scores centred on their mean (float64), every layer and head, per example."""
    rows = []

    def tap(module, scores, mask, probs, value, out):
        x = scores.double() - scores.double().mean(-1, keepdim=True)
        rows.append(x.reshape(-1, x.shape[-1]))

    layers = len(model.bert.encoder.layer)
    with tapped(model.bert, dict.fromkeys(range(layers), tap)):
        _forward(model, examples)
    return rows


def _extend(span: dict, key, t: torch.Tensor) -> None:
    """``span[key]``, a (min, max), widened to hold ``t``."""
    lo, hi = span.get(key, (math.inf, -math.inf))
    span[key] = (min(lo, float(t.min())), max(hi, float(t.max())))


def _forward(model, examples) -> None:
    """Each (ids, token types) example through ``model`` alone, unpadded (what the taps and hooks see)."""
    with torch.no_grad():
        for ids, tt in examples:
            model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], token_type_ids=tt[None])


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


def cgf_arguments(model, examples, coeffs: list[float]) -> dict[tuple[str, int], tuple[float, float]]:
    """Per layer k, on ``examples``: (min, max) of CGF's exp argument ``s - mu - c var`` (``("arg", k)``)
    and of the row's shift ``mu + c var`` (``("shift", k)``, what the circuit's lanes without a key carry
    into the exp's basis), ``c = coeffs[k]``."""
    span: dict = {}

    def tap_of(k):
        def tap(module, scores, mask, probs, value, out):
            s = scores.double()
            shift = s.mean(-1, keepdim=True) + coeffs[k] * s.var(-1, unbiased=False, keepdim=True)
            _extend(span, ("arg", k), s - shift)
            _extend(span, ("shift", k), shift)
        return tap

    layers = len(model.bert.encoder.layer)
    with tapped(model.bert, {k: tap_of(k) for k in range(layers)}):
        _forward(model, examples)
    if len(span) < 2 * layers:
        raise CgfBertError(f"CGF's exp arguments: no example reached the attention ({len(examples)} examples given)")
    return span


def _widened(lo: float, hi: float) -> tuple[float, float]:
    """EXP_MARGIN times [lo, hi] about its centre."""
    c, h = (lo + hi) / 2, EXP_MARGIN * (hi - lo) / 2
    return c - h, c + h


def fewer_squarings(spec: Spec, lo: float, hi: float, shift: tuple[float, float] | None = None) -> Spec:
    """``cgf_poly`` ``spec`` with the fewest squarings whose interval still holds EXP_MARGIN times the
    measured arguments [lo, hi]: each squaring left out halves the interval's lower end (the fit's own
    interval [lo/2^k, hi/2^k] keeps its left end), at a level less, where the fit stays within
    EXP_REL_TOL of exp and, given the rows' ``shift`` range, the lanes without a key (which carry
    ``to_unit(-shift)``) stay within EXP_SLOT_LIMIT of the basis. ``spec`` itself where none is
    cheaper (a wide layer, like layer 0's heads) or where the arguments pass its upper end, which is
    kept (the circuit then counts those inputs as outside, as for any polynomial)."""
    v = spec.values
    if EXP_MARGIN * hi > v["exp_hi"]:
        return spec
    for k in range(v["squarings"] + 1):
        low = v["exp_lo"] / 2.0 ** (v["squarings"] - k)
        if low > EXP_MARGIN * lo:
            continue
        poly = PolyExp(v["degree"], low, v["exp_hi"], k)
        if shift is not None and max(abs(float(poly.to_unit(-m))) for m in _widened(*shift)) > EXP_SLOT_LIMIT:
            continue
        x = torch.linspace(low, v["exp_hi"], EXP_GRID, dtype=torch.float64)
        if float((poly(x) / torch.exp(x) - 1).abs().max()) <= EXP_REL_TOL:
            return Spec.make("softmax", "cgf_poly", **{**v, "exp_lo": low, "squarings": k})
    return spec


def cgf_form(form: Spec, model, calibration) -> Spec:
    """A ``cgf_poly`` softmax with each layer's squarings cut to its measured arguments (``fewer_squarings``)."""
    layers = form.per_layer(len(model.bert.encoder.layer))
    span = cgf_arguments(model, calibration, [s.values["coeff"] for s in layers])
    narrowed = {k: fewer_squarings(s, *span[("arg", k)], shift=span[("shift", k)]) for k, s in enumerate(layers)}
    return _layered(max(narrowed.values(), key=lambda s: s.depth), narrowed)


def op_ranges(model, examples) -> dict:
    """(min, max) on ``examples`` under the checkpoint's own ops: per layer the GELU inputs and the
    ``v = var + eps`` both LayerNorms divide by the sqrt of; the pooler's tanh inputs."""
    bert, span = model.bert, {}
    seen = lambda key, t: _extend(span, key, t)  # noqa: E731
    hooks = [bert.pooler.dense.register_forward_hook(lambda m, i, out: seen("pooler", out))]
    for k, layer in enumerate(bert.encoder.layer):
        hooks.append(layer.intermediate.dense.register_forward_hook(lambda m, i, out, k=k: seen(("gelu", k), out)))
        for ln in layer_norms(layer).values():
            hooks.append(ln.register_forward_pre_hook(
                lambda m, i, k=k: seen(("layernorm", k), i[0].double().var(-1, unbiased=False) + m.eps)))
    try:
        _forward(model, examples)
    finally:
        for h in hooks:
            h.remove()
    return span


def fit_form(op: str, lo: float, hi: float) -> Spec:
    """GELU's or tanh's polynomial kind on EXP_MARGIN times [lo, hi] about its centre, of the least
    degree within FIT_TOL there."""
    wide_lo, wide_hi = _widened(lo, hi)
    a, b = math.floor(wide_lo), math.ceil(wide_hi)
    name = POLYNOMIAL[op]
    for d in DEGREES:
        if ChebyshevFit(name.split("_")[0], d, a, b).max_error() <= FIT_TOL:
            return Spec.make(op, name, degree=d, lo=a, hi=b)
    raise CgfBertError(f"{op}: no fit of degree <= {DEGREES[-1]} is within {FIT_TOL:g} of it on the measured "
                       f"[{a}, {b}] (inputs {lo:.3g}..{hi:.3g} on the calibration examples)")


def rsqrt_form(lo: float, hi: float) -> Spec:
    """``ln_poly`` on [lo / VAR_MARGIN, hi * VAR_MARGIN]: the degree and Newton steps of fewest levels
    whose 1/sqrt(v) is within RSQRT_TOL (relative) on the whole interval."""
    a, b = float(f"{lo / VAR_MARGIN:.2g}"), float(f"{hi * VAR_MARGIN:.2g}")
    v = torch.from_numpy(np.geomspace(a, b, 4001))
    best = None
    for d in DEGREES:
        fit = ChebyshevFit("rsqrt", d, a, b)
        n = next((n for n in range(17) if float((rsqrt(v, fit, n) * v.sqrt() - 1).abs().max()) <= RSQRT_TOL), None)
        if n is not None:
            spec = Spec.make("layernorm", "ln_poly", degree=d, var_lo=a, var_hi=b, newton=n)
            best = spec if best is None or spec.depth < best.depth else best  # the registry's depth: levels
    if best is None:
        raise CgfBertError(f"layernorm: no fit of degree <= {DEGREES[-1]} with at most 16 Newton steps gives 1/sqrt(v) "
                           f"within {RSQRT_TOL:g} on [{a:g}, {b:g}] (variances {lo:.3g}..{hi:.3g} on the calibration examples)")
    return best


def measured_forms(model, calibration) -> dict[str, Spec]:
    """Each op of POLYNOMIAL in its polynomial kind, per layer where it is per layer, with intervals
    from ``op_ranges`` on the calibration examples."""
    span = op_ranges(model, calibration)
    out = {"pooler": fit_form("pooler", *span["pooler"])}
    for op, form in (("gelu", lambda r: fit_form("gelu", *r)), ("layernorm", lambda r: rsqrt_form(*r))):
        layers = {k: form(span[(op, k)]) for k in range(len(model.bert.encoder.layer))}
        out[op] = _layered(max(layers.values(), key=lambda s: s.depth), layers)
    return out


def _layered(base: Spec, layers: dict[int, Spec]) -> Spec:
    """``base`` with each layer's spec where it differs from it."""
    return Spec.make(base.op, base.name, layers={k: s for k, s in layers.items() if s != base}, **base.values)


def _kept(own: Spec, measured: Spec, layers: int) -> Spec:
    """``measured`` where ``own`` is exact, ``own`` in the layers where it already is a polynomial."""
    if own.op == "pooler" or own.is_exact:
        return measured
    mixed = {k: own.for_layer(k) if own.for_layer(k).depth is not None else measured.for_layer(k) for k in range(layers)}
    return _layered(measured.plain(), mixed)


def polynomial_form(approx: Approximations, model, calibration, keys: int, steps: int | None = None,
                    own_exp: bool = False, measure=None) -> Approximations:
    """Each op the circuit cannot run replaced by its polynomial kind on intervals measured on
    ``measure`` (default: the calibration examples; ``measured_forms``; the checkpoint's own
    polynomial ops kept); CGF's exp with each layer's squarings cut to its measured arguments
    (``cgf_form``) unless ``own_exp``. The exact softmax's bound and steps come from ``exact_form`` on
    the calibration examples (``keys``: the most tokens an example has): its row sums grow with the
    keys a row has, so they are measured on examples the circuit's rows can hold."""
    out, measure = approx, calibration if measure is None else measure
    missing = [op for op in POLYNOMIAL if getattr(approx, op).depth is None]
    if missing:
        forms = measured_forms(model, measure)
        out = out.replace(**{op: _kept(getattr(approx, op), forms[op], len(model.bert.encoder.layer)) for op in missing})
    if approx.softmax.depth is None:
        if approx.softmax.layers:  # exact_form measures one bound for the model, not one per layer
            raise CgfBertError(f"softmax {approx.softmax.label()}: a per-layer softmax gets no polynomial form here; "
                               "give the checkpoint polynomial specs for every layer (e.g. --softmax-layers 1=exact_poly:...)")
        form = approx.softmax.with_polynomial()
        if form.name == "exact_poly":
            form = exact_form(form, model, calibration, keys, steps)
        out = out.replace(softmax=form)
    sm = out.softmax
    if not own_exp and all(s.name == "cgf_poly" for s in sm.per_layer(len(model.bert.encoder.layer))):
        out = out.replace(softmax=cgf_form(sm, model, measure))
    return out
