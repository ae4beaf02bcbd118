"""One checkpoint format: a torch file holding only tensors and a JSON metadata string.

Written atomically (temp file in the same folder, fsync, rename) so a crash never leaves a
half-written checkpoint in place; read with ``weights_only=True`` so loading never runs
pickled code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import CgfBertError
from .model import BertMRPC, build_model, load_weights

FORMAT = "cgf-bert/1"  # bump when the layout below changes


def save_checkpoint(path: str | Path, model: BertMRPC, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind, coeff = model.softmax
    meta = {**meta, "format": FORMAT, "softmax": kind, "coeff": coeff}
    payload = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": json.dumps(meta),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) from a checkpoint; any problem is one clear CgfBertError."""
    path = Path(path)
    if not path.is_file():
        raise CgfBertError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state_dict, meta = payload["state_dict"], json.loads(payload["meta"])
    except Exception as e:  # unpickling errors, truncated zips, wrong layout: all mean "not ours"
        raise CgfBertError(f"{path} is not a readable cgf-bert checkpoint ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CgfBertError(f"{path} has checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    return state_dict, meta


def load_model(path: str | Path, softmax: str | None = None, coeff: float | None = None) -> tuple[BertMRPC, dict]:
    """Rebuild the model a checkpoint was trained as, with its softmax unless overridden."""
    state_dict, meta = read_checkpoint(path)
    return model_from_checkpoint(state_dict, meta, path, softmax, coeff), meta


def model_from_checkpoint(state_dict, meta: dict, source: str | Path, softmax: str | None = None, coeff: float | None = None) -> BertMRPC:
    """Build the model from a checkpoint already read with ``read_checkpoint``."""
    model = build_model(meta["model"], meta["softmax"], meta["coeff"])
    load_weights(model, state_dict, source=source)
    return model.set_softmax(softmax or meta["softmax"], meta["coeff"] if coeff is None else coeff)
