"""Rotation keys: how a rotation by ``k`` is made, and its key switches (what it costs), for the key sets the
bootstrap backend holds.

* ``GeneralKeys``: desilofhe's general rotation key (the left power-of-two steps, one key switch per set bit
  of ``k mod slots``) and, with ``both_ways``, its roll key (the right ones): the fewest signed powers of two
  (``ops.signed_steps``). 30 keys in all at 2^15 slots, 7.7 GB: the small bootstrap key's set.
* ``FixedKeys``: fixed rotation keys for a chosen set of steps (desilofhe's ``create_fixed_rotation_key``,
  257 MB each here); a rotation by ``k`` is the fewest of them that sum to ``k`` mod the slots, found once
  for every ``k`` by a breadth-first search. ``FixedKeys.chosen`` picks the steps for a circuit from the
  rotations it makes (its slot simulation's ``StageLog.steps``): 15 keys, the rotation key's memory, are what
  fits beside the medium bootstrap key in 24 GB, where the roll key does not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.fhe.ops import _naf, keyswitches

MEDIUM_FIXED_KEYS = 15  # beside the medium bootstrap key (15.3 GB): the general rotation key's 15 keys' memory


def merged(tables: Iterable[Mapping], slots: int | None = None) -> dict[int, float]:
    """{rotation step: how many} over tables of ``{step: count}`` (a ``StageLog``'s steps per stage, a
    record's ``rotation_steps`` per stage kind); with ``slots``, steps equal mod the slots are one (-1 and
    slots - 1 are one rotation)."""
    out: dict[int, float] = {}
    for table in tables:
        for k, n in table.items():
            k = int(k) % slots if slots else int(k)
            out[k] = out.get(k, 0.0) + float(n)
    return out


class _Keys:
    def switches(self, k: int) -> int:
        raise NotImplementedError

    def cost(self, counts: Mapping[int, float]) -> float:
        """Key switches of rotations by each step ``k``, ``counts[k]`` times."""
        return float(sum(n * self.switches(int(k)) for k, n in counts.items()))


@dataclass(frozen=True)
class EveryStep(_Keys):
    """A fixed key for every step (the interactive backend's ``CkksOps``): one key switch a rotation."""

    slots: int

    def switches(self, k: int) -> int:
        return int(k % self.slots != 0)

    def describe(self) -> str:
        return "a fixed key for every step: one key switch a rotation"

    def to_json(self) -> dict:
        return {"kind": "every step", "describe": self.describe()}


@dataclass(frozen=True)
class GeneralKeys(_Keys):
    slots: int
    both_ways: bool = True

    def switches(self, k: int) -> int:
        return keyswitches(k, self.slots, self.both_ways)

    def describe(self) -> str:
        return ("rotation and roll keys: a rotation's key switches are its step's fewest signed powers of two" if self.both_ways
                else "rotation key only: a rotation's key switches are the set bits of its step mod the slots")

    def to_json(self) -> dict:
        return {"kind": "general", "roll_key": self.both_ways, "describe": self.describe()}


@dataclass(frozen=True)
class FixedKeys(_Keys):
    """Fixed rotation keys for ``steps`` (left steps mod ``slots``; step 1 always among them, so every
    rotation can be made)."""

    slots: int
    steps: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(sorted({int(s) % self.slots for s in self.steps} - {0})))
        if 1 not in self.steps:
            raise CgfBertError(f"fixed rotation keys {self.steps} lack step 1: some rotations could not be made")

    @cached_property
    def _search(self) -> tuple[np.ndarray, np.ndarray]:
        """(key switches, the last key's step) of every rotation mod the slots: a breadth-first search from 0."""
        n, keys = self.slots, np.array(self.steps, dtype=np.int64)
        dist, last = np.full(n, -1), np.zeros(n, dtype=np.int64)
        dist[0], frontier, depth = 0, np.array([0]), 0
        while frontier.size:
            depth += 1
            reached = ((frontier[:, None] + keys[None, :]) % n).ravel()
            step = np.broadcast_to(keys, (frontier.size, keys.size)).ravel()
            fresh = dist[reached] < 0
            dist[reached[fresh]], last[reached[fresh]] = depth, step[fresh]  # any key that reaches it first: a shortest path
            frontier = np.flatnonzero(dist == depth)
        return dist, last

    def switches(self, k: int) -> int:
        return int(self._search[0][k % self.slots])

    def path(self, k: int) -> list[int]:
        """The key steps that make a left rotation by ``k``, the fewest possible."""
        dist, last = self._search
        k, out = k % self.slots, []
        while k:
            out.append(int(last[k]))
            k = (k - last[k]) % self.slots
        return out

    def describe(self) -> str:
        signed = sorted(s if s <= self.slots // 2 else s - self.slots for s in self.steps)
        return f"{len(self.steps)} fixed rotation keys, steps {signed}: a rotation's key switches are the fewest of them summing to its step"

    def to_json(self) -> dict:
        return {"kind": "fixed", "steps": list(self.steps), "describe": self.describe()}

    @classmethod
    def chosen(cls, counts: Mapping[int, float], slots: int, n: int = MEDIUM_FIXED_KEYS, tries: int = 600, seed: int = 0) -> FixedKeys:
        """``n`` steps that make the rotations ``counts`` (step -> how many) in the fewest key switches: from the
        signed powers of two the rotations' fewest signed-power decompositions use most, a local search that
        swaps one key at a time for a signed power of two or a rotation's own step (or its negative) while the
        total does not grow (deterministic: ``seed``)."""
        if n < 1:
            raise CgfBertError(f"fixed rotation keys: need at least one, got {n}")
        counts = {k: v for k, v in merged([counts], slots).items() if k and v}
        powers = [p % slots for i in range(slots.bit_length() - 1) for p in (1 << i, -(1 << i))]
        use = dict.fromkeys(powers, 0.0)
        for k, c in counts.items():
            for d in _naf(k):
                if d % slots:
                    use[d % slots] = use.get(d % slots, 0.0) + c
        candidates = sorted(set(powers) | set(counts) | {(slots - k) % slots for k in counts})
        start = list(dict.fromkeys([1, *sorted(use, key=lambda p: -use[p]), *candidates]))[:n]
        if len(start) < n:
            raise CgfBertError(f"fixed rotation keys: {n} asked, only {len(start)} distinct steps to choose from")
        best, best_cost = tuple(start), cls(slots, tuple(start)).cost(counts)
        rng = random.Random(seed)
        for _ in range(tries if n > 1 else 0):
            swap = list(best)
            swap[rng.randrange(1, n)] = rng.choice(candidates)  # step 1 stays: every rotation remains possible
            if len(set(swap)) < n:
                continue
            c = cls(slots, tuple(swap)).cost(counts)
            if c <= best_cost:
                best, best_cost = tuple(swap), c
        return cls(slots, tuple(sorted(best)))


def rotation_keys(key: str, slots: int, counts: Mapping[int, float] | None = None) -> GeneralKeys | FixedKeys | EveryStep:
    """The rotation keys beside bootstrap key ``key``: the small key's general rotation and roll keys, the medium
    key's 15 fixed keys (the roll key does not fit beside it in 24 GB) chosen for ``counts``
    (rotation step -> how many, a slot simulation's); ``rotation-key``, the rotation key alone, is what the
    medium key's rotations were priced with before; ``fixed``, a key for every step, the interactive backend's."""
    if key == "small":
        return GeneralKeys(slots, True)
    if key == "rotation-key":
        return GeneralKeys(slots, False)
    if key == "fixed":
        return EveryStep(slots)
    if key == "medium":
        if not counts:
            raise CgfBertError("the medium key's fixed rotation keys are chosen for a circuit's rotations: none were given")
        return FixedKeys.chosen(counts, slots)
    raise CgfBertError(f"no rotation keys for {key!r}: one of small, medium, rotation-key, fixed")


def from_json(d: Mapping, slots: int) -> GeneralKeys | FixedKeys | EveryStep:
    """The keys whose ``to_json`` is ``d`` (a run in pieces goes on with the keys its state folder names)."""
    kind = d.get("kind")
    if kind == "fixed":
        return FixedKeys(slots, tuple(int(s) for s in d["steps"]))
    if kind == "general":
        return GeneralKeys(slots, bool(d["roll_key"]))
    if kind == "every step":
        return EveryStep(slots)
    raise CgfBertError(f"rotation keys of kind {kind!r}: not fixed, general or every step")
