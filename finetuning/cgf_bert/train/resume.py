"""The training state saved at each epoch's end, and continuing a run from it (``--resume``).

The state is everything the next epoch depends on: the weights, the optimiser and scheduler,
the RNG streams of torch (and CUDA), numpy and python of every process, what orders the next
epoch's batches (the length-grouped sampler's epoch count, or the shuffling generator), the
best epoch so far and the per-epoch history. A run resumed from it trains the remaining
epochs as the uninterrupted run would have, bit for bit on CPU.

It is one torch file of tensors, numbers and JSON strings, written atomically and read with
``weights_only=True``, like a checkpoint: loading never runs pickled code. Once the run's
record is written, the state shrinks to a marker naming the record (``finished``), so that
``--resume`` of a finished run (one seed of several, or a plan re-run) reuses its record.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cgf_bert import CgfBertError
from cgf_bert.store.atomic import atomic_write
from cgf_bert.train.distributed import Dist, gather

FORMAT = "cgf-bert-state/1"
SUFFIX = ".state.pt"


@dataclass
class RunState:
    """Where a run's state is saved, the run's identity kept across resumes (JSON: name, start,
    command, config), and the state read back to continue from (None: a fresh start)."""

    path: Path
    info: dict[str, Any]
    loaded: dict[str, Any] | None = None


# ---------------------------------------------------------------- RNG and loader state


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch, CUDA, numpy and python RNG states, as tensors and numbers."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(s: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def loader_state(loader) -> dict[str, Any]:
    """What orders the loader's next epoch: the length-grouped sampler's epoch count (its order is
    a function of seed and epoch), or the state of the generator that shuffles plain batches."""
    return {"sampler_epoch": getattr(loader.batch_sampler, "epoch", None),
            "generator": None if loader.generator is None else loader.generator.get_state()}


def set_loader_state(loader, s: dict[str, Any]) -> None:
    if s["sampler_epoch"] is not None:
        loader.batch_sampler.epoch = s["sampler_epoch"]
    if s["generator"] is not None:
        loader.generator.set_state(s["generator"])


# ---------------------------------------------------------------- saving and loading


def save_state(state: RunState, epoch: int, model, optimizer, scheduler, loader, progress: dict[str, Any],
               device: torch.device, d: Dist) -> None:
    """Every process's RNG gathered, rank 0 writes the state after ``epoch`` atomically.

    ``progress`` is the JSON part: history, best epoch and metrics, seconds trained so far.
    """
    rngs = gather(rng_state(device), d)
    if not d.main:
        return
    payload = {
        "format": FORMAT, "info": json.dumps(state.info), "epoch": epoch, "world": d.world,
        "progress": json.dumps(progress, allow_nan=False),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "loader": loader_state(loader), "rng": rngs,
    }
    atomic_write(state.path, lambda f: torch.save(payload, f))


def save_finished(state: RunState, record: str) -> None:
    """Replace the state by a marker of the finished run (the weights are in its checkpoint)."""
    payload = {"format": FORMAT, "info": json.dumps(state.info), "finished": record}
    atomic_write(state.path, lambda f: torch.save(payload, f))


def load_state(path: str | Path) -> dict[str, Any]:
    """A saved state, read without executing pickled code; any problem is one clear CgfBertError."""
    path = Path(path)
    if not path.is_file():
        raise CgfBertError(f"training state not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(payload, dict) and payload.get("format") == FORMAT
        payload["info"] = json.loads(payload["info"])
    except Exception as e:  # unpickling errors, truncated zips, wrong layout: all mean "not ours"
        raise CgfBertError(f"{path} is not a readable cgf-bert training state ({type(e).__name__})") from None
    if not ok:
        raise CgfBertError(f"{path} has state format {payload.get('format')!r}, expected {FORMAT!r}")
    return payload


def restore(loaded: dict[str, Any], model, optimizer, scheduler, loader, device: torch.device, d: Dist) -> dict[str, Any]:
    """Put a loaded state back into the run's objects; returns the progress (with ``epoch``)."""
    if loaded["world"] != d.world:
        raise CgfBertError(f"the state was saved by {loaded['world']} process(es), this run has {d.world}: "
                           f"resume with the same number of processes (a different split changes the result)")
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    set_loader_state(loader, loaded["loader"])
    set_rng_state(loaded["rng"][d.rank], device)
    return {**json.loads(loaded["progress"]), "epoch": loaded["epoch"]}
