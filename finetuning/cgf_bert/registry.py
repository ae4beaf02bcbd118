"""Named variants and their declared parameters.

A registry maps a name to an entry (a softmax kind, a loss term kind); an unknown name
fails with the list of valid ones. An entry declares its parameters as ``Param`` values,
so that the CLI, checkpoints, records and range checks all read them from one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from . import CgfBertError

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of named variants filled by ``register``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self[name] = obj
            return obj

        return deco

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise CgfBertError(f"unknown {self.kind} {name!r}; choose one of {sorted(self)}") from None


@dataclass(frozen=True)
class Param:
    """A variant's parameter: type, default, help and allowed range (inclusive bounds)."""

    name: str
    type: type  # int or float
    default: Any
    help: str
    min: float | None = None  # inclusive
    max: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound (a learning rate, a temperature)

    def check(self, value: Any, where: str = "") -> Any:
        """``value`` converted to the parameter's type; out of range or non-finite is a CgfBertError."""
        what = f"{where}{self.name}"
        try:
            v = self.type(value)
            if self.type is int and v != float(value):
                raise ValueError
        except (TypeError, ValueError):
            raise CgfBertError(f"{what} must be {self.type.__name__}, got {value!r}") from None
        low = (self.min is not None and v < self.min) or (self.above is not None and v <= self.above)
        if not math.isfinite(v) or low or (self.max is not None and v > self.max):
            raise CgfBertError(f"{what} must be {self.range_text()}, got {value!r}")
        return v

    def range_text(self) -> str:
        bounds = [f"{op} {v:g}" for op, v in ((">=", self.min), (">", self.above), ("<=", self.max)) if v is not None]
        return " and ".join(["finite", *bounds])


def resolve_params(declared: Iterable[Param], given: dict[str, Any], where: str) -> tuple[tuple[str, Any], ...]:
    """Every declared parameter's value (given, else its default), checked, in declaration order.

    A given name that the variant does not declare is an error naming the ones it does.
    """
    declared = tuple(declared)
    names = [p.name for p in declared]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise CgfBertError(f"{where} takes no parameter {', '.join(unknown)} (its parameters: {', '.join(names) or 'none'})")
    return tuple((p.name, p.check(given.get(p.name, p.default), f"{where} ")) for p in declared)
