"""One spec per replaced operation: the whole approximated part of a model, as one value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cgf_bert import CgfBertError
from cgf_bert.approx.spec import EXACT as EXACT_NAME
from cgf_bert.approx.spec import OPS, Spec

_EXACT = {name: Spec.make(name, EXACT_NAME) for name in ("softmax", "gelu", "layernorm", "pooler")}


@dataclass(frozen=True)
class Approximations:
    """The spec of each op (``approx.spec.OPS``): what a model runs in place of its softmax,
    GELU, LayerNorm and pooler activation, with their per-layer overrides. Exact by default."""

    softmax: Spec = _EXACT["softmax"]
    gelu: Spec = _EXACT["gelu"]
    layernorm: Spec = _EXACT["layernorm"]
    pooler: Spec = _EXACT["pooler"]

    def __post_init__(self):
        for f in dataclasses.fields(self):
            spec = getattr(self, f.name)
            if not isinstance(spec, Spec) or spec.op != f.name:
                raise CgfBertError(f"the {f.name} of an Approximations must be a {f.name} spec, got {spec!r}")

    def specs(self) -> dict[str, Spec]:
        """{op: spec} in the order of ``OPS``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **specs: Spec) -> "Approximations":
        return dataclasses.replace(self, **specs)

    @property
    def is_exact(self) -> bool:
        """Every op the base model's own, in every layer: what a teacher must be."""
        return all(s.is_exact for s in self.specs().values())

    def replaced(self) -> dict[str, Spec]:
        """The ops that are not exact."""
        return {k: s for k, s in self.specs().items() if not s.is_exact}

    def label(self) -> str:
        """The softmax's label, then each other replaced op's: 'cgf c=0.5', 'cgf c=0.5, GELU quad'."""
        others = [f"{OPS[k].title} {s.label()}" for k, s in self.replaced().items() if k != "softmax"]
        return ", ".join([self.softmax.label(), *others])

    def slug(self) -> str:
        """'cgf0.5', 'cgf0.5-gelu-quad': the part of a run's file name."""
        return "-".join([self.softmax.slug(), *(f"{k}-{s.slug()}" for k, s in self.replaced().items() if k != "softmax")])

    def to_json(self) -> dict[str, Any]:
        return {k: s.to_json() for k, s in self.specs().items()}

    @classmethod
    def from_json(cls, obj: dict) -> "Approximations":
        unknown = set(obj) - set(OPS)
        if unknown:
            raise CgfBertError(f"unknown operation(s) {sorted(unknown)} in approximations; known: {sorted(OPS)}")
        return cls(**{k: Spec.from_json(k, v) for k, v in obj.items()})


EXACT = Approximations()  # stock BERT: the teacher, and the default

# A BERT layer's linear steps under CKKS, one level each (a product with plaintext weights, then a
# rescale): the Q/K/V projections, Q K^T (both encrypted), P V, the output projection, and the
# feed-forward's two dense layers. The affine maps of the polynomials fold into them (no level).
ATTENTION_LINEAR_DEPTH = 4  # Q/K/V, Q K^T, P V, output projection
FFN_LINEAR_DEPTH = 2  # the two dense layers


def layer_depth(approx: Approximations, i: int) -> dict[str, int | None]:
    """Layer ``i``'s multiplicative depth from the declared depths: attention (its linear steps and the
    softmax), each LayerNorm, the feed-forward (its dense layers and the GELU), and the total; None
    where an op in it is not polynomial (it cannot run under CKKS as it is)."""
    sm, ln, gelu = (s.for_layer(i).depth for s in (approx.softmax, approx.layernorm, approx.gelu))
    parts = {"attention": None if sm is None else ATTENTION_LINEAR_DEPTH + sm, "layernorm": ln,
             "feed_forward": None if gelu is None else FFN_LINEAR_DEPTH + gelu}
    total = None if None in parts.values() else parts["attention"] + parts["feed_forward"] + 2 * parts["layernorm"]
    return {**parts, "layer": total}
