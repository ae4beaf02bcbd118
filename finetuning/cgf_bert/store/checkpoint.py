"""One checkpoint format: a torch file holding only tensors and a JSON metadata string.

Written atomically (``atomic.atomic_write``) so a crash never leaves a half-written
checkpoint in place; read with ``weights_only=True`` so loading never runs pickled code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import EXACT, Approximations
from cgf_bert.approx.softmax import legacy_softmax
from cgf_bert.model.bert import BertMRPC, build_model, load_weights
from cgf_bert.store.atomic import atomic_write

# 3: "approx", a spec per replaced op; 2: "softmax", its spec {"name", params..., "layers"}; 1: "softmax" a name + "coeff"
FORMAT = "cgf-bert/3"
READABLE = ("cgf-bert/1", "cgf-bert/2", FORMAT)


def save_checkpoint(path: str | Path, model: BertMRPC, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    meta = {**meta, "format": FORMAT, "approx": model.approx.to_json()}
    payload = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": json.dumps(meta, allow_nan=False),
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) from a checkpoint; any problem is one clear CgfBertError.

    ``meta["approx"]`` comes back as ``Approximations``, whichever format wrote it (formats 1 and 2
    had a softmax alone: every other op was exact).
    """
    path = Path(path)
    if path.is_dir():
        return read_exported(path)
    if not path.is_file():
        raise CgfBertError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state_dict, meta = payload["state_dict"], json.loads(payload["meta"])
    except Exception as e:  # unpickling errors, truncated zips, wrong layout: all mean "not ours"
        raise CgfBertError(f"{path} is not a readable cgf-bert checkpoint ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE:
        raise CgfBertError(f"{path} has checkpoint format {meta.get('format')!r}, expected one of {READABLE}")
    if "softmax" in meta:
        meta["approx"] = EXACT.replace(softmax=legacy_softmax(meta.pop("softmax"), meta.pop("coeff", None))).to_json()
    meta["approx"] = Approximations.from_json(meta["approx"])
    return state_dict, meta


def read_exported(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a folder written by ``cgf_bert.hub.export``: its model.safetensors and the
    checkpoint metadata in its config.json, the folder itself as the base model (it holds the config)."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CgfBertError(f"{folder} is not an exported cgf-bert folder (config.json: {type(e).__name__})") from None
    if not isinstance(config, dict) or config.get("model_type") != "cgf_bert" or not isinstance(config.get("cgf_bert"), dict) \
            or "approx" not in config["cgf_bert"]:
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise CgfBertError(f"{folder}: config.json has model_type {kind!r} and no cgf_bert approximations: not an exported cgf-bert student")
    try:
        state_dict = load_file(folder / "model.safetensors")
    except Exception as e:  # a missing file, a truncated or foreign one: safetensors' own error types
        raise CgfBertError(f"{folder}: model.safetensors is not readable ({type(e).__name__})") from None
    meta = dict(config["cgf_bert"].get("checkpoint", {}))
    meta.update(base_model=meta.get("base_model", meta.get("model")), model=str(folder),
                approx=Approximations.from_json(config["cgf_bert"]["approx"]))
    return state_dict, meta


def load_model(path: str | Path, approx: Approximations | None = None) -> tuple[BertMRPC, dict]:
    """Rebuild the model a checkpoint was trained as, with its approximations unless overridden."""
    state_dict, meta = read_checkpoint(path)
    return model_from_checkpoint(state_dict, meta, path, approx), meta


def model_from_checkpoint(state_dict, meta: dict, source: str | Path, approx: Approximations | None = None) -> BertMRPC:
    """Build the model from a checkpoint already read with ``read_checkpoint``."""
    model = build_model(meta["model"])
    load_weights(model, state_dict, source=source)
    return model.set_approx(approx or meta["approx"])
