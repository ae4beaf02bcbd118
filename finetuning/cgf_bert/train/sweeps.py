"""Experiments over softmaxes, coefficients and seeds, reusing run records where they exist.

A run whose record (same recipe, variant and seed) is already in the results folder is not
repeated: its record is read back. Pass ``reuse=False`` to train anew.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cgf_bert.approx.approximations import Approximations, layer_depth
from cgf_bert.approx.spec import Spec
from cgf_bert.config import DistillConfig, TrainConfig
from cgf_bert.data.loader import make_loader
from cgf_bert.data.tasks import data_fingerprint
from cgf_bert.model.replaced import counting
from cgf_bert.store.checkpoint import load_model
from cgf_bert.store.provenance import RESULTS_DIR
from cgf_bert.store.records import distill_config, is_benchmark, load_records, train_config
from cgf_bert.train.engine import logit_metrics, predict, resolve_device
from cgf_bert.train.recipes import distill, finetune
from cgf_bert.train.run import prepare_data

log = logging.getLogger(__name__)


def _same_run(rec: dict, cfg: TrainConfig, dcfg: DistillConfig | None, fingerprint: str) -> bool:
    """Whether ``rec`` ran this recipe, variant and seed on the same task and data (the device
    and the folder the data was read from aside: the data's fingerprint decides)."""
    if rec["script"] != ("distill" if dcfg else "finetune") or rec["data_fingerprint"] != fingerprint:
        return False
    where = {"device": None, "data_dir": None}
    return dataclasses.replace(train_config(rec), **where) == dataclasses.replace(cfg, **where) and distill_config(rec) == dcfg


def find_record(cfg: TrainConfig, dcfg: DistillConfig | None = None, results_dir: str | Path = RESULTS_DIR) -> dict[str, Any] | None:
    """The newest record of this exact run (recipe, variant, seed, task and data), or None; a
    benchmark's runs are never reused (the tables leave them out too)."""
    fingerprint = data_fingerprint(cfg.task, cfg.data_dir)
    found = [r for r in load_records(results_dir) if "config" in r and not is_benchmark(r) and _same_run(r, cfg, dcfg, fingerprint)]
    return found[-1] if found else None


def run_or_reuse(cfg: TrainConfig, dcfg: DistillConfig | None = None, teacher: str | None = None,
                 results_dir: str | Path = RESULTS_DIR, reuse: bool = True) -> dict[str, Any]:
    """The record of a fine-tune (or distillation with ``dcfg``), training only if none exists."""
    if reuse and (rec := find_record(cfg, dcfg, results_dir)):
        log.warning("reusing %s", Path(rec["_path"]).name)
        return rec
    if dcfg:
        return distill(cfg, dcfg, teacher, results_dir=results_dir)
    return finetune(cfg, results_dir=results_dir)


def swap_at_eval(checkpoint: str | Path, specs: list[Spec | Approximations], cfg: TrainConfig) -> list[dict[str, Any]]:
    """Score one checkpoint with each spec in turn in place of its own for that op (or with each
    ``Approximations`` in place of all of its own), no training.

    Each row has the dev metrics, the share of dev predictions equal to the first row's
    (``agreement``), the CKKS depth where the spec declares it, the deepest encoder layer's depth
    (``layer_depth``: None while an op is not polynomial), and for a polynomial the inputs that
    left its interval (counted over valid entries, never clipped).
    """
    device = resolve_device(cfg.device)
    model, meta = load_model(checkpoint)  # loaded once; only the swapped op changes between rows
    own = meta["approx"]
    model.to(device)
    tokenizer, data = prepare_data(meta["model"], cfg.data_dir, cfg.max_length)
    loader = make_loader(data["validation"], tokenizer, cfg.eval_batch_size)
    rows, first = [], None
    layers = model.bert.config.num_hidden_layers
    for spec in specs:
        applied = spec if isinstance(spec, Approximations) else own.replace(**{spec.op: spec})
        model.set_approx(applied)
        with counting(model.bert) as counter:
            logits, labels = predict(model, loader, device)
        preds = logits.argmax(-1)
        first = preds if first is None else first
        depths = [layer_depth(applied, i)["layer"] for i in range(layers)]
        row = {("approx" if isinstance(spec, Approximations) else spec.op): spec.to_json(), "label": spec.label(),
               **logit_metrics(logits, labels), "agreement": float((preds == first).mean()),
               "depth": None if isinstance(spec, Approximations) else spec.depth,
               "layer_depth": None if None in depths else max(depths)}
        broken = int((~np.isfinite(logits).all(-1)).sum())
        if broken:  # strict JSON has no nan: say what happened instead
            row["loss"] = None
            row["non_finite"] = {"examples": broken, "reason": "non-finite logits (an exp polynomial evaluated far outside its interval overflows)"}
        if counter.result():
            row["out_of_range"] = counter.result()
        rows.append(row)
    return rows
