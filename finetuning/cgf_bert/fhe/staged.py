"""An encrypted run in pieces: after every encoder layer the ciphertext and what the run has measured so far
go to a state folder, so a run that stops (``Pieces.stop_after``, or is killed) goes on from its last
finished layer when the same command is given again.

Why: on this 2-core CPU one layer of the whole student under real bootstraps takes about 40 minutes per
ciphertext (summary.md finding 84), and six layers take longer than a working session. In pieces, the
non-interactive result can be measured at all, and each piece's time is kept beside the others.

The folder holds:

- ``secret.key``: the client's secret key (``context.client_key``). It decrypts everything in the folder: keep
  the folder out of the repository. The server's keys are made again from it at every start; each
  piece records what that cost.
- ``state.json``: what must not change between the pieces (the options that shape the circuit, and per
  checkpoint its bootstrap bounds and rotation keys). A start that differs is refused before any key is made.
- per ciphertext ``{tag}-after{n}.ct`` (the output of its last finished layer, the ``n``-th) and ``{tag}.json``
  (the layers done, the stage log, the errors after each layer, the pieces, and at the end the decrypted logits).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.fhe import pipeline as P
from cgf_bert.fhe.accounting import Counted, Refresher, StageLog
from cgf_bert.store.records import write_json

SECRET = "secret.key"


class Stopped(Exception):
    """Raised between layers once a run's time is up; everything it did is on disk (``Pieces``)."""


def _plain(obj):
    """``obj`` as JSON reads it back (tuples as lists, int keys as strings): what two pieces compare."""
    return json.loads(json.dumps(obj))


@dataclass
class Pieces:
    """A state folder (see the module): ``agree`` what must not change, ``saved``/``save`` each ciphertext's progress.

    ``stop_after``: seconds after ``started`` past which no new layer is begun, the last layer's time
    being the estimate of the next's (None: never stop)."""

    root: Path
    stop_after: float | None = None
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.root = Path(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".writable.tmp"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CgfBertError(f"--state {self.root}: cannot write there ({e})") from None

    @property
    def secret_key(self) -> Path:
        return self.root / SECRET

    def agree(self, name: str, value) -> None:
        """Record ``value`` under ``name`` in ``state.json``, or refuse it if an earlier piece recorded another."""
        path = self.root / "state.json"
        try:
            state = json.loads(path.read_text()) if path.exists() else {}
        except ValueError as e:
            raise CgfBertError(f"{path}: not JSON ({e}); the folder is not a run's state") from None
        value = _plain(value)
        if name in state and state[name] != value:
            old = state[name]
            keys = sorted(k for k in set(old) | set(value) if old.get(k) != value.get(k)) if isinstance(old, dict) and isinstance(value, dict) else None
            raise CgfBertError(f"--state {self.root} belongs to another run: its {name} differ"
                               + (f" in {', '.join(keys)}" if keys else "") + " (a new folder starts a new run)")
        if name not in state:
            write_json(path, {**state, name: value})

    def saved(self, tag: str) -> dict | None:
        """The progress of ciphertext ``tag`` (None: not begun)."""
        path = self.root / f"{tag}.json"
        if not path.exists():
            return None
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
        write_json(self.root / f"{tag}.json", progress)
        for old in self.root.glob(f"{tag}-after*.ct"):
            if old.name != progress.get("ciphertext"):
                old.unlink()

    def resume(self, tag: str, ops):
        """``(layer, ciphertext)`` to go on from (``pipeline.run``'s ``start``), or None to begin."""
        got = self.saved(tag)
        if not got or not got["layers_done"]:
            return None
        path = self.root / got.get("ciphertext", "")
        try:
            return got["layers_done"], ops.read(path)
        except Exception as e:  # desilofhe: RuntimeError on a file it cannot read
            raise CgfBertError(f"{path}: not a ciphertext this engine can read ({e}); the state is damaged "
                               "(a new folder starts the run again)") from None

    def time_up(self, last_layer_seconds: float) -> bool:
        """Whether another layer, taking as long as the last, would end past ``stop_after``."""
        if self.stop_after is None:
            return False
        return time.perf_counter() - self.started + last_layer_seconds > self.stop_after

    def progress(self) -> dict:
        """Every ciphertext's progress (the secret key and the ciphertexts left out): a stopped run's record."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.root.glob("*.json")) if p.name != "state.json"}


def encrypted(circuit, make_ops, bounds: dict, emb, hidden: list, pieces: Pieces | None = None, tag: str = "",
              piece: dict | None = None, say=lambda text: None):
    """One ciphertext (``emb``: one example or a packed list) through the ops ``make_ops()`` gives: the measured
    stage table, the decrypted logits, the error after each layer and the pieces the run took.

    With ``pieces``, after each layer the ciphertext and the progress are saved under ``tag``; a run saved
    part-way goes on from its last layer, one saved whole returns its result without making any key; past
    ``pieces.stop_after`` it raises ``Stopped`` between two layers. ``piece``: what to record of this piece
    (the code version, the keys' time); ``say``: where each layer's progress is told."""
    saved = (pieces.saved(tag) if pieces else None) or {}
    if "logits" in saved:
        return StageLog.from_json(saved["log"]).table(), np.array(saved["logits"]), saved["per_layer"], saved["pieces"]
    ops = make_ops()
    log = StageLog.from_json(saved["log"]) if saved else StageLog()
    per_layer, history = list(saved.get("per_layer", [])), list(saved.get("pieces", []))
    this = {**(piece or {}), "first_layer": saved.get("layers_done", 0), "layers": 0, "seconds": 0.0}
    history.append(this)
    start = pieces.resume(tag, ops) if pieces else None
    layers, measure = len(circuit.w.layers), P.layer_errors(circuit, ops, hidden, per_layer)
    began = last = time.perf_counter()

    def probe(i, x):
        nonlocal last
        measure(i, x)
        now = time.perf_counter()
        took, last = now - last, now
        this.update(layers=i + 1 - this["first_layer"], seconds=round(now - began, 1))
        e = per_layer[-1]
        say(f"    layer {i}: {took:.0f} s, max abs error {e['max_abs_error']:.1e} (largest value {e['max_abs_value']:.1f})")
        if pieces:
            pieces.save(tag, ops, x, {"layers_done": i + 1, "log": log.to_json(), "per_layer": per_layer, "pieces": history})
            if i + 1 < layers and pieces.time_up(took):
                raise Stopped(f"{tag} stopped after layer {i} of {layers} (0-{layers - 1}), its state in {pieces.root}")

    got = P.run(circuit, Counted(ops, log), Refresher(ops, log, ops.top, bounds=bounds), emb, log, probe, start)
    this["seconds"] = round(time.perf_counter() - began, 1)
    if pieces:
        pieces.save(tag, ops, None, {"layers_done": layers, "log": log.to_json(), "per_layer": per_layer, "pieces": history,
                                     "logits": np.asarray(got).tolist()})
    return log.table(), got, per_layer, history
