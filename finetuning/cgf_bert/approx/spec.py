"""The spec value of a replaced operation, and the registries its kinds are drawn from.

Every operation a CKKS evaluator cannot run as it is (the attention softmax, the feed-forward
GELU, LayerNorm, the pooler's tanh) has an ``Op``: a registry of kinds (``OpKind``), each the
function that replaces it, its declared parameters, its label and its multiplicative depth. A
``Spec`` is a value: an op, a kind's name, its parameter values and optional per-layer overrides.
It is parsed from the command line, stored in checkpoints and records, compared in recipe checks
and rendered by ``label()``; no other code spells a kind's name. ``Approximations``
(``approximations.py``) is one spec per op: the whole replaced part of a model, as one value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from cgf_bert import CgfBertError
from cgf_bert.registry import Param, Registry, resolve_params

EXACT = "exact"  # every op's first kind: the base model's own function, untouched


@dataclass(frozen=True)
class OpKind:
    """A registered replacement of an op and what every consumer needs to know about it."""

    op: str
    name: str
    fn: Callable[..., Any]  # the function; its signature is the op's (see ``Op.signature``)
    params: tuple[Param, ...] = ()
    label: Callable[[dict], str] | None = None  # params -> table label; default: the name
    slug: Callable[[dict], str] | None = None  # params -> run-name part; default: the name
    # Multiplicative depth under CKKS (levels), where the kind is a polynomial circuit; None: not
    # polynomial (exp, erf, tanh, a max or a reciprocal), or not yet counted.
    depth: Callable[[dict], int] | None = None
    check: Callable[[dict], Any] | None = None  # raises CgfBertError where parameters in range do not go together
    counts_outside: bool = False  # fn takes ``counter=``: inputs outside its polynomial's interval are counted, never clipped
    float32_scores: bool = False  # softmax: form the scores in float32 even under autocast (no max subtraction to tame them)
    input_division: bool = True  # divides by an input-dependent quantity (a reciprocal under FHE), not only by a public count
    # The polynomial form a CKKS evaluator runs, given an exp polynomial: (params, PolyExp) -> Spec
    # (CGF -> cgf_poly); None where the kind is polynomial already or has none.
    polynomial: Callable[[dict, Any], "Spec"] | None = None
    # The input interval a polynomial kind is fitted on (params -> (lo, hi)): what range analyses
    # compare the measured inputs with. None where the kind is exact on every input.
    interval: Callable[[dict], tuple[float, float]] | None = None
    doc: str = ""


@dataclass(frozen=True)
class Op:
    """A replaceable operation: its registry of kinds and how its specs are placed and shown."""

    name: str  # 'softmax'
    kinds: Registry[OpKind]
    per_layer: bool  # one instance per encoder layer, so layer overrides are possible
    title: str  # how labels name the op: 'GELU', 'LayerNorm'
    signature: str  # what its kinds' functions take and return, for their docstrings and tests

    def register(self, name: str, params: tuple[Param, ...] = (), **props) -> Callable:
        """Decorator: register ``fn`` as kind ``name`` of this op, with its parameters and properties."""

        def deco(fn):
            doc = ((fn.__doc__ or "").strip().splitlines() or [""])[0]
            self.kinds[name] = OpKind(self.name, name, fn, tuple(params), doc=doc, **props)
            return fn

        return deco


OPS: dict[str, Op] = {}


def op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise CgfBertError(f"unknown operation {name!r}; choose one of {sorted(OPS)}") from None


def define_op(name: str, per_layer: bool, title: str, signature: str) -> Op:
    OPS[name] = Op(name, Registry(name), per_layer, title, signature)
    return OPS[name]


@dataclass(frozen=True)
class Spec:
    """A kind of op ``op`` with all its parameter values, and optional per-layer overrides.

    ``layers`` maps a layer index to the plain spec that layer uses instead (exact in the last
    layer, CGF elsewhere, say). Build with ``Spec.make``, which fills defaults and checks ranges.
    """

    op: str
    name: str
    params: tuple[tuple[str, Any], ...] = ()
    layers: tuple[tuple[int, "Spec"], ...] = field(default=())

    @classmethod
    def make(cls, op_name: str, name: str, layers: dict[int, "Spec"] | None = None, **params) -> "Spec":
        o = op(op_name)
        kind = o.kinds.lookup(name)
        if layers and not o.per_layer:
            raise CgfBertError(f"{op_name} is one per model: it takes no per-layer overrides")
        for i, s in (layers or {}).items():
            if not isinstance(i, int) or i < 0 or s.layers or s.op != op_name:
                raise CgfBertError(f"bad per-layer {op_name} {i}={s}: a layer index >= 0 and a plain {op_name} spec")
        values = resolve_params(kind.params, params, f"{op_name} {name!r}")
        if kind.check:
            kind.check(dict(values))
        return cls(op_name, name, values, tuple(sorted((layers or {}).items())))

    @property
    def kind(self) -> OpKind:
        return op(self.op).kinds.lookup(self.name)

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def is_exact(self) -> bool:
        """The base model's own function in every layer."""
        return self.name == EXACT and all(s.name == EXACT for _, s in self.layers)

    @property
    def depth(self) -> int | None:
        """The kind's declared CKKS depth (the deepest layer's, with overrides); None if any layer is not polynomial."""
        depths = [s.kind.depth(s.values) if s.kind.depth else None for s in (self.plain(), *(s for _, s in self.layers))]
        return None if None in depths else max(depths)

    def plain(self) -> "Spec":
        """This spec without its per-layer overrides."""
        return Spec(self.op, self.name, self.params)

    def for_layer(self, i: int) -> "Spec":
        """The plain spec that layer ``i`` runs."""
        return dict(self.layers).get(i, self.plain())

    def per_layer(self, num_layers: int) -> list["Spec"]:
        """The plain spec of each of ``num_layers`` layers; an override past the last layer is an error."""
        beyond = [i for i, _ in self.layers if i >= num_layers]
        if beyond:
            # named by its command-line option (``cli`` makes one ``--<op>-layers`` per op), the way a user wrote it
            raise CgfBertError(f"--{self.op}-layers names layer(s) {beyond}, but the model has {num_layers} layers (0..{num_layers - 1})")
        return [self.for_layer(i) for i in range(num_layers)]

    def __call__(self, *args, counter=None, **kw):
        """The kind's function on ``args`` (the op's signature), counting out-of-interval inputs into ``counter``."""
        if self.layers:
            raise CgfBertError(f"a per-layer {self.op} spec is applied layer by layer (use for_layer)")
        extra = {"counter": counter} if self.kind.counts_outside else {}
        return self.kind.fn(*args, **kw, **extra, **self.values)

    def with_polynomial(self, poly=None) -> "Spec":
        """The polynomial form of this spec with exp polynomial ``poly`` (every layer; None: the
        polynomial kind's default), or a clear error."""
        def one(s: Spec) -> Spec:
            if s.kind.polynomial is None:
                raise CgfBertError(f"{s.op} {s.label()} has no polynomial form to evaluate with an exp polynomial")
            return s.kind.polynomial(s.values, poly)

        return Spec(self.op, *_fields(one(self.plain())), tuple((i, one(s)) for i, s in self.layers))

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
        """{'name': 'cgf', 'coeff': 0.5[, 'layers': {'5': {'name': 'exact'}}]} (the op is where it is stored)."""
        out: dict[str, Any] = {"name": self.name, **self.values}
        if self.layers:
            out["layers"] = {str(i): s.to_json() for i, s in self.layers}
        return out

    @classmethod
    def from_json(cls, op_name: str, obj: dict) -> "Spec":
        obj = dict(obj)
        layers = {int(i): cls.from_json(op_name, s) for i, s in obj.pop("layers", {}).items()}
        return cls.make(op_name, obj.pop("name"), layers=layers, **obj)

    @classmethod
    def parse(cls, op_name: str, text: str) -> "Spec":
        """'cgf', 'cgf:coeff=0.65', 'cgf_poly:degree=8,exp_lo=-16': the command-line form."""
        name, _, rest = text.partition(":")
        params = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise CgfBertError(f"bad {op_name} spec {text!r}: parameters are key=value, comma-separated")
            params[key.strip()] = value.strip()
        return cls.make(op_name, name.strip(), **params)


def _fields(s: Spec) -> tuple[str, tuple]:
    return s.name, s.params
