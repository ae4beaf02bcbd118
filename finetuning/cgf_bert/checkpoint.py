"""One checkpoint format: a torch file holding only tensors and a JSON metadata string.

Written atomically (``atomic.atomic_write``) so a crash never leaves a half-written
checkpoint in place; read with ``weights_only=True`` so loading never runs pickled code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import CgfBertError
from .atomic import atomic_write
from .model import BertMRPC, build_model, load_weights
from .softmax import SoftmaxSpec

FORMAT = "cgf-bert/2"  # 2: the softmax is a spec {"name", params..., "layers"}; 1 had "softmax" + "coeff"
READABLE = ("cgf-bert/1", FORMAT)


def save_checkpoint(path: str | Path, model: BertMRPC, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    meta = {**meta, "format": FORMAT, "softmax": model.softmax.to_json()}
    payload = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": json.dumps(meta, allow_nan=False),
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) from a checkpoint; any problem is one clear CgfBertError.

    ``meta["softmax"]`` comes back as a ``SoftmaxSpec``, whichever format wrote it.
    """
    path = Path(path)
    if not path.is_file():
        raise CgfBertError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state_dict, meta = payload["state_dict"], json.loads(payload["meta"])
    except Exception as e:  # unpickling errors, truncated zips, wrong layout: all mean "not ours"
        raise CgfBertError(f"{path} is not a readable cgf-bert checkpoint ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE:
        raise CgfBertError(f"{path} has checkpoint format {meta.get('format')!r}, expected one of {READABLE}")
    meta["softmax"] = SoftmaxSpec.from_json(meta["softmax"], meta.pop("coeff", None))
    return state_dict, meta


def load_model(path: str | Path, softmax: SoftmaxSpec | None = None) -> tuple[BertMRPC, dict]:
    """Rebuild the model a checkpoint was trained as, with its softmax unless overridden."""
    state_dict, meta = read_checkpoint(path)
    return model_from_checkpoint(state_dict, meta, path, softmax), meta


def model_from_checkpoint(state_dict, meta: dict, source: str | Path, softmax: SoftmaxSpec | None = None) -> BertMRPC:
    """Build the model from a checkpoint already read with ``read_checkpoint``."""
    model = build_model(meta["model"])
    load_weights(model, state_dict, source=source)
    return model.set_softmax(softmax or meta["softmax"])
