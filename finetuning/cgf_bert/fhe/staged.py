"""An encrypted run in pieces: after every encoder layer the ciphertext and what the run has measured so far
go to a state folder, so a run that stops (``Pieces.stop_after``, or is killed) goes on from its last
finished layer when the same command is given again.

Why: on this 2-core CPU one layer of the whole student under real bootstraps takes 20-40 minutes per
ciphertext (summary.md findings 84 and 86), and six layers take longer than a working session. In pieces,
the non-interactive result can be measured at all, and each piece's time is kept beside the others.

The folder holds (and a ``.gitignore`` of ``*``, so that none of it is committed by mistake):

- ``secret.key``: the client's secret key (``context.client_key``), readable by its owner only. It decrypts
  everything in the folder. The server's keys are made again from it at every start; each piece records
  what that cost. A folder with progress but without its key is refused: a new key cannot read the old
  ciphertexts.
- ``state.json``: what must not change between the pieces (the options that shape the circuit, the data,
  and per checkpoint its form, bootstrap bounds and rotation keys). A start that differs is refused.
- per ciphertext ``{tag}-after{n}.ct`` (the output of its last finished layer, the ``n``-th) and ``{tag}.json``
  (the examples' tokens, the layers done, the stage log, the errors after each layer and of each bootstrap
  site, the pieces, and at the end the decrypted logits). Its times are the whole ciphertext's, shared by
  the examples packed in it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.fhe import pipeline as P
from cgf_bert.fhe.accounting import Counted, Refresher, StageLog
from cgf_bert.store.atomic import atomic_write

SECRET = "secret.key"
UNREADABLE = (RuntimeError, ValueError, OSError)  # what desilofhe raises on a file it cannot read


class Stopped(Exception):
    """Raised between layers once a run's time is up; everything it did is on disk (``Pieces``). ``finished``:
    per checkpoint, the examples whose logits were in before it, compared with the plaintext model (the caller's)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.finished: dict[str, dict] = {}


def _plain(obj):
    """``obj`` as JSON reads it back (tuples as lists, int keys as strings): what two pieces compare."""
    return json.loads(json.dumps(obj))


def _write(path: Path, obj) -> None:
    """State files are whole or absent, and may hold a non-finite value (a record says where; they are not records)."""
    text = json.dumps(obj, indent=1)
    atomic_write(path, lambda f: f.write(text), binary=False)


@dataclass
class Pieces:
    """A state folder (see the module): ``agree`` what must not change, ``saved``/``save``/``resume`` each
    ciphertext's progress.

    ``stop_after``: seconds after ``started`` past which no new layer is begun, the last layer this process
    ran being the estimate of the next's (None: never stop; 0: begin no layer and make no key, where any
    positive value still runs the first layer a process begins)."""

    root: Path
    stop_after: float | None = None
    started: float = field(default_factory=time.perf_counter)
    last_layer: float | None = None  # seconds of the last layer this process ran

    def __post_init__(self):
        self.root = Path(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ".gitignore").write_text("# a run's state: the client's secret key and ciphertexts\n*\n")
        except OSError as e:
            raise CgfBertError(f"--state {self.root}: cannot write there ({e})") from None

    @property
    def secret_key(self) -> Path:
        """The client's key file; refused if missing where progress is kept (a new key cannot read it)."""
        path = self.root / SECRET
        if not path.exists() and (self.progress() or list(self.root.glob("*.ct"))):
            raise CgfBertError(f"{path} is missing, but the folder holds a run's progress that only that key can "
                               "decrypt: restore the key, or start the run again in a new folder")
        return path

    def agreed(self, name: str):
        """What ``state.json`` holds under ``name`` (None: nothing yet)."""
        return self._state().get(name)

    def _state(self) -> dict:
        path = self.root / "state.json"
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except ValueError as e:
            raise CgfBertError(f"{path}: not JSON ({e}); the folder is not a run's state") from None

    def agree(self, name: str, value) -> None:
        """Record ``value`` under ``name`` in ``state.json``, or refuse it if an earlier piece recorded another."""
        path, state = self.root / "state.json", self._state()
        value = _plain(value)
        if name in state and state[name] != value:
            old = state[name]
            keys = sorted(k for k in set(old) | set(value) if old.get(k) != value.get(k)) if isinstance(old, dict) and isinstance(value, dict) else None
            raise CgfBertError(f"--state {self.root} belongs to another run: its {name} differ"
                               + (f" in {', '.join(keys)}" if keys else "") + " (a new folder starts a new run)")
        if name not in state:
            _write(path, {**state, name: value})

    def saved(self, tag: str) -> dict:
        """The progress of ciphertext ``tag`` ({}: not begun)."""
        path = self.root / f"{tag}.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise CgfBertError(f"{path}: not JSON ({e})") from None

    def save(self, tag: str, ops, x, progress: dict) -> None:
        """Ciphertext ``x`` (the output of layer ``progress["layers_done"] - 1``; None once the logits are in
        ``progress``), then ``progress`` naming it, each file whole or absent, then the older ciphertexts
        removed: a run killed at any point goes on from a layer whose ciphertext and progress agree."""
        progress = dict(progress)
        if x is not None:
            name = f"{tag}-after{progress['layers_done']}.ct"
            tmp = self.root / f"{name}.tmp"
            ops.write(x, tmp)
            tmp.replace(self.root / name)
            progress["ciphertext"] = name
        _write(self.root / f"{tag}.json", progress)
        for old in [*self.root.glob(f"{tag}-after*.ct"), *self.root.glob(f"{tag}-after*.ct.tmp")]:
            if old.name != progress.get("ciphertext"):
                old.unlink()

    def check(self, tag: str, examples) -> dict:
        """``tag``'s progress, refused if it was made on other examples (``examples``: their tokens) or its
        ciphertext is gone; checked before any key is made."""
        got = self.saved(tag)
        if got.get("examples", _plain(examples)) != _plain(examples):
            raise CgfBertError(f"{self.root}: {tag} was begun on other examples (the data read differs); "
                               "a new folder starts a new run")
        if got.get("layers_done") and "logits" not in got and not (self.root / got.get("ciphertext", "")).is_file():
            raise CgfBertError(f"{self.root}: {tag}'s progress names the ciphertext {got.get('ciphertext')!r}, which is "
                               "not there; without it the run cannot go on from its last layer")
        return got

    def resume(self, tag: str, ops):
        """``(layer, ciphertext)`` to go on from (``pipeline.run``'s ``start``), or None to begin."""
        got = self.saved(tag)
        if not got.get("layers_done"):
            return None
        path = self.root / got["ciphertext"]
        try:
            return got["layers_done"], ops.read(path)
        except UNREADABLE as e:
            raise CgfBertError(f"{path}: this engine cannot read it as a ciphertext ({e})") from None

    def time_up(self) -> bool:
        """Whether another layer, taking as long as this process's last, would end past ``stop_after``. At 0 no
        layer is begun and no key made: the partial record of what the folder holds (a killed run leaves none)."""
        if self.stop_after == 0:
            return True
        if self.stop_after is None or self.last_layer is None:
            return False
        return time.perf_counter() - self.started + self.last_layer > self.stop_after

    def progress(self) -> dict:
        """Every ciphertext's progress (the secret key and the ciphertexts left out): a stopped run's record."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.root.glob("*.json")) if p.name != "state.json"}


@dataclass
class Measured:
    """What ``encrypted`` measured of one ciphertext, over every piece: the stage table, the decrypted logits,
    the error after each layer, the pieces (each: its first layer, layers, seconds and what ``piece`` gave)
    and each bootstrap site's largest error and signed mean offset on its [-1, 1] range (``Refresher``'s ``measure``)."""

    table: list[dict]
    logits: np.ndarray
    per_layer: list[dict]
    pieces: list[dict]
    bootstrap_errors: dict[str, float]
    bootstrap_offsets: dict[str, float] = field(default_factory=dict)


def encrypted(circuit, make_ops, bounds: dict, emb, hidden: list, pieces: Pieces | None = None, tag: str = "",
              examples=None, piece=dict, say=lambda text: None, centres: dict | None = None,
              drops: dict | None = None) -> Measured:
    """One ciphertext (``emb``: one example or a packed list, ``examples`` their tokens) through the ops
    ``make_ops()`` gives.

    With ``pieces``, after each layer the ciphertext and the progress are saved under ``tag``; a run saved
    part-way goes on from its last layer, one saved whole returns its result without making any key; past
    ``pieces.stop_after`` it raises ``Stopped`` before a layer, this ciphertext's first included. ``piece()``:
    what to record of this piece, asked once the keys are made; ``say``: where each layer's time is told;
    ``centres``, ``drops``: the bootstrap centres and level drops (``Refresher``)."""
    saved = pieces.check(tag, examples) if pieces else {}
    if "logits" in saved:
        return Measured(StageLog.from_json(saved["log"]).table(), np.array(saved["logits"]), saved["per_layer"],
                        saved["pieces"], saved.get("bootstrap_errors", {}), saved.get("bootstrap_offsets", {}))
    if pieces and pieces.time_up():
        raise Stopped(f"{tag} left after {saved.get('layers_done', 0)} of {len(circuit.w.layers)} layers: no time for another")
    ops = make_ops()
    log = StageLog.from_json(saved["log"]) if saved else StageLog()
    out = Measured([], np.array([]), list(saved.get("per_layer", [])), list(saved.get("pieces", [])),
                   dict(saved.get("bootstrap_errors", {})), dict(saved.get("bootstrap_offsets", {})))
    this = {**piece(), "first_layer": saved.get("layers_done", 0), "layers": 0, "seconds": 0.0}
    out.pieces.append(this)
    start = pieces.resume(tag, ops) if pieces else None
    boot = Refresher(ops, log, ops.top, bounds=bounds, measure=True, centres=centres, drops=drops)
    boot.errors, boot.offsets = out.bootstrap_errors, out.bootstrap_offsets
    layers, measure = len(circuit.w.layers), P.layer_errors(circuit, ops, hidden, out.per_layer)
    began, last = time.perf_counter(), [time.perf_counter()]

    def progress(**more) -> dict:
        return {"examples": examples, "layers_done": this["first_layer"] + this["layers"], "log": log.to_json(),
                "per_layer": out.per_layer, "pieces": out.pieces, "bootstrap_errors": out.bootstrap_errors,
                "bootstrap_offsets": out.bootstrap_offsets, **more}

    def probe(i, x):
        measure(i, x)
        now = time.perf_counter()
        took, last[0] = now - last[0], now
        this.update(layers=i + 1 - this["first_layer"], seconds=round(now - began, 1))
        e = out.per_layer[-1]
        say(f"    layer {i}: {took:.0f} s, max abs error {e['max_abs_error']:.1e} (largest value {e['max_abs_value']:.1f})")
        if pieces:
            pieces.last_layer = took
            pieces.save(tag, ops, x, progress())
            if i + 1 < layers and pieces.time_up():
                raise Stopped(f"{tag} stopped after layer {i} of {layers} (0-{layers - 1})")

    out.logits = P.run(circuit, Counted(ops, log), boot, emb, log, probe, start)
    this["seconds"] = round(time.perf_counter() - began, 1)
    out.table = log.table()
    if pieces:
        pieces.save(tag, ops, None, progress(logits=np.asarray(out.logits).tolist()))
    return out
