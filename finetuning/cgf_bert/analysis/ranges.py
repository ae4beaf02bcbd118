"""Where a model's numbers live: what an encrypted (CKKS) evaluator of it would have to cover.

Measured over a loader's valid entries only (real query tokens x real keys), through a tap on
each self-attention layer and forward hooks on the GELU and LayerNorm inputs, so no BERT code
is copied:

- the CGF exp argument ``x - c*var`` (``x`` a row's centred scores, ``var`` their population
  variance) per layer and head: its range, exact percentiles, and the share outside an interval
  a polynomial exp is fitted on. A layer running CGF uses its own ``c``; an exact layer shows
  the argument CGF would see at a given ``c``;
- the CGF row sums ``sum_j exp(x_j - c*var) / n`` over a row's ``n`` valid keys (an exact
  softmax's rows sum to 1; CGF's only on average, and how far they spread is the question);
- the GELU inputs and the variances the two LayerNorms of each layer divide by (the other
  non-polynomial steps);
- against a teacher: the KL of each attention row (the student's rows renormalised for this
  comparison only), and the attention output's range and norm.

Percentiles are exact: every value is kept, and the ranks they read are found by partitioning
(see ``_Pass`` for why that fits in memory).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from cgf_bert import CgfBertError
from cgf_bert.approx.softmax import VARIANCE_COEFF, centred
from cgf_bert.approx.layernorm import WHERE
from cgf_bert.approx.spec import Spec
from cgf_bert.data.loader import to_device
from cgf_bert.model.attention import Tap, self_attentions, tapped
from cgf_bert.model.bert import BertMRPC
from cgf_bert.model.replaced import layer_norms
from cgf_bert.store import records

PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)  # reported for every distribution: 0.1/99.9 bound all but the far tails
DEFAULT_INTERVALS = ((-32.0, 32.0),)  # cgf_poly's default fit interval for exp
FLOOR = float(torch.finfo(torch.float32).tiny)  # a student probability float32 rounded to 0, in the KL (1.2e-38)

# ---------------------------------------------------------------- per-batch measurements


def exp_argument(scores: torch.Tensor, mask: torch.Tensor | None, coeff: float) -> torch.Tensor:
    """``x - c*var``, the argument CGF exponentiates, (B, H, Q, K) float32.

    ``scores`` (B, H, Q, K); ``mask`` (B, 1, Q, K) bool, True = valid key, or None. Computed with
    the softmax's own ``centred`` in float32, as ``cgf`` does; masked keys hold ``-c*var``, not
    a value CGF uses, so callers select the valid entries.
    """
    valid = None if mask is None else mask.to(torch.float32)
    x, var, _ = centred(scores.float(), valid)  # (B, H, Q, K), (B, H, Q, 1)
    return x - coeff * var


def cgf_row_sums(arg: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``sum_j exp(arg_j) / n`` over each row's ``n`` valid keys, (B, H, Q) float64.

    float64 so that an argument up to ~709 still gives a number (float32 overflows above ~88),
    and so that constant scores (argument 0) give exactly 1.
    """
    e = torch.exp(arg.double())  # (B, H, Q, K)
    if mask is None:
        return e.sum(-1) / arg.shape[-1]
    return torch.where(mask, e, 0.0).sum(-1) / mask.sum(-1)  # (B, H, Q) / (B, 1, Q)


def attention_kl(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None, floor: float = FLOOR) -> torch.Tensor:
    """KL(teacher row || student row) over the valid keys, (B, H, Q) float64, in nats.

    The student's rows are renormalised to sum 1 for this comparison only (CGF rows do not
    sum to 1, and KL compares distributions). So on the same scores a renormalised CGF row is
    the exact softmax row: the KL sees what earlier layers changed (and float32 underflow),
    not a layer's own row-sum error, which ``cgf_row_sums`` measures.

    A teacher probability of 0 adds 0. A student probability of exactly 0 is taken as
    ``floor`` first: exp never gives 0, float32 does below an argument of about -103 (CGF's
    reaches -196 in the MRPC teacher's first layer), and without the floor one such key makes
    the row's KL, and its layer's mean, inf (``floored`` counts them).
    """
    p, q = teacher.double(), student.double()  # (B, H, Q, K)
    q = torch.where(q == 0, floor, q)
    if mask is not None:
        p, q = p.masked_fill(~mask, 0.0), q.masked_fill(~mask, 0.0)
    q = q / q.sum(-1, keepdim=True)
    return torch.special.xlogy(p, p).sum(-1) - torch.special.xlogy(p, q).sum(-1)


def floored(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many valid entries ``attention_kl`` floors: student 0 where the teacher has mass."""
    hit = (student == 0) & (teacher > 0)  # (B, H, Q, K)
    return int((hit if mask is None else hit & mask).sum())


# ---------------------------------------------------------------- exact summaries


def ranks(n: int, percentiles: Iterable[float] = PERCENTILES) -> list[int]:
    """The 0-based ranks of the order statistics that min, max and ``percentiles`` of ``n`` values read."""
    out = {0, n - 1}
    for q in percentiles:
        i = math.floor((n - 1) * q / 100.0)
        out |= {i, min(i + 1, n - 1)}
    return sorted(out)


def percentile(ordered: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of a 1-D array that holds its order statistics at the ``ranks`` (sorted,
    or partitioned at them), interpolated linearly between the two nearest ranks (numpy's default)."""
    h = (len(ordered) - 1) * q / 100.0
    i = math.floor(h)
    lo, hi = float(ordered[i]), float(ordered[min(i + 1, len(ordered) - 1)])
    return lo if hi == lo else lo + (h - i) * (hi - lo)


def pct_key(q: float) -> str:
    """'p0.1', 'p1', 'p99.9': a percentile's key in the summaries."""
    return f"p{q:g}"


def summarise(values: np.ndarray, percentiles: Iterable[float] = PERCENTILES) -> dict[str, Any]:
    """count, mean, std (population), min, max and percentiles of a 1-D array, exactly.

    ``values`` is reordered in place: partitioned at the ranks the figures read (``np.partition``,
    linear time, where sorting the 33 M GELU inputs of a layer on MRPC dev costs seconds more).
    """
    v = values
    if len(v) == 0:
        return {"count": 0}
    v.partition(ranks(len(v), percentiles))
    with np.errstate(invalid="ignore", over="ignore"):  # an inf value gives an inf or nan moment: strict_json notes it
        out = {"count": int(len(v)), "mean": float(v.mean(dtype=np.float64)), "std": float(v.std(dtype=np.float64)),
               "min": float(v[0]), "max": float(v[-1])}
    return out | {pct_key(q): percentile(v, q) for q in percentiles}


def outside(values: np.ndarray, lo: float, hi: float) -> dict[str, Any]:
    """How many of ``values`` lie below ``lo`` and above ``hi``, and their share."""
    below, above = int((values < lo).sum()), int((values > hi).sum())
    return {"lo": lo, "hi": hi, "below": below, "above": above, "share": (below + above) / len(values) if len(values) else None}


def _distribution(values: np.ndarray, intervals=()) -> dict[str, Any]:
    out = {"outside": [outside(values, lo, hi) for lo, hi in intervals]} if intervals else {}
    return summarise(values) | out


def _per_head(chunks: list[torch.Tensor], intervals=()) -> tuple[dict, list[dict]]:
    """All heads pooled, and each head: summaries of per-batch chunks (H, n_b), emptied as read."""
    v = torch.cat(chunks, dim=1).numpy()  # (H, N)
    chunks.clear()  # free the chunks at once: the arguments of a layer are ~60 MB on MRPC dev
    heads = [_distribution(row, intervals) for row in v]  # each row reordered in place
    return _distribution(v.reshape(-1), intervals), heads  # then all of them, reordered in place too


def _pooled(chunks: list[torch.Tensor], interval: tuple[float, float, str] | None = None) -> dict:
    """Summary of the chunks' values; with ``(lo, hi, source)``, the share outside that interval too."""
    v = torch.cat(chunks).numpy()  # (N,)
    chunks.clear()
    out = {"outside": {**outside(v, interval[0], interval[1]), "interval_from": interval[2]}} if interval else {}
    return summarise(v) | out


# The polynomial kind whose default interval an exact op's inputs are compared with.
FIT_OF = {"gelu": "gelu_poly", "layernorm": "ln_poly", "pooler": "tanh_poly"}


def op_interval(spec: Spec) -> tuple[float, float, str]:
    """The interval a layer's op covers: its own polynomial's (a kind that declares one), else the
    default of the op's polynomial kind (what a swap to it would have to cover)."""
    if spec.kind.interval is not None:
        return (*spec.kind.interval(spec.values), spec.label())
    fit = Spec.make(spec.op, FIT_OF[spec.op])
    return (*fit.kind.interval(fit.values), f"default {fit.label()}")


# ---------------------------------------------------------------- one pass over the data


def _heads(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, *S) at the ``valid`` (B, *S) entries, per head: (H, n) on the CPU."""
    return t.transpose(0, 1)[:, valid].cpu()


class _Pass:
    """What one pass gathers, valid entries only, on the CPU; ``layers`` reduces it.

    Exact percentiles need every value. MRPC dev is 408 pairs of 53 tokens on average (21.7 k
    tokens, 1.22 M (query, key) pairs per head): the exp arguments of 6 layers x 12 heads are
    88 M float32 (350 MB) and the GELU inputs 6 x 21.7 k x 1536 = 200 M float32 (800 MB), so
    one pass holds about 1.2 GB; the rest (row sums, variances, norms, KL per row) is a few MB.
    The script's run on all of MRPC dev (teacher pass, then a student pass beside the teacher)
    peaked at 2.9 GB resident.
    """

    def __init__(self, coeffs: list[float]):
        n = len(coeffs)
        self.coeffs = coeffs
        self.tokens: torch.Tensor | None = None  # (B, T) bool: the current batch's real tokens
        self.teacher: tuple[torch.Tensor, ...] | None = None  # the teacher's (B, H, T, T) probs per layer, this batch
        self.args, self.row_sums, self.kl = ([[] for _ in range(n)] for _ in range(3))  # chunks (H, n_b)
        self.gelu, self.ln_attention, self.ln_output, self.norms = ([[] for _ in range(n)] for _ in range(4))  # chunks (n_b,)
        self.pooler: list[torch.Tensor] = []  # chunks (B * hidden,): the pooler's tanh inputs
        self.approx = None  # the model's Approximations: the intervals its polynomial ops cover
        self.ranges: list[list[tuple[float, float]]] = [[] for _ in range(n)]  # per batch (min, max) of the attention output
        self.floored = [0] * n  # student probabilities the KL took as FLOOR (valid rows and keys)

    def tap(self, i: int) -> Tap:
        """Layer ``i``'s tap: exp arguments, row sums, attention output and KL of the batch."""

        def fn(module, scores, mask, probs, value, out):
            rows = self.tokens  # (B, Q) real query tokens
            keys = rows[:, None, :] if mask is None else mask[:, 0]  # (B, Q | 1, K) the keys the softmax used
            valid = rows[:, :, None] & keys  # (B, Q, K) real query x valid key
            arg = exp_argument(scores, mask, self.coeffs[i])  # (B, H, Q, K)
            self.args[i].append(_heads(arg, valid))
            self.row_sums[i].append(_heads(cgf_row_sums(arg, mask), rows))
            ctx = out.transpose(1, 2).flatten(2)[rows].float()  # (r, H*D): a token's heads side by side, as dense sees them
            self.ranges[i].append((ctx.min().item(), ctx.max().item()))
            self.norms[i].append(ctx.norm(dim=-1).cpu())
            if self.teacher is not None:
                self.kl[i].append(_heads(attention_kl(self.teacher[i], probs, mask), rows))
                self.floored[i] += floored(self.teacher[i], probs, valid[:, None])

        return fn

    @contextmanager
    def hooks(self, bert) -> Any:
        """Forward hooks on each layer's GELU input and LayerNorm inputs and on the pooler's tanh input, removed on exit."""
        handles = []
        if bert.pooler is not None:
            handles.append(bert.pooler.dense.register_forward_hook(self._pooler))
        for i, layer in enumerate(bert.encoder.layer):
            handles.append(layer.intermediate.dense.register_forward_hook(partial(self._gelu, i)))
            handles.append(layer.attention.output.LayerNorm.register_forward_pre_hook(partial(self._ln, self.ln_attention[i])))
            handles.append(layer.output.LayerNorm.register_forward_pre_hook(partial(self._ln, self.ln_output[i])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _pooler(self, module, inputs, output):
        self.pooler.append(output.float().flatten().cpu())  # (B * hidden,) the dense output tanh receives

    def _gelu(self, i, module, inputs, output):
        self.gelu[i].append(output[self.tokens].float().flatten().cpu())  # (r * intermediate,)

    def _ln(self, chunks, module, inputs):
        h = inputs[0].float()  # (B, T, hidden): the residual sum LayerNorm normalises
        chunks.append(h.var(-1, unbiased=False)[self.tokens].cpu())  # (r,) population variance, as LayerNorm divides by

    def _interval(self, op_name: str, i: int | None = None) -> tuple[float, float, str] | None:
        if self.approx is None:
            return None
        spec = self.approx.specs()[op_name]
        return op_interval(spec if i is None else spec.for_layer(i))

    def layers(self, intervals) -> list[dict[str, Any]]:
        """Each layer's summaries (the collected values are freed as they are read)."""
        return [self._layer(i, intervals) for i in range(len(self.coeffs))]

    def _layer(self, i: int, intervals) -> dict[str, Any]:
        args, args_heads = _per_head(self.args[i], intervals)
        sums, sums_heads = _per_head(self.row_sums[i])
        lo, hi = zip(*self.ranges[i])
        out = {
            "layer": i, "coeff": self.coeffs[i], "exp_arg": args, "exp_arg_heads": args_heads,
            "row_sum": sums, "row_sum_heads": sums_heads, "gelu_input": _pooled(self.gelu[i], self._interval("gelu", i)),
            "ln_var_attention": _pooled(self.ln_attention[i], self._interval("layernorm", i)),
            "ln_var_output": _pooled(self.ln_output[i], self._interval("layernorm", i)),
            "attention_output": {"min": min(lo), "max": max(hi), "norm": _pooled(self.norms[i])},
        }
        if self.kl[i]:
            out["kl"], out["kl_heads"] = _per_head(self.kl[i])
            out["kl_floored_entries"] = self.floored[i]
        return out


def _check_pair(model: BertMRPC, teacher: BertMRPC) -> None:
    a, b = model.bert.config, teacher.bert.config
    if (a.num_hidden_layers, a.num_attention_heads) != (b.num_hidden_layers, b.num_attention_heads):
        raise CgfBertError(f"teacher has {b.num_hidden_layers} layers x {b.num_attention_heads} heads, the model "
                           f"{a.num_hidden_layers} x {a.num_attention_heads}: attention maps compare only on the same shape")


@torch.no_grad()
def analyse(
    model: BertMRPC,
    loader,
    device: torch.device | None = None,
    coeff: float = VARIANCE_COEFF,
    intervals: Iterable[tuple[float, float]] = DEFAULT_INTERVALS,
    teacher: BertMRPC | None = None,
    desc: str = "analysis",
) -> dict[str, Any]:
    """Every measurement of the module docstring for ``model`` over ``loader``, per layer.

    ``coeff`` is the ``c`` of the layers whose softmax has none (exact); ``intervals`` the
    ``(lo, hi)`` whose outside share of exp arguments is counted; ``teacher`` (same tokenizer,
    layers and heads) adds the per-row attention KL. Runs in float32 without autocast: the
    point is the numbers a CKKS evaluator has to cover, not bf16 approximations of them.
    """
    device = device or next(model.parameters()).device
    model.to(device).eval()
    if teacher is not None:
        _check_pair(model, teacher)
        teacher.to(device).eval()
    intervals = [(float(lo), float(hi)) for lo, hi in intervals]
    specs = [m.softmax_spec for m in self_attentions(model.bert)]
    acc = _Pass([float(s.values.get("coeff", coeff)) for s in specs])
    acc.approx = model.approx
    examples = tokens = 0
    with tapped(model.bert, {i: acc.tap(i) for i in range(len(specs))}), acc.hooks(model.bert):
        for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
            batch = to_device(batch, device)
            acc.tokens = batch["attention_mask"].bool()  # (B, T)
            acc.teacher = None if teacher is None else teacher(**batch, needs=("attentions",))["attentions"]
            model(**batch)
            examples, tokens = examples + len(acc.tokens), tokens + int(acc.tokens.sum())
    layers = [{"softmax": s.label(), **layer} for s, layer in zip(specs, acc.layers(intervals))]
    pooler = _pooled(acc.pooler, acc._interval("pooler")) if acc.pooler else None
    return {"softmax": model.softmax.to_json(), "approx": model.approx.to_json(), "label": model.approx.label(), "coeff": coeff,
            "intervals": [list(iv) for iv in intervals], "examples": examples, "tokens": tokens, "layers": layers,
            "pooler_input": pooler}


@torch.no_grad()
def attention_maps(model: BertMRPC, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """The attention probabilities of ``layer`` for a one-example batch: (H, T, T) on the CPU."""
    model.eval()
    batch = to_device(batch, next(model.parameters()).device)
    return model(**batch, needs=("attentions",))["attentions"][layer][0].float().cpu()


def kl_matrix(result: dict) -> np.ndarray:
    """Mean KL to the teacher per (layer, head), (L, H), from ``analyse``'s result with a teacher."""
    return np.array([[h["mean"] for h in layer["kl_heads"]] for layer in result["layers"]])


# ---------------------------------------------------------------- records and tables


# Why a value can be non-finite, by the measurement it belongs to (strict JSON holds null instead).
NON_FINITE_REASONS = {
    ".kl": "the student gives probability 0 (or a negative polynomial exp) where the teacher gives mass",
    ".row_sum": "exp of the argument overflows float64 (an argument above ~709)",
}


def strict_json(obj: Any, where: str = "") -> tuple[Any, list[dict[str, str]]]:
    """``records.strict_json`` with the reasons this module's figures become non-finite."""
    return records.strict_json(obj, NON_FINITE_REASONS, where)


def _g(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict, interval: int = 0) -> str:
    """One line per layer: exp-argument range, share outside ``intervals[interval]``, row sums,
    GELU input and LayerNorm variance ranges, and the mean KL to the teacher when measured."""
    lo, hi = result["intervals"][interval]
    head = (f"{'layer':>5} {'c':>5} {'arg min':>9} {'p0.1':>8} {'p99.9':>8} {'max':>8} {f'out[{lo:g},{hi:g}]':>13} "
            f"{'row sum mean±std':>18} {'GELU in':>17} {'LN1 var':>17} {'LN2 var':>17} {'KL':>9}")
    lines = [head]
    for layer in result["layers"]:
        a, s = layer["exp_arg"], layer["row_sum"]
        kl = layer.get("kl", {}).get("mean")
        share = a["outside"][interval]["share"]
        rows = f"{_g(s['mean'], '.3f')}±{_g(s['std'], '.3f')}"
        rng = {k: f"{_g(layer[k]['min'])}..{_g(layer[k]['max'])}" for k in ("gelu_input", "ln_var_attention", "ln_var_output")}
        lines.append(
            f"{layer['layer']:>5} {layer['coeff']:>5g} {_g(a['min']):>9} {_g(a['p0.1']):>8} {_g(a['p99.9']):>8} {_g(a['max']):>8} "
            f"{_g(None if share is None else share * 100) + ' %':>13} {rows:>18} "
            f"{rng['gelu_input']:>17} {rng['ln_var_attention']:>17} {rng['ln_var_output']:>17} {_g(kl, '.3g'):>9}"
        )
    lines += _outside_lines(result)
    return "\n".join(lines)


def _outside_lines(result: dict) -> list[str]:
    """The GELU, LayerNorm and pooler inputs outside the intervals their (or the default) polynomials cover."""
    out = []
    for key, what in (("gelu_input", "GELU inputs"), ("ln_var_attention", "LayerNorm variances after attention"),
                      ("ln_var_output", "LayerNorm variances after the feed-forward")):
        shares = [layer[key]["outside"] for layer in result["layers"] if "outside" in layer.get(key, {})]
        if shares:
            worst = max(shares, key=lambda s: s["share"] or 0)
            out.append(f"{what} outside {worst['interval_from']}: at most {_g((worst['share'] or 0) * 100)} % of a layer's")
    pooler = result.get("pooler_input")
    if pooler and "outside" in pooler:
        o = pooler["outside"]
        out.append(f"pooler tanh inputs {_g(pooler['min'])}..{_g(pooler['max'])}; outside {o['interval_from']}: {_g((o['share'] or 0) * 100)} %")
    return out


# ---------------------------------------------------------------- calibration


@torch.no_grad()
def mean_ln_variances(model: BertMRPC, loader, device: torch.device) -> list[dict[str, float]]:
    """Per layer, each LayerNorm's input variance (population, as LayerNorm divides by it) averaged
    over the real tokens of ``loader``: the constants ``ln_affine`` divides by instead."""
    model.to(device).eval()
    sums = [{w: 0.0 for w in WHERE} for _ in model.bert.encoder.layer]
    tokens = {"mask": None, "count": 0}

    def grab(i, where):
        def hook(module, inputs):
            var = inputs[0].float().var(-1, unbiased=False)  # (B, T)
            sums[i][where] += float(var[tokens["mask"]].double().sum())
        return hook

    handles = [ln.register_forward_pre_hook(grab(i, where))
               for i, layer in enumerate(model.bert.encoder.layer) for where, ln in layer_norms(layer).items()]
    try:
        for batch in tqdm(loader, desc="LayerNorm variances", leave=False, dynamic_ncols=True):
            batch = to_device(batch, device)
            tokens["mask"] = batch["attention_mask"].bool()
            tokens["count"] += int(tokens["mask"].sum())
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [{w: s / tokens["count"] for w, s in layer.items()} for layer in sums]


def ln_affine_spec(variances: list[dict[str, float]]) -> Spec:
    """``ln_affine`` with each layer's own constants (``mean_ln_variances``)."""
    def one(v: dict[str, float]) -> Spec:
        return Spec.make("layernorm", "ln_affine", var_attention=v["attention"], var_output=v["output"])

    return Spec.make("layernorm", "ln_affine", layers={i: one(v) for i, v in enumerate(variances)})
