"""Attention softmax variants: their math, their registry entries, and the spec value.

A registry entry (``SoftmaxKind``) holds the function ``(scores, valid, **params) -> probs``
(``scores`` (B, H, Q, K); ``valid`` a boolean mask broadcastable to it, True = key may be
attended, or None when every key is valid), its declared parameters, its label, and its
properties (float32 scores, what it divides by, its depth under CKKS). A ``SoftmaxSpec`` is a
value: a kind's name, its parameter values and optional per-layer overrides. It is parsed
from the CLI, stored in checkpoints and run records, compared in recipe checks, and printed by
``label()``; no other code spells a variant's name. Adding a variant is one ``register_softmax``
call (and its test).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import CgfBertError
from .polyexp import PolyExp
from .registry import Param, Registry, resolve_params

VARIANCE_COEFF = 0.5  # c in exp(s - mu - c*var): 0.5 is the exact Gaussian log-sum-exp estimate


@dataclass(frozen=True)
class SoftmaxKind:
    """A registered attention softmax and what every consumer needs to know about it."""

    name: str
    fn: Callable[..., torch.Tensor]  # (scores, valid, **params) -> probs, masked keys exactly 0
    params: tuple[Param, ...] = ()
    label: Callable[[dict], str] | None = None  # params -> table label; default: the name
    slug: Callable[[dict], str] | None = None  # params -> run-name part; default: the name
    float32_scores: bool = False  # form the scores in float32 even under autocast (no max subtraction to tame them)
    input_division: bool = True  # divides by an input-dependent sum (a reciprocal under FHE), not only by the public n
    depth: Callable[[dict], int] | None = None  # multiplicative depth under CKKS, where it is known
    check: Callable[[dict], Any] | None = None  # raises CgfBertError where parameters in range do not go together
    doc: str = ""


SOFTMAXES: Registry[SoftmaxKind] = Registry("softmax")


def register_softmax(name: str, params: tuple[Param, ...] = (), **props) -> Callable:
    """Decorator: register ``fn`` as softmax ``name`` with its parameters and properties."""

    def deco(fn):
        SOFTMAXES[name] = SoftmaxKind(name, fn, tuple(params), doc=(fn.__doc__ or "").strip().splitlines()[0], **props)
        return fn

    return deco


def get_softmax(name: str) -> SoftmaxKind:
    return SOFTMAXES.lookup(name)


# ---------------------------------------------------------------- the value


@dataclass(frozen=True)
class SoftmaxSpec:
    """A softmax kind with all its parameter values, and optional per-layer overrides.

    ``layers`` maps a layer index to the spec that layer uses instead (e.g. exact in the last
    layer, CGF elsewhere). Build with ``SoftmaxSpec.make``, which fills defaults and checks ranges.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    layers: tuple[tuple[int, "SoftmaxSpec"], ...] = field(default=())

    @classmethod
    def make(cls, name: str, layers: dict[int, "SoftmaxSpec"] | None = None, **params) -> "SoftmaxSpec":
        kind = get_softmax(name)
        for i, s in (layers or {}).items():
            if not isinstance(i, int) or i < 0 or s.layers:
                raise CgfBertError(f"bad per-layer softmax {i}={s}: a layer index >= 0 and a plain spec")
        values = resolve_params(kind.params, params, f"softmax {name!r}")
        if kind.check:
            kind.check(dict(values))
        return cls(name, values, tuple(sorted((layers or {}).items())))

    @property
    def kind(self) -> SoftmaxKind:
        return get_softmax(self.name)

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.params)

    def for_layer(self, i: int) -> "SoftmaxSpec":
        """The plain spec that layer ``i`` runs."""
        return dict(self.layers).get(i, SoftmaxSpec(self.name, self.params))

    def __call__(self, scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if self.layers:
            raise CgfBertError("a per-layer softmax spec is applied layer by layer (use for_layer)")
        return self.kind.fn(scores, valid, **self.values)

    def label(self) -> str:
        """'exact', 'cgf c=0.5', 'cgf c=0.5, layer 5 exact': the name tables and outputs show."""
        kind = self.kind
        base = kind.label(self.values) if kind.label else kind.name
        return ", ".join([base, *(f"layer {i} {s.label()}" for i, s in self.layers)])

    def slug(self) -> str:
        """'exact', 'cgf0.5', 'cgf0.5-L5exact': the part of a run's file name."""
        kind = self.kind
        base = kind.slug(self.values) if kind.slug else kind.name
        return "-".join([base, *(f"L{i}{s.slug()}" for i, s in self.layers)])

    def to_json(self) -> dict[str, Any]:
        """{'name': 'cgf', 'coeff': 0.5[, 'layers': {'5': {'name': 'exact'}}]}"""
        out: dict[str, Any] = {"name": self.name, **self.values}
        if self.layers:
            out["layers"] = {str(i): s.to_json() for i, s in self.layers}
        return out

    @classmethod
    def from_json(cls, obj: dict | str, coeff: float | None = None) -> "SoftmaxSpec":
        """Read ``to_json``'s form, or the legacy one (a kind's name, and CGF's coefficient apart)."""
        if isinstance(obj, str):  # checkpoints and records written before specs: 'exact' | 'cgf' + coeff
            return cls.make(obj) if obj == "exact" else cls.make(obj, coeff=VARIANCE_COEFF if coeff is None else coeff)
        obj = dict(obj)
        layers = {int(i): cls.from_json(s) for i, s in obj.pop("layers", {}).items()}
        return cls.make(obj.pop("name"), layers=layers, **obj)

    @classmethod
    def parse(cls, text: str) -> "SoftmaxSpec":
        """'cgf', 'cgf:coeff=0.65', 'cgf_poly:degree=8,exp_lo=-16': the command-line form."""
        name, _, rest = text.partition(":")
        params = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise CgfBertError(f"bad softmax spec {text!r}: parameters are key=value, comma-separated")
            params[key.strip()] = value.strip()
        return cls.make(name.strip(), **params)

def layer_specs(spec: SoftmaxSpec, num_layers: int) -> list[SoftmaxSpec]:
    """The plain spec of each of ``num_layers`` layers; an override past the last layer is an error."""
    beyond = [i for i, _ in spec.layers if i >= num_layers]
    if beyond:
        raise CgfBertError(f"per-layer softmax for layer(s) {beyond}, but the model has {num_layers} layers (0..{num_layers - 1})")
    return [spec.for_layer(i) for i in range(num_layers)]


# ---------------------------------------------------------------- the variants


COEFF = Param("coeff", float, VARIANCE_COEFF, "CGF variance coefficient c in exp(s - mu - c*var)", min=0.0)


@register_softmax("exact")
def exact_softmax(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Standard softmax over the valid keys (needs a max and a reciprocal)."""
    if valid is not None:
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


EXACT = SoftmaxSpec.make("exact")  # stock BERT's softmax in every layer: the teacher, and the default


class _CgfSoftmax(torch.autograd.Function):
    """``exp(x - c*var) * m / n`` with ``x = (s - mu) * m``, and its gradient written out.

    With ``u = g * p`` (``g`` the incoming gradient) and ``S`` its row sum, the gradient is
    ``ds = u - S * (m + 2c * x) / n``: a few elementwise passes, keeping only ``p`` and ``x``,
    where autograd would keep and revisit about ten intermediates of the (B, H, Q, K) scores.

    Written in the ``setup_context`` form with a generated vmap rule so that ``torch.func``
    transforms (per-example gradients by ``vmap(grad)``, kernel.py) run through it; ``x`` and
    ``n`` are returned as non-differentiable outputs only so that ``setup_context`` can save them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(s: torch.Tensor, mask: torch.Tensor | None, coeff: float):
        x, var, n = _centred(s, mask)
        p = torch.exp(x - coeff * var)
        p = p.mul_(mask / n) if mask is not None else p.div_(n)
        return p, x, n

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, mask, coeff = inputs
        p, x, n = output
        ctx.mark_non_differentiable(x, n)
        ctx.save_for_backward(p, x, mask, n)
        ctx.coeff = coeff

    @staticmethod
    def backward(ctx, g: torch.Tensor, _gx, _gn):
        p, x, mask, n = ctx.saved_tensors
        u = g * p
        scale = u.sum(dim=-1, keepdim=True) / n  # S / n
        shift = x * (2 * ctx.coeff)
        shift = shift.add_(mask) if mask is not None else shift.add_(1.0)
        return u.sub_(shift.mul_(scale)), None, None


def _centred(s: torch.Tensor, mask: torch.Tensor | None):
    """Scores centred on their valid mean (masked entries 0), the valid variance, and n."""
    if mask is None:
        n = s.new_full((), s.shape[-1])
        x = s - s.mean(dim=-1, keepdim=True)
    else:
        n = mask.sum(dim=-1, keepdim=True)  # (B, 1, Q, 1) public lengths
        # Zero masked scores before any exp so a huge masked score can't give inf * 0 = nan.
        x = (s - (s * mask).sum(dim=-1, keepdim=True) / n) * mask
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


@register_softmax(
    "cgf", (COEFF,), label=lambda p: f"cgf c={p['coeff']:g}", slug=lambda p: f"cgf{p['coeff']:g}",
    float32_scores=True, input_division=False,
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


def _cgf_poly(s: torch.Tensor, mask: torch.Tensor | None, coeff: float, poly: PolyExp) -> torch.Tensor:
    x, var, n = _centred(s, mask)
    arg = x - coeff * var
    OUT_OF_RANGE.count(poly, arg.detach(), mask)
    p = poly(arg)
    return p * mask / n if mask is not None else p / n


_cgf_poly32 = _float32(_cgf_poly)


class _OutOfRange:
    """Running count of exp arguments outside the polynomial's interval (never clipped: counted)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.outside, self.total = 0, 0

    def count(self, poly: PolyExp, arg: torch.Tensor, mask: torch.Tensor | None):
        """Count ``arg`` (B, H, Q, K) entries outside ``poly``'s interval over valid keys of real
        query rows. In self-attention a query row is a real token exactly when the key of the
        same position is valid, so the key mask's diagonal marks the real rows (padding rows
        hold scores nobody reads)."""
        if mask is None:
            valid = torch.ones_like(arg, dtype=torch.bool)
        else:
            valid = mask.bool()  # (B, 1, Q, K)
            if valid.shape[-1] == valid.shape[-2]:
                valid = valid & valid.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (B, 1, Q, K) & (B, 1, Q, 1)
            valid = valid.expand_as(arg)
        self.outside += poly.outside(arg, valid)
        self.total += int(valid.sum())


OUT_OF_RANGE = _OutOfRange()


@register_softmax(
    "cgf_poly", POLY_PARAMS,
    label=lambda p: f"cgf_poly c={p['coeff']:g} d={p['degree']} [{p['exp_lo']:g},{p['exp_hi']:g}] k={p['squarings']}",
    slug=lambda p: f"cgfpoly{p['coeff']:g}-d{p['degree']}-{p['exp_lo']:g}_{p['exp_hi']:g}-k{p['squarings']}",
    # depth: the row mean and E[s^2] (3 levels, as fhe.CgfCircuit computes them), then the
    # polynomial with mask/n folded into its coefficients; P @ V adds one more.
    float32_scores=True, input_division=False, depth=lambda p: 3 + _poly(p).depth, check=_poly,
)
def cgf_poly_softmax(scores, valid, coeff=VARIANCE_COEFF, degree=8, exp_lo=-256.0, exp_hi=16.0, squarings=8) -> torch.Tensor:
    """CGF with exp replaced by the polynomial a CKKS evaluator runs (Chebyshev fit + squarings).

    Arguments outside [exp_lo, exp_hi] are not clipped: they are counted in ``OUT_OF_RANGE`` (over
    valid keys) so that callers can report them.
    """
    poly = _poly(dict(degree=degree, exp_lo=exp_lo, exp_hi=exp_hi, squarings=squarings))
    return _cgf_poly32(scores, valid, float(coeff), poly)


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


@register_softmax("quad2", (SHIFT,), label=lambda p: f"2quad c={p['shift']:g}", slug=lambda p: f"quad2c{p['shift']:g}")
def quad2_softmax(scores: torch.Tensor, valid: torch.Tensor | None, shift: float = 5.0) -> torch.Tensor:
    """MPCFormer's 2Quad: (s + c)^2 over the valid keys, divided by its row sum."""
    mask, _ = _keys(scores, valid)
    return _row_normalised((scores + shift) ** 2 * mask)


@register_softmax("relu_n", input_division=False)
def relu_n_softmax(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """relu(s) / n over the n valid keys: no exp, and only the public length divides."""
    mask, n = _keys(scores, valid)
    return torch.relu(scores) * mask / n


@register_softmax("relu_pow", (POWER,), label=lambda p: f"relu^{p['power']} norm", slug=lambda p: f"relupow{p['power']}")
def relu_pow_softmax(scores: torch.Tensor, valid: torch.Tensor | None, power: int = 2) -> torch.Tensor:
    """relu(s)^p over the valid keys, divided by its row sum.

    Row-normalised rather than over n: a row's mass relu(s)^p / n grows as the p-th power of
    the score scale, which nothing in the pretrained weights keeps near 1 (CGF's exp(-mu - c var)
    does that job; relu_n is the p = 1 form over n). Normalising keeps each row a distribution, at
    the price of the input-dependent reciprocal that 2Quad also pays.
    """
    mask, _ = _keys(scores, valid)
    return _row_normalised(torch.relu(scores) ** power * mask)
