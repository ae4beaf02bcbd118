"""The CKKS engine and its keys (desilofhe, optional): made once, reused for every layer."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.fhe.ops import PV_DEPTH

MISSING = 'encrypted evaluation needs desilofhe, the optional CKKS library: pip install -e ".[fhe]" (or pip install desilofhe)'


def desilofhe():
    """The optional CKKS library, imported only where it is used; without it, a readable refusal (``MISSING``)."""
    try:
        import desilofhe as lib
    except ImportError:
        raise CgfBertError(MISSING) from None
    return lib


def client_key(engine, path: Path | None = None):
    """A new secret key, or the one in the file ``path``, written there first if it is absent: a run in
    pieces (``fhe.staged``) keeps its client's key, and the server's keys are made again from it."""
    if path is None:
        return engine.create_secret_key()
    path = Path(path)
    if path.exists():
        try:
            return engine.read_secret_key(str(path))
        except (RuntimeError, ValueError, OSError) as e:  # what desilofhe raises on a file it cannot read
            raise CgfBertError(f"{path}: this engine cannot read it as a secret key ({e})") from None
    key = engine.create_secret_key()
    tmp = path.with_name(path.name + ".tmp")  # whole or absent
    engine.write_secret_key(key, str(tmp))
    os.chmod(tmp, 0o600)  # the client's alone
    tmp.replace(path)
    return key


class FheContext:
    """A desilofhe CKKS engine with its secret, public and relinearization keys, made once.

    ``max_level`` fixes the ring: desilofhe picks the ring size from it (levels 1-2: ring 2^13,
    3-7: 2^14, 8-17: 2^15, 18-36: 2^16 in desilofhe 2.0). A value must stay below about 1e7 at
    level 0 (far more at higher levels) or it wraps around the modulus and spoils every slot.

    Rotation keys are made on first use, one fixed key per rotation step, at the level it is
    first needed (a key made at level l serves ciphertexts at level <= l; a low-level key is a
    fraction of a top-level one's size and time; desilofhe's all-steps key would be ~700 MB at
    ring 2^15 and rotate twice as slowly). No bootstrapping keys: circuits must fit in ``max_level``.
    """

    def __init__(self, max_level: int, *, thread_count: int | None = None, mode: str = "cpu", secret_key: Path | None = None):
        """``secret_key``: a file the secret key is read from, or written to if absent (``client_key``)."""
        lib = desilofhe()  # optional dependency: imported only when a context is made
        start = time.perf_counter()
        self.engine = lib.Engine(max_level=max_level, mode=mode, thread_count=thread_count)
        self.secret_key = client_key(self.engine, secret_key)
        self.public_key = self.engine.create_public_key(self.secret_key)
        self.relin_key = self.engine.create_relinearization_key(self.secret_key)
        self.keygen_s = time.perf_counter() - start  # secret, public and relinearization keys
        self.rotation_keygen_s = 0.0  # grows as rotation keys are made on first use
        self._rotation_keys: dict[int, object] = {}

    @classmethod
    def for_circuits(cls, *circuits, **kw) -> "FheContext":
        """The smallest context whose levels hold every circuit's softmax and P @ V (the ring follows from the depth)."""
        return cls(max(c.depth for c in circuits) + PV_DEPTH, **kw)

    @property
    def slots(self) -> int:
        return int(self.engine.slot_count)

    @property
    def ring_size(self) -> int:
        return 2 * self.slots  # CKKS packs N/2 complex slots in a ring of degree N

    @property
    def max_level(self) -> int:
        return int(self.engine.max_level)

    @property
    def rotation_key_count(self) -> int:
        return len(self._rotation_keys)

    @property
    def key_bytes(self) -> int:
        keys = [self.public_key, self.relin_key, *self._rotation_keys.values()]
        return int(sum(k.nbytes for k in keys))

    def rotation_key(self, delta: int, level: int):
        """The fixed rotation key for a left rotation by ``delta`` slots, usable at ``level``."""
        key = self._rotation_keys.get(delta)
        if key is None or key.level < level:
            start = time.perf_counter()
            key = self.engine.create_fixed_rotation_key(self.secret_key, delta, level)
            self.rotation_keygen_s += time.perf_counter() - start
            self._rotation_keys[delta] = key
        return key

    def encrypt(self, slots: np.ndarray):
        """Encrypt a (slots,) float64 vector with the public key at the top level."""
        return self.engine.encrypt(np.ascontiguousarray(slots, dtype=np.float64), self.public_key)

    def decrypt(self, ct) -> np.ndarray:
        return np.asarray(self.engine.decrypt(ct, self.secret_key))  # (slots,)


