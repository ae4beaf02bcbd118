"""Attention softmax kinds: their math and their registry entries.

A kind's function is ``(scores, valid, **params) -> probs``: ``scores`` (B, H, Q, K); ``valid`` a
boolean mask broadcastable to it, True = key may be attended, or None when every key is valid;
masked keys get exactly 0. Each entry declares its parameters, label, run-name slug and
properties (float32 scores, what it divides by, its depth under CKKS, its polynomial form).
Adding a variant is one ``@SOFTMAX.register`` call (and its test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.reciprocal import goldschmidt, goldschmidt_iters
from cgf_bert.approx.spec import Spec, define_op
from cgf_bert.registry import Param

VARIANCE_COEFF = 0.5  # c in exp(s - mu - c*var): 0.5 is the exact Gaussian log-sum-exp estimate


SOFTMAX = define_op("softmax", per_layer=True, title="softmax",
                    signature="(scores (B, H, Q, K), valid bool (B, 1, Q, K) or None) -> probs, masked keys exactly 0")
SOFTMAXES = SOFTMAX.kinds
register_softmax = SOFTMAX.register  # @register_softmax(name, params, label=..., depth=...) on a kind's function


def get_softmax(name: str):
    """The registered softmax kind ``name`` (an unknown name lists the known ones)."""
    return SOFTMAXES.lookup(name)


def softmax_spec(name: str, layers: dict[int, Spec] | None = None, **params) -> Spec:
    """The softmax spec of kind ``name`` (defaults filled, ranges checked), with per-layer overrides."""
    return Spec.make("softmax", name, layers, **params)


def parse_softmax(text: str) -> Spec:
    """'cgf', 'cgf:coeff=0.65': the command-line form of a softmax spec."""
    return Spec.parse("softmax", text)


def legacy_softmax(obj: dict | str, coeff: float | None = None) -> Spec:
    """A softmax spec as checkpoints and records store it: the spec's JSON, or the form before
    specs (a kind's name, and CGF's coefficient apart)."""
    if isinstance(obj, str):
        return softmax_spec(obj) if obj == "exact" else softmax_spec(obj, coeff=VARIANCE_COEFF if coeff is None else coeff)
    return Spec.from_json("softmax", obj)


# ---------------------------------------------------------------- the variants


COEFF = Param("coeff", float, VARIANCE_COEFF, "CGF variance coefficient c in exp(s - mu - c*var)", min=0.0)


@SOFTMAX.register("exact", polynomial=lambda p, poly: exact_polynomial(p, poly))
def exact_softmax(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Standard softmax over the valid keys (needs a max and a reciprocal)."""
    if valid is not None:
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


EXACT_SOFTMAX = softmax_spec("exact")  # stock BERT's softmax in every layer: the teacher, and the default


class _CgfSoftmax(torch.autograd.Function):
    """``exp(x - c*var) * m / n`` with ``x = (s - mu) * m``, and its gradient written out.

    With ``u = g * p`` (``g`` the incoming gradient) and ``S`` its row sum, the gradient is
    ``ds = u - S * (m + 2c * x) / n``: a few elementwise passes, keeping only ``p`` and ``x``,
    where autograd would keep and revisit about ten intermediates of the (B, H, Q, K) scores.

    Written in the ``setup_context`` form with a generated vmap rule so that ``torch.func``
    transforms (per-example gradients by ``vmap(grad)``, kernel.py) run through it; ``n`` is
    returned as a non-differentiable output only so that ``setup_context`` can save it. The
    backward recomputes ``x`` from the saved scores (bit for bit the forward's) rather than saving
    it, so that under ``create_graph`` its dependence on ``s`` is differentiated too: Hessian-vector
    products by double backward (analysis.hessian) are exact, not missing the ``2c x`` term's.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(s: torch.Tensor, mask: torch.Tensor | None, coeff: float):
        x, var, n = centred(s, mask)
        p = torch.exp(x - coeff * var)
        p = p.mul_(mask / n) if mask is not None else p.div_(n)
        return p, n

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, mask, coeff = inputs
        p, n = output
        ctx.mark_non_differentiable(n)
        ctx.save_for_backward(p, s, mask, n)
        ctx.coeff = coeff

    @staticmethod
    def backward(ctx, g: torch.Tensor, _gn):
        p, s, mask, n = ctx.saved_tensors
        x = centred(s, mask)[0]
        u = g * p
        scale = u.sum(dim=-1, keepdim=True) / n  # S / n
        shift = x * (2 * ctx.coeff)
        shift = shift.add_(mask) if mask is not None else shift.add_(1.0)
        return u.sub_(shift.mul_(scale)), None, None


def centred(s: torch.Tensor, mask: torch.Tensor | None):
    """Scores centred on their valid mean (masked entries 0), the valid variance, and n."""
    # The row total is summed at 2^-k (2^k >= K keys): a power of two scales every rounding exactly,
    # so the mean is bit for bit total / n, but a row of scores near the float32 limit (-3.4e38)
    # cannot overflow it to inf and give inf - inf = nan. (Scores below ~1e-36 lose bits to
    # subnormals there; their share of a mean is below any float32 rounding of it.)
    scale = 2.0 ** -math.ceil(math.log2(s.shape[-1]))
    if mask is None:
        n = s.new_full((), s.shape[-1])
        x = s - (s * scale).sum(dim=-1, keepdim=True) / n / scale
    else:
        n = mask.sum(dim=-1, keepdim=True)  # (B, 1, Q, 1) public lengths
        # Zero masked scores before any exp: selected, not multiplied by the mask, so that a huge
        # masked score cannot give inf * 0 = nan (finite values are the same either way).
        x = torch.where(mask.bool(), s - (s * (mask * scale)).sum(dim=-1, keepdim=True) / n / scale, 0.0)
    # s - mu itself overflows when scores of both signs are near the limit; held at the largest
    # float, its square still makes the variance inf, so exp(x - c var) is 0 rather than nan.
    limit = torch.finfo(s.dtype).max
    x = x.clamp(-limit, limit)  # out of place: vmap (the kernel view) has no batching rule for clamp_
    var = torch.linalg.vecdot(x, x).unsqueeze(-1) / n  # (B, H, Q, 1)
    return x, var, n


def _float32(fn):
    """Run ``fn(s, mask, ...)`` in float32 (float64 kept) with autocast off; return the input dtype."""

    def wrapped(scores: torch.Tensor, valid: torch.Tensor | None, *args):
        dtype = scores.dtype
        with torch.autocast(device_type=scores.device.type, enabled=False):
            s = scores if scores.dtype == torch.float64 else scores.float()
            mask = None if valid is None else valid.to(s.dtype)  # (B, 1, Q, K), 1 for valid keys
            return fn(s, mask, *args).to(dtype)

    return wrapped


_cgf = _float32(lambda s, mask, coeff: _CgfSoftmax.apply(s, mask, coeff)[0])


@SOFTMAX.register(
    "cgf", (COEFF,), label=lambda p: f"cgf c={p['coeff']:g}", slug=lambda p: f"cgf{p['coeff']:g}",
    float32_scores=True, input_division=False, polynomial=lambda p, poly: cgf_polynomial(p, poly),
)
def cgf_softmax(scores: torch.Tensor, valid: torch.Tensor | None, coeff: float = VARIANCE_COEFF) -> torch.Tensor:
    """CGF softmax: exp(s - mu - c*var) / n over the n valid keys, masked keys 0.

    ``mu`` and ``var`` are the mean and population variance of the valid scores of a row.
    No max and no input-dependent division: ``n`` is the public sequence length. Computed
    in float32 whatever the input dtype (CGF exponentiates the centred scores directly, so
    a bf16 error of 0.05 on a score of 10 would be a 5 % error on its probability).
    """
    return _cgf(scores, valid, float(coeff))


POLY_PARAMS = (
    COEFF,
    Param("degree", int, 8, "degree of the Chebyshev fit of exp(x / 2^squarings)", min=1, max=64),
    # [-256, 16] with 8 squarings: the MRPC dev range analysis (results/analysis/) puts every CGF exp
    # argument of the teacher and the KD student in [-196, 12.9] (the low end is one layer-0 head);
    # [-32, 32] lets that head's arguments overflow the polynomial (results/experiments/poly_swap-*).
    Param("exp_lo", float, -256.0, "lower end of the interval the exp polynomial is fitted on"),
    Param("exp_hi", float, 16.0, "upper end of the interval the exp polynomial is fitted on"),
    Param("squarings", int, 8, "squarings after the polynomial (exp(x) = exp(x/2^k)^(2^k))", min=0, max=16),
)


def _poly(p: dict) -> PolyExp:
    try:
        return PolyExp(p["degree"], p["exp_lo"], p["exp_hi"], p["squarings"])
    except ValueError as e:
        raise CgfBertError(str(e)) from None


def _cgf_poly(s: torch.Tensor, mask: torch.Tensor | None, coeff: float, poly: PolyExp, counter) -> torch.Tensor:
    x, var, n = centred(s, mask)
    arg = x - coeff * var
    if counter is not None:
        counter.add(arg.detach(), poly.lo, poly.hi, real_entries(mask))
    p = poly(arg)
    return p * mask / n if mask is not None else p / n


_cgf_poly32 = _float32(_cgf_poly)


def real_entries(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, Q, K) bool: valid keys of real query rows, the entries a count of inputs covers. In
    self-attention a query row is a real token exactly when the key of the same position is
    valid, so the key mask's diagonal marks the real rows (padding rows hold scores nobody reads)."""
    if mask is None:
        return None
    valid = mask.bool()  # (B, 1, Q, K)
    if valid.shape[-1] == valid.shape[-2]:
        valid = valid & valid.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (B, 1, Q, K) & (B, 1, Q, 1)
    return valid


# The row mean and E[s^2], each a row total (one level each, as fhe.circuits.CgfCircuit computes
# them), and the variance's square of the mean: 3 levels before the exp polynomial.
CGF_STATS_DEPTH = 3


@SOFTMAX.register(
    "cgf_poly", POLY_PARAMS,
    label=lambda p: f"cgf_poly c={p['coeff']:g} d={p['degree']} [{p['exp_lo']:g},{p['exp_hi']:g}] k={p['squarings']}",
    slug=lambda p: f"cgfpoly{p['coeff']:g}-d{p['degree']}-{p['exp_lo']:g}_{p['exp_hi']:g}-k{p['squarings']}",
    # the polynomial has mask/n folded into its coefficients (no level); P @ V is the attention's, not the softmax's
    float32_scores=True, input_division=False, depth=lambda p: CGF_STATS_DEPTH + _poly(p).depth, check=_poly,
    counts_outside=True, interval=lambda p: (p["exp_lo"], p["exp_hi"]),
)
def cgf_poly_softmax(scores, valid, coeff=VARIANCE_COEFF, degree=8, exp_lo=-256.0, exp_hi=16.0, squarings=8, counter=None) -> torch.Tensor:
    """CGF with exp replaced by the polynomial a CKKS evaluator runs (Chebyshev fit + squarings).

    Arguments outside [exp_lo, exp_hi] are not clipped: they are counted into ``counter`` (over
    valid keys of real rows) so that callers can report them.
    """
    poly = _poly(dict(degree=degree, exp_lo=exp_lo, exp_hi=exp_hi, squarings=squarings))
    return _cgf_poly32(scores, valid, float(coeff), poly, counter)


def cgf_polynomial(p: dict, poly: PolyExp | None) -> Spec:
    """CGF's polynomial form: the same coefficient, exp replaced by ``poly`` (None: cgf_poly's default)."""
    if poly is None:
        return softmax_spec("cgf_poly", coeff=p["coeff"])
    return softmax_spec("cgf_poly", coeff=p["coeff"], degree=poly.degree, exp_lo=poly.lo, exp_hi=poly.hi, squarings=poly.squarings)


EXACT_POLY_PARAMS = (
    Param("degree", int, 8, "degree of the Chebyshev fit of exp(x / 2^squarings), x the scores centred on their row mean", min=1, max=64),
    Param("exp_lo", float, -32.0, "lower end of the interval the exp polynomial is fitted on"),
    Param("exp_hi", float, 32.0, "upper end of the interval the exp polynomial is fitted on"),
    Param("squarings", int, 5, "squarings after the polynomial (exp(x) = exp(x/2^k)^(2^k))", min=0, max=16),
    Param("sum_lo", float, 32.0, "assumed lower bound of a row's sum of exp((s - mean) / 2^norm_steps) (the first reciprocal's interval)", above=0.0),
    Param("sum_hi", float, 65536.0, "assumed upper bound of a row's sum of exp((s - mean) / 2^norm_steps)", above=0.0),
    Param("tol", float, 1e-4, "relative error of the reciprocal inside the bound (fixes the Goldschmidt steps)", above=0.0, max=0.5),
    Param("iters", int, 0, "Goldschmidt steps of each division: 0 = the fewest that reach tol inside its bound, else exactly that many", min=0, max=64),
    # Range reduction without a max (norm_steps > 0): the row sum of exp(x) spans as many decades as
    # the scores' spread (a ratio of 5e16 over the teacher's MRPC rows), which no reciprocal survives under
    # bootstrap noise. Dividing early, p = exp(x/2^h) / sum, then h times p <- p^2 / sum(p^2), gives
    # the same softmax with a first sum of exp(x/2^h) and later ones of p^2 in [1/n, 1].
    Param("norm_steps", int, 0, "square-and-normalise steps h: the first row sum is of exp(x / 2^h), each of the last "
          "h squarings is followed by a division by its row sum (0: one division at the end)", min=0, max=16),
    Param("keys", int, 64, "the most valid keys a row may have: the later row sums, of p^2, lie in [1/keys, 1] (a row with more gets a less accurate reciprocal; the encoder circuit refuses such an example)", min=2),
)


def _exact_poly_check(p: dict) -> None:
    _poly(p)
    if not p["sum_lo"] < p["sum_hi"]:
        raise CgfBertError(f"exact_poly needs sum_lo < sum_hi, got {p['sum_lo']:g} and {p['sum_hi']:g}")
    if p["norm_steps"] > p["squarings"]:
        raise CgfBertError(f"exact_poly's norm_steps ({p['norm_steps']}) are among its squarings ({p['squarings']}): "
                           "need norm_steps <= squarings")


STEP_HEADROOM = 2.0  # a step's row sum of p^2 is bounded by [1/keys, 2], not [1/keys, 1] (Normalisation.step_bound)


@dataclass(frozen=True)
class Normalisation:
    """How an ``exact_poly`` spec divides by its row sums: the first division on ``bound`` with
    ``iters`` Goldschmidt steps, then ``steps`` squarings each divided by its row sum on
    ``step_bound()`` with ``step_iters``. Plain arithmetic (``apply``) serves torch and numpy."""

    bound: tuple[float, float]
    iters: int
    steps: int = 0
    keys: int = 64
    step_iters: int = 0

    def step_bound(self, scale: float = 1.0) -> tuple[float, float]:
        """The bound of a step's row sum of ``(scale p)^2``: ``sum p^2`` of a distribution over at most
        ``keys`` keys is in [1/keys, 1], and one-hot rows (the teacher's [SEP] heads) sit at 1. Above
        about ``(1 + 1/keys)`` times the top, Goldschmidt's ``e`` passes 1 and diverges; a first division
        off by a factor (a dev row outside its calibrated bound) scales the next sum by its square. The
        doubled top absorbs a factor up to sqrt(2), at one more Goldschmidt step per division."""
        return scale * scale / self.keys, STEP_HEADROOM * scale * scale

    @property
    def depth(self) -> int:
        """Levels after the exp: each division its reciprocal and the product (each step's square is the exp's)."""
        return _reciprocal_depth(self.iters) + 1 + self.steps * (_reciprocal_depth(self.step_iters) + 1)

    def apply(self, e, total):
        """``e`` (exp of the centred scores over 2^steps, masked) -> the probabilities; ``total(v)`` a row sum kept as a column."""
        p = e * goldschmidt(total(e), self.bound, self.iters)
        for _ in range(self.steps):
            q = p * p
            p = q * goldschmidt(total(q), self.step_bound(), self.step_iters)
        return p


def normalisation(p: dict) -> Normalisation:
    """The divisions an exact_poly spec's parameters ``p`` declare."""
    bound, steps = (p["sum_lo"], p["sum_hi"]), p["norm_steps"]
    step_bound = (1.0 / p["keys"], STEP_HEADROOM)
    return Normalisation(bound, p["iters"] or goldschmidt_iters(bound, p["tol"]), steps, p["keys"],
                         (p["iters"] or goldschmidt_iters(step_bound, p["tol"])) if steps else 0)


def _reciprocal_depth(iters: int) -> int:
    """Levels of the reciprocal as ``fhe.ops.reciprocal`` runs it: the linear guess 1; with
    steps, ``e0 = 1 - alpha S' + beta S'^2`` 2 (a square of a plaintext product), then one per step."""
    return 2 + iters if iters else 1


def _exact_poly_depth(p: dict) -> int:
    """Centring 3 (as CGF's statistics), the polynomial, then the divisions (``Normalisation.depth``)."""
    return CGF_STATS_DEPTH + _poly(p).depth + normalisation(p).depth


def _exact_poly_tag(p: dict, sep: str) -> str:
    """' it=4' / '-it4' in a label / slug when the steps are fixed, '' when ``tol`` picks them; then
    ' h=3 keys=64' / '-h3-n64' with square-and-normalise steps."""
    tag = f"{sep}{p['iters']}" if p["iters"] else ""
    if p["norm_steps"]:
        tag += f" h={p['norm_steps']} keys={p['keys']}" if sep.startswith(" ") else f"-h{p['norm_steps']}-n{p['keys']}"
    return tag


def _exact_poly(s: torch.Tensor, mask: torch.Tensor | None, poly: PolyExp, norm: Normalisation, counter) -> torch.Tensor:
    x, _, n = centred(s, mask)  # no max: the row mean centres the scores
    if counter is not None:
        counter.add(x.detach(), poly.lo, poly.hi, real_entries(mask))
    e = poly.q(x)
    for _ in range(poly.squarings - norm.steps):  # exp(x / 2^steps); the last squarings are the divisions'
        e = e * e
    e = e * mask if mask is not None else e
    return norm.apply(e, lambda v: v.sum(-1, keepdim=True))


@SOFTMAX.register(
    "exact_poly", EXACT_POLY_PARAMS,
    label=lambda p: f"exact_poly d={p['degree']} [{p['exp_lo']:g},{p['exp_hi']:g}] k={p['squarings']} "
                    f"sum [{p['sum_lo']:g},{p['sum_hi']:g}]{_exact_poly_tag(p, ' it=')}",
    slug=lambda p: f"exactpoly-d{p['degree']}-{p['exp_lo']:g}_{p['exp_hi']:g}-k{p['squarings']}-s{p['sum_lo']:g}_{p['sum_hi']:g}"
                   f"{_exact_poly_tag(p, '-it')}",
    float32_scores=True, depth=_exact_poly_depth, check=_exact_poly_check, counts_outside=True,
    interval=lambda p: (p["exp_lo"], p["exp_hi"]),
)
def exact_poly_softmax(scores, valid, degree=8, exp_lo=-32.0, exp_hi=32.0, squarings=5, sum_lo=32.0, sum_hi=65536.0,
                       tol=1e-4, iters=0, norm_steps=0, keys=64, counter=None) -> torch.Tensor:
    """The exact softmax as a CKKS evaluator runs it: polynomial exp of the mean-centred scores, row sum, Goldschmidt reciprocal.

    With ``norm_steps`` h, the sum [sum_lo, sum_hi] bounds is that of ``exp(x / 2^h)``, and each of the
    last h squarings is divided by its own row sum (``Normalisation``; a fixed ``iters`` serves every
    division). Rows whose sum leaves its bound get a wrong reciprocal (``reciprocal.goldschmidt``);
    centred scores outside [exp_lo, exp_hi] are counted into ``counter``, never clipped.
    """
    p = dict(degree=degree, exp_lo=exp_lo, exp_hi=exp_hi, squarings=squarings, sum_lo=sum_lo, sum_hi=sum_hi, tol=tol, iters=iters,
             norm_steps=norm_steps, keys=keys)
    return _float32(_exact_poly)(scores, valid, _poly(p), normalisation(p), counter)


def exact_polynomial(p: dict, poly: PolyExp | None) -> Spec:
    """The exact softmax's polynomial form with exp polynomial ``poly`` (None: exact_poly's default; the reciprocal's defaults)."""
    if poly is None:
        return softmax_spec("exact_poly")
    return softmax_spec("exact_poly", degree=poly.degree, exp_lo=poly.lo, exp_hi=poly.hi, squarings=poly.squarings)


# ---------------------------------------------------------------- other FHE-friendly forms
# Each zeroes masked keys by multiplying with the mask (no -inf fill: a polynomial evaluator
# has none). ``n`` is the public count of valid keys; a "row sum" divisor depends on the input
# (a reciprocal under FHE), which ``input_division`` records.

TINY = 1e-12  # floor under a row sum: an all-zero row stays all zero instead of 0/0


def _keys(scores: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask as the scores' dtype, broadcastable; n valid keys per row)."""
    if valid is None:
        mask = scores.new_ones(*scores.shape[:-2], 1, scores.shape[-1])
    else:
        mask = valid.to(scores.dtype)
    return mask, mask.sum(-1, keepdim=True)


def _row_normalised(q: torch.Tensor) -> torch.Tensor:
    return q / q.sum(-1, keepdim=True).clamp_min(TINY)


SHIFT = Param("shift", float, 5.0, "c in (s + c)^2 (MPCFormer's 2Quad uses 5)")
POWER = Param("power", int, 2, "p in relu(s)^p", min=1, max=8)


@SOFTMAX.register("quad2", (SHIFT,), label=lambda p: f"2quad c={p['shift']:g}", slug=lambda p: f"quad2c{p['shift']:g}")
def quad2_softmax(scores: torch.Tensor, valid: torch.Tensor | None, shift: float = 5.0) -> torch.Tensor:
    """MPCFormer's 2Quad: (s + c)^2 over the valid keys, divided by its row sum."""
    mask, _ = _keys(scores, valid)
    return _row_normalised((scores + shift) ** 2 * mask)


@SOFTMAX.register("relu_n", input_division=False)
def relu_n_softmax(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """relu(s) / n over the n valid keys: no exp, and only the public length divides."""
    mask, n = _keys(scores, valid)
    return torch.relu(scores) * mask / n


@SOFTMAX.register("relu_pow", (POWER,), label=lambda p: f"relu^{p['power']} norm", slug=lambda p: f"relupow{p['power']}")
def relu_pow_softmax(scores: torch.Tensor, valid: torch.Tensor | None, power: int = 2) -> torch.Tensor:
    """relu(s)^p over the valid keys, divided by its row sum.

    Row-normalised rather than over n: a row's mass relu(s)^p / n grows as the p-th power of
    the score scale, which nothing in the pretrained weights keeps near 1 (CGF's exp(-mu - c var)
    does that job; relu_n is the p = 1 form over n). Normalising keeps each row a distribution, at
    the price of the input-dependent reciprocal that 2Quad also pays.
    """
    mask, _ = _keys(scores, valid)
    return _row_normalised(torch.relu(scores) ** power * mask)
