"""Named variants and their declared parameters.

A registry maps a name to an entry (a softmax kind, a loss term kind); an unknown name
fails with the list of valid ones. An entry declares its parameters as ``Param`` values,
so that the CLI, checkpoints, records and range checks all read them from one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from cgf_bert import CgfBertError

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
        if not self.accepts(value):
            raise CgfBertError(f"{where}{self.name} must be {self.range_text()}, got {value!r}")
        return self._convert(value)

    def accepts(self, value: Any) -> bool:
        """Whether ``check`` takes ``value`` (of the type, finite, in range)."""
        try:
            v = self._convert(value)
        except (TypeError, ValueError, OverflowError):
            return False
        finite = self.type is int or math.isfinite(v)  # an int of any size is finite (isfinite would overflow)
        low = (self.min is not None and v < self.min) or (self.above is not None and v <= self.above)
        return finite and not low and not (self.max is not None and v > self.max)

    def _convert(self, value: Any) -> Any:
        if self.type is not int:
            return self.type(value)
        if isinstance(value, float):  # 8.0 from a JSON file is 8; 8.5 is no integer
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(value)  # '8' or 8 (int('8.5') fails: an integer option takes digits)

    def range_text(self) -> str:
        """'finite and > 0', 'an integer >= 1': what the parameter accepts, as errors say it."""
        bounds = [f"{op} {v if isinstance(v, int) else format(v, 'g')}"
                  for op, v in ((">=", self.min), (">", self.above), ("<=", self.max)) if v is not None]
        if self.type is int:
            return " ".join(["an integer", " and ".join(bounds)]).strip()
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
