"""What a circuit costs and where it refreshes: ``StageLog`` (per stage: seconds, operations,
bootstraps), ``Counted`` (slot operations that count themselves into it) and ``Refresher`` (a
bootstrap wherever a step needs more levels than its ciphertext has, by a public bound)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.fhe.backends import scaled_bound


def stage_kind(stage: str) -> str:
    """'layer 3 / softmax' -> 'softmax'."""
    return stage.split(" / ")[-1]


def summed(table: list[dict]) -> dict:
    """A stage table's counts added up per stage kind (over the layers)."""
    out: dict = {}
    for r in table:
        agg = out.setdefault(stage_kind(r["stage"]), {})
        for key, v in r.items():
            if key != "stage":
                agg[key] = agg.get(key, 0) + v
    return out


def mean_by_kind(tables: list[list[dict]]) -> dict:
    """{stage kind: {count: its mean over the tables}}: the examples' stage tables (each its share of its ciphertext)."""
    out: dict = {}
    for table in tables:
        for kind, d in summed(table).items():
            agg = out.setdefault(kind, {})
            for key, v in d.items():
                agg[key] = agg.get(key, 0) + v / len(tables)
    return {k: {m: round(v, 2) for m, v in d.items()} for k, d in out.items()}


def mean_levels(levels: dict) -> dict[str, float]:
    """{op: the mean level it ran at} of a ``StageLog.level_table`` (an operation's cost grows with its level)."""
    return {op: round(sum(float(lv) * n for lv, n in d.items()) / sum(d.values()), 2) for op, d in levels.items() if sum(d.values())}


@dataclass
class StageLog:
    """Per stage (e.g. 'layer 0 / softmax'): seconds, operations, bootstraps, level in and out."""

    stages: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    current: str = "input"
    levels: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))  # op -> level -> count
    steps: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))  # stage -> rotation step (mod the slots) -> count

    def count(self, what: str, n: float = 1.0, level: int | None = None):
        self.stages[self.current][what] += n
        if level is not None:
            self.levels[what][level] += n

    def level_table(self) -> dict[str, dict[str, float]]:
        """{op: {level: count}} over the whole circuit: where its operations ran (an op's cost falls
        with the level; ``experiments.ckks_costs`` measures by how much)."""
        return {op: {str(k): v for k, v in sorted(d.items(), reverse=True)} for op, d in self.levels.items()}

    def steps_by_kind(self, share: float = 1.0) -> dict[str, dict[str, float]]:
        """{stage kind: {rotation step: count * share}}: what reprices its rotations for other keys."""
        out: dict = defaultdict(lambda: defaultdict(float))
        for stage, d in self.steps.items():
            for k, n in d.items():
                out[stage_kind(stage)][str(k)] += n * share
        return {kind: dict(sorted(d.items(), key=lambda kv: int(kv[0]))) for kind, d in out.items()}

    def to_json(self) -> dict:
        """Everything logged, as JSON (``from_json`` reads it back): what a run stopped between layers keeps."""
        return {"current": self.current, "stages": {k: dict(d) for k, d in self.stages.items()},
                "levels": {op: {str(lv): n for lv, n in d.items()} for op, d in self.levels.items()},
                "steps": {k: {str(s): n for s, n in d.items()} for k, d in self.steps.items()}}

    @classmethod
    def from_json(cls, obj: dict) -> StageLog:
        log = cls(current=obj["current"])
        for name, key in (("stages", str), ("levels", int), ("steps", int)):
            for k, d in obj[name].items():
                getattr(log, name)[k].update({key(m): float(v) for m, v in d.items()})
        return log

    def table(self) -> list[dict]:
        return [{"stage": k, **{m: (round(v, 3) if isinstance(v, float) and not v.is_integer() else int(v)) for m, v in d.items()}}
                for k, d in self.stages.items()]


class Counted:
    """Slot operations that count themselves into a ``StageLog`` (what each stage costs in ops)."""

    COUNTED = ("mul", "square", "mul_plain", "rotate", "cheb_basis")
    COSTED = ("mul", "square", "mul_plain", "rotate", "bootstraps")  # what a cost table prices

    def __init__(self, ops, log: StageLog):
        self.ops, self.log = ops, log

    def __getattr__(self, name):
        fn = getattr(self.ops, name)
        if name not in self.COUNTED:
            return fn

        def counted(*a, **kw):
            if name == "rotate" and a[1] == 0:
                return fn(*a, **kw)
            level = self._level(a)
            start = time.perf_counter()
            out = fn(*a, **kw)
            if name == "cheb_basis":  # T_2 .. T_d: one ciphertext product each, at or below the argument's level
                self.log.count("mul", a[1] - 1, level)
            else:
                self.log.count(name, level=level)
            if name == "rotate" and hasattr(self.ops, "keyswitches"):  # what a rotation costs: its key switches
                self.log.count("keyswitch", self.ops.keyswitches(a[1]), level)
                self.log.steps[self.log.current][a[1] % self.ops.slots] += 1
            self.log.count("seconds", time.perf_counter() - start)
            return out

        return counted

    def _level(self, args) -> int | None:
        """The level an operation runs at: its ciphertext operands', aligned to the lower (None on plain numpy)."""
        levels = [self.ops.level(x) for x in args[:2] if not isinstance(x, (int, float, np.ndarray))]
        return None if not levels or None in levels else min(levels)


def stage_seconds(counts: dict, costs: dict) -> float:
    """Seconds of a stage's operation ``counts`` at ``costs`` (an ``experiments.ckks_costs`` record's: its rotation
    is one key switch, a fixed key's). Rotations are priced by their key switches where the stage counted them
    (a rotation with desilofhe's general keys is one per set bit of its step: ``ops.signed_steps``); a record
    from before they were counted prices one per rotation, which undercounts the general keys' rotations."""
    ops = {**counts, "rotate": counts.get("keyswitch", counts.get("rotate", 0))}
    return sum(ops.get(op, 0) * costs[op] for op in Counted.COSTED)


class Refresher:
    """Bootstraps a ciphertext when a step needs more levels than it has left.

    ``ops.bootstrap(x, bound)`` scales by ``1/bound`` into the bootstrap's input range, refreshes
    and scales back; ``bounds`` maps a call site to its public bound. ``centres`` maps a site to a public
    constant subtracted before its bootstrap and added back after (no level either way), so that what the
    bootstrap gets has about mean 0: a real bootstrap adds an offset that grows about as the cube of its
    input's mean (summary 88). The bound is then on |value - centre|: smaller for a value of one sign
    (LayerNorm's variance), possibly larger for one spread unevenly about 0. With ``record=True`` every site's largest |value - centre| is recorded (``seen``),
    with its extent (``extents``: lowest and highest slot) and each call's mean over all slots
    (``slot_means``), for calibration, numpy ops only; a site without a bound then takes ``margin`` times
    its value, as calibration will set it. A value beyond its bound is counted in ``overflows`` (the result
    would be wrong under CKKS), never hidden. ``means`` keeps, per site, the largest |mean over all slots|
    of what the bootstrap gets (the centred value scaled by its bound, numpy ops only).

    Level drops. A bootstrap returns its ciphertext at the top level, and the lazy placement above often
    bootstraps a value before its levels are spent (the exp's input with levels to spare): every product and
    rotation on the way then ran higher, so slower, than it had to (a plaintext product costs 3.8 times as much
    at level 17 as at 3, a rotation 5 times: ``experiments.ckks_costs``). On values that track their origins
    (``ops.Levelled.paths``) the Refresher keeps, per origin (``"input"``, or ``"{site} {k}"`` for a site's k-th
    bootstrap), the most levels it could have dropped with every step still finding what it needs and every
    bootstrap the same (``spare``, ``planned_drops``). Given ``drops`` (a first simulation's ``planned_drops``),
    each origin is dropped by its own as it is made (``origin``): the same values, the same bootstraps, the
    products and rotations at lower levels.

    With ``measure=True`` each bootstrap's input and output are decrypted (the client's key: a measurement,
    not the protocol) and ``errors`` keeps, per site, the largest change it made, scaled back by the factor its
    bound multiplies the bootstrap's [-1, 1] range by (``backends.scaled_bound``): the error on that range,
    what ``experiments.ckks_costs`` measures on a fresh ciphertext; ``offsets`` keeps the signed mean change
    over all slots, on the same range, of the call whose |offset| was largest: the bias, apart from the
    noise that averages out.
    """

    def __init__(self, ops, log: StageLog, top: int, bounds: dict[str, float] | None = None, record: bool = False,
                 margin: float = 1.0, measure: bool = False, centres: dict[str, float] | None = None,
                 drops: dict[str, int] | None = None):
        self.ops, self.log, self.top = ops, log, top
        self.bounds, self.record, self.margin, self.measure = dict(bounds or {}), record, margin, measure
        self.centres = dict(centres or {})
        self.drops = dict(drops or {})
        self.spare: dict[str, int] = {}  # per origin: the most levels it could drop (tracked values only)
        self.errors: dict[str, float] = {}
        self.offsets: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.extents: dict[str, tuple[float, float]] = {}
        self.slot_means: dict[str, list[float]] = defaultdict(list)
        self.means: dict[str, float] = {}
        self.overflows: dict[str, float] = {}
        self.watched: dict[str, float] = {}
        self.booted: dict[str, int] = defaultdict(int)  # bootstraps per call site

    def origin(self, x, name: str):
        """``x``, just made at the top of its levels, dropped by its planned drop and tracked as origin ``name``.
        The names (a site's k-th bootstrap) hold across a run that goes on from a saved layer because every
        site inside a layer names its layer, so a fresh Refresher counts its bootstraps from 0 there too."""
        if self.drops.get(name):
            x = self.ops.level_down(x, self.ops.level(x) - self.drops[name])
        return replace(x, paths={name: x.level}) if hasattr(x, "paths") else x

    def done(self, x):
        """``x`` is the circuit's output: it must keep level 0."""
        self._keep(x, 0)

    def _keep(self, x, levels: int):
        """Every origin of ``x`` must leave it ``levels`` levels: the most each may drop by."""
        for o, p in getattr(x, "paths", {}).items():
            self.spare[o] = min(self.spare.get(o, p), p - levels)

    def planned_drops(self) -> dict[str, int]:
        """{origin: levels to drop}: what ``spare`` found, where it is positive."""
        return {o: d for o, d in self.spare.items() if d > 0}

    def watch(self, x, site: str, limit: float):
        """Record the largest |value| over every slot of ``x`` (numpy ops only); one beyond ``limit`` is
        counted in ``overflows`` (slots a later mask zeroes still pass through the polynomial basis)."""
        if not hasattr(self.ops, "peek"):
            return
        peak = float(np.abs(self.ops.peek(x)).max())
        self.watched[site] = max(self.watched.get(site, 0.0), peak)
        if peak > limit:
            self.overflows[site] = max(self.overflows.get(site, 0.0), peak / limit)

    @property
    def usable(self) -> int:
        """Levels one step may use: a bootstrap's ``top`` less the ``reserve`` its own scaling takes."""
        return self.top - getattr(self.ops, "reserve", 0)

    def __call__(self, x, need: int, site: str, at_most: float | None = None):
        """``x`` bootstrapped if it has fewer than ``need`` levels left, by its site's calibrated bound, or by
        ``at_most`` where the circuit itself bounds the value (Goldschmidt's ``e`` is within [-1, 1]
        whenever its sum is inside its bound): no calibration can then miss a larger value."""
        if need > self.usable:
            raise CgfBertError(f"{site} needs {need} levels in one step, more than the {self.usable} a bootstrap leaves")
        reserve = getattr(self.ops, "reserve", 0)
        if self.ops.level(x) - reserve >= need:
            self._keep(x, need + reserve)  # a drop must not make this step bootstrap
            return x
        self._keep(x, reserve)  # a bootstrap's scaling still has its level
        centre = 0.0 if at_most is not None else self.centres.get(site, 0.0)
        slots = self.ops.peek(x) if hasattr(self.ops, "peek") else None  # numpy ops: what calibration sees
        peak = None if slots is None else float(np.abs(slots - centre).max())
        if slots is not None and at_most is None:
            if self.record and not np.isfinite(peak):
                raise CgfBertError(f"{site}: a calibration value is not finite ({peak}): no bound can be set from it")
            self.seen[site] = max(self.seen.get(site, 0.0), peak)
            lo, hi = self.extents.get(site, (np.inf, -np.inf))
            self.extents[site] = (min(lo, float(slots.min())), max(hi, float(slots.max())))
            self.slot_means[site].append(float(np.mean(slots)))
        bound = at_most if at_most is not None else self.bounds.get(site)
        if bound is None:
            if not self.record:
                raise CgfBertError(f"no bootstrap bound for {site!r}: calibrate first (pipeline.calibrate)")
            bound = max(self.margin * peak, 1e-12)
        if peak is not None and peak > bound:
            self.overflows[site] = max(self.overflows.get(site, 0.0), peak / bound)
        if slots is not None:
            mean = abs(float(np.mean(slots)) - centre) * abs(scaled_bound(bound)[0])
            self.means[site] = max(self.means.get(site, 0.0), mean)
        self.log.count("bootstraps")
        self.booted[site] += 1
        start = time.perf_counter()
        y = self.ops.add_const(x, -centre) if centre else x
        out = self.ops.bootstrap(y, bound)
        out = self.ops.add_const(out, centre) if centre else out
        self.log.count("bootstrap_seconds", time.perf_counter() - start)
        if self.measure:
            scale = abs(scaled_bound(bound)[1])  # what the [-1, 1] range is multiplied by after the bootstrap
            change = (self.ops.decrypt(out) - self.ops.decrypt(x)) / scale
            self.errors[site] = max(self.errors.get(site, 0.0), float(np.abs(change).max()))
            offset = float(np.mean(change))
            if abs(offset) >= abs(self.offsets.get(site, 0.0)):
                self.offsets[site] = offset
        out = self.origin(out, f"{site} {self.booted[site]}")
        self._keep(out, need + reserve)
        left = self.ops.level(out) - reserve
        if left < need:  # a bound below 1 is scaled back after the bootstrap, at the cost of a level
            raise CgfBertError(f"{site} needs {need} levels, but a bootstrap by its bound {bound:.3g} leaves {left}")
        return out
