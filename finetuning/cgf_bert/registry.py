"""A name -> variant registry; an unknown name fails with the list of valid ones."""

from __future__ import annotations

from typing import Callable, TypeVar

from . import CgfBertError

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of named variants (softmaxes, losses) filled by the ``register`` decorator."""

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
