"""The backends the encoder circuit runs on: the same slot operations on numpy vectors that count
levels (``SimulatedCkks``), on desilofhe ciphertexts with the client refreshing them
(``CkksOps``, interactive) and on desilofhe's bootstrappable engine (``BootstrapOps``).

Each has ``top`` (the level a fresh or refreshed ciphertext starts at), ``slots``, ``encrypt``,
``decrypt`` and ``bootstrap(x, bound)``; ``reserve`` is the levels a bootstrap takes first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.fhe.keys import FixedKeys, GeneralKeys
from cgf_bert.fhe.ops import FheOps, Levelled, LevelledNumpyOps, general_rotate


def scaled_bound(bound: float) -> tuple[int | float, int | float]:
    """How ``BootstrapOps`` scales a value of public bound ``bound`` into the bootstrap's [-1, 1] and
    back, the ``(before, after)`` factors, so that at most one of the two takes a level: a product by
    an ``int`` keeps the level, one by a ``float`` takes one. A bound of at least 1 is rounded up to
    the integer ``B``: ``x / B`` before (one level), ``* B`` after (none). A smaller one is raised by
    the integer ``m = floor(1 / bound)`` before (none) and scaled back by ``1 / m`` after (one level),
    so that the bootstrap's error stays relative to the value; a bound in (1/2, 1) needs no scaling."""
    if bound >= 1:
        return 1.0 / math.ceil(bound), math.ceil(bound)
    m = math.floor(1.0 / bound)
    return (m, 1.0 / m) if m > 1 else (1, 1)


def after_levels(bound: float) -> int:
    """Levels the scaling back after a bootstrap by ``bound`` takes (``scaled_bound``): 0 or 1."""
    return int(isinstance(scaled_bound(bound)[1], float))


@dataclass(frozen=True)
class BootstrapNoise:
    """A bootstrap's error on its [-1, 1] input range: drawn from the errors of every slot of one real
    bootstrap (``measured``: an ``experiments.ckks_costs`` record's npz), or Gaussian of ``sigma``.
    Measured twice on the small key: 1.1-1.2e-6 rms and 3.0-3.7e-5 max over 32,768 slots, unrelated
    to the value (correlation 0.002), with a tail 30 rms wide that no Gaussian has, so the measured
    errors are resampled rather than summarised.

    ``bias``: every slot also errs by ``bias * m**3``, ``m`` the mean over all slots of what the bootstrap
    gets: the offset a real bootstrap adds to an input of nonzero mean (summary.md 88-93: -1.5e-3 on the
    medium key, ``experiments.bootstrap_inputs``: the offset opposes the mean)."""

    sigma: float = 0.0
    errors: np.ndarray | None = field(default=None, repr=False)
    source: str = "gaussian"
    bias: float = 0.0

    @classmethod
    def measured(cls, record: str | Path) -> BootstrapNoise:
        path = Path(record).with_suffix(".npz")
        try:
            with np.load(path) as f:
                errors = np.asarray(f["error"], dtype=np.float64)
        except (OSError, KeyError, ValueError) as e:
            raise CgfBertError(f"{path}: not the slot errors of an experiments.ckks_costs record ({e})") from None
        if not len(errors) or not np.isfinite(errors).all():
            raise CgfBertError(f"{path}: its slot errors are empty or not all finite")
        return cls(float(np.sqrt(np.mean(errors**2))), errors, path.name)

    def __bool__(self) -> bool:
        return self.sigma > 0 or self.bias != 0

    def offset(self, mean: float) -> float:
        """The error every slot gets from the input's ``mean`` on [-1, 1] (numpy's power: a value driven past
        float64 by the noise comes back non-finite, to be reported, as the slots do, not raised)."""
        if not self.bias:
            return 0.0
        return self.bias * float(np.power(np.float64(mean), 3))

    def draw(self, rng: np.random.Generator, shape) -> np.ndarray:
        if self.errors is not None:
            return rng.choice(self.errors, shape)
        return rng.normal(0.0, self.sigma, shape)

    def to_json(self) -> dict:
        return {"rms": self.sigma, "from": self.source, "bias": self.bias}


class SimulatedCkks(LevelledNumpyOps):
    """``LevelledNumpyOps`` with encryption at ``top`` levels and a bootstrap that returns ``top``, less
    the level ``BootstrapOps`` takes to scale back a bound below 1 (``scaled_bound``; none where
    ``reserve`` is 0, the client's refresh).

    With ``noise`` (a ``BootstrapNoise``), each bootstrap adds to every slot an error drawn on the
    bootstrap's [-1, 1] (and the noise's offset for the input's mean there) and scaled back with the value (times the integer bound, or over ``m``:
    ``scaled_bound``). The products and rotations add far smaller errors and are left out (checked: on
    the real run of a CGF student's layer 0 the simulation's logit error was 2.9e-6, the encrypted
    run's 3.0e-6): the simulation says what the bootstraps' error does to each layer and to the
    logits, before anything is encrypted."""

    def __init__(self, slots: int, top: int, reserve: int = 0, noise: BootstrapNoise | None = None, seed: int = 0,
                 keys: GeneralKeys | FixedKeys | None = None):
        super().__init__()
        self.slots, self.top, self.reserve = slots, top, reserve  # reserve: levels a bootstrap takes first (BootstrapOps)
        self.noise, self.rng = noise, np.random.default_rng(seed)
        self.keys = keys or GeneralKeys(slots)  # rotations counted as BootstrapOps makes them with these keys

    def keyswitches(self, k: int) -> int:
        return self.keys.switches(k)

    def encrypt(self, v: np.ndarray) -> Levelled:
        return Levelled(np.asarray(v, dtype=np.float64), self.top)

    def peek(self, x: Levelled) -> np.ndarray:
        return x.slots

    def bootstrap(self, x: Levelled, bound: float) -> Levelled:
        slots = x.slots
        if self.noise:
            before, after = scaled_bound(bound)
            drawn = self.noise.draw(self.rng, slots.shape) if self.noise.sigma > 0 else 0.0
            slots = slots + (drawn + self.noise.offset(float(np.mean(slots)) * before)) * after
        return Levelled(slots, self.top - (after_levels(bound) if self.reserve else 0))


class CkksOps(FheOps):
    """The slot operations on desilofhe ciphertexts, with the client's refresh in place of a bootstrap.

    ``bootstrap`` here is interactive: the ciphertext goes back to the client, who decrypts it and
    encrypts it again at the top level (one round trip, counted as a bootstrap in the stage log and
    reported as interactive). It is what lets the circuit run under real encryption on a ring
    without bootstrapping keys; the non-interactive bootstrap (desilofhe's
    ``Engine(bootstrap=True)`` and its keys) takes the same place in the circuit.
    """

    interactive = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.top = ctx.max_level - 1  # desilofhe makes no rotation key at an engine's very top level
        self.slots = ctx.slots

    def encrypt(self, v: np.ndarray):
        return self.e.level_down(self.ctx.encrypt(v), self.top)

    def decrypt(self, x) -> np.ndarray:
        return self.ctx.decrypt(x)

    def bootstrap(self, x, bound: float):
        return self.encrypt(self.decrypt(x))


class BootstrapOps(FheOps):
    """The slot operations on desilofhe's bootstrappable engine (2^15 slots, 17 levels), with real,
    non-interactive bootstraps: the value scaled into the bootstrap's input range, the bootstrap
    (back to 17 = ``top``), the value scaled back (``scaled_bound``: a bound of at least 1 costs its
    level before the bootstrap, so ``reserve`` = 1, and returns at 17; one below 1/2 returns at 16).
    Every operation works at level 17 on this engine (checked: rotation, products, the basis; a real
    bootstrap by bound 3.7 returned level 17 and by 0.2 level 16, at 9.8e-5 and 4.5e-6).

    Keys (made once, ``keygen_s`` and ``key_bytes`` say what they cost): the relinearization and
    conjugation keys, and either the small bootstrap key (``key="small"``: 8.5 GB of keys in all, measured)
    with desilofhe's general rotation key and roll key, or the medium bootstrap key (15.3 GB alone, its
    bootstraps 3.8 times faster: 65 s against 245 s here) with 15 fixed rotation keys chosen for the
    circuit (``keys.FixedKeys``), the memory the rotation key would take: beside it the roll key does not
    fit 24 GB, and the rotation key alone makes a right rotation by 1 from 15 key switches (4.6 s against
    0.38 s, record ckks_costs-20261203-080628). A rotation is then the fewest key steps summing to it
    (``keys``: signed powers of two with the small key's set).
    """

    interactive = False
    reserve = 1

    def __init__(self, key: str = "small", thread_count: int | None = None, mode: str = "cpu", keys: FixedKeys | None = None,
                 secret_key: Path | None = None):
        """``keys``: the medium key's fixed rotation keys (``keys.rotation_keys``: chosen for the circuit's rotations);
        ``secret_key``: a file the secret key is read from, or written to if absent (``context.client_key``)."""
        if key not in ("small", "medium"):
            raise CgfBertError(f"no bootstrap key {key!r}: small or medium")
        if (key == "medium") != isinstance(keys, FixedKeys):
            raise CgfBertError("the medium key's rotation keys are fixed keys chosen for the circuit (keys.rotation_keys), "
                               "the small key's its general keys: " + ("none were given" if keys is None else f"got {keys.describe()}"))
        from cgf_bert.fhe.context import client_key, desilofhe

        start = time.perf_counter()
        e = desilofhe().Engine(bootstrap=True, mode=mode, thread_count=thread_count)
        sk = client_key(e, secret_key)
        self.e, self.secret_key, self.public_key = e, sk, e.create_public_key(sk)
        self.rlk, self.conj_key = e.create_relinearization_key(sk), e.create_conjugation_key(sk)
        self.top, self.slots = int(e.max_level), int(e.slot_count)
        if key == "small":
            self.keys = GeneralKeys(self.slots, both_ways=True)
            self.rotation_key, self.roll_key = e.create_rotation_key(sk), e.create_roll_key(sk)
            self.rotating = (self.rotation_key, self.roll_key)
            self.boot_keys = (self.roll_key, e.create_small_bootstrap_key(sk))
        else:
            if keys.slots != self.slots:
                raise CgfBertError(f"fixed rotation keys chosen for {keys.slots} slots, the engine has {self.slots}")
            self.keys, self.fixed = keys, {s: e.create_fixed_rotation_key(sk, s) for s in keys.steps}
            self.rotating = tuple(self.fixed.values())
            self.boot_keys = (e.create_bootstrap_key(sk, size=key),)
        self.keygen_s = time.perf_counter() - start

    @property
    def key_bytes(self) -> int:
        keys = {id(k): k for k in (self.public_key, self.rlk, self.conj_key, *self.rotating, *self.boot_keys)}
        return int(sum(getattr(k, "nbytes", 0) for k in keys.values()))

    def rotate(self, x, k: int):
        if isinstance(self.keys, FixedKeys):
            for step in self.keys.path(k):
                x = self.e.rotate(x, self.fixed[step])
            return x
        return general_rotate(self.e, x, k, self.rotation_key, self.roll_key)

    def keyswitches(self, k: int) -> int:
        return self.keys.switches(k)

    def encrypt(self, v: np.ndarray):
        return self.e.level_down(self.e.encrypt(np.ascontiguousarray(v, dtype=np.float64), self.public_key), self.top)

    def decrypt(self, x) -> np.ndarray:
        return np.asarray(self.e.decrypt(x, self.secret_key))

    def bootstrap(self, x, bound: float):
        before, after = scaled_bound(bound)  # an int product keeps the level, a float one takes one
        scaled = x if before == 1 else self.e.multiply(x, before)
        # A plaintext product leaves the ciphertext in NTT form, which the bootstrap refuses (the exact
        # softmax's reciprocal bootstraps one directly); intt converts it and leaves any other as it is.
        fresh = self.e.bootstrap(self.e.intt(scaled), self.rlk, self.conj_key, *self.boot_keys)
        return fresh if after == 1 else self.e.multiply(fresh, after)
