"""One training run under a recipe: data, optimizer, ``fit``, the test-split predictions of the
best checkpoint, and the run record. The recipes (``recipes.py``) and the teacher
(``teacher.py``) call ``train`` with their model and ``train_step``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from .checkpoint import load_model
from .config import DistillConfig, TrainConfig
from .data import load_mrpc, load_tokenizer, make_loader, tokenize
from .engine import TrainStep, build_optimizer, fit, freeze_embeddings, predict, resolve_device
from .model import BertMRPC, resolve_model
from .records import (
    REPO_ROOT, RESULTS_DIR, code_version, command_line, config_json, machine, repo_relative, run_name,
    uncommitted_files, write_json,
)

log = logging.getLogger(__name__)
CHECKPOINT_ENV = "CGF_BERT_CHECKPOINT_DIR"  # where checkpoints go when no -o is given


def checkpoint_dir() -> Path:
    """$CGF_BERT_CHECKPOINT_DIR, else ``checkpoints/`` in the repository (git-ignored)."""
    return Path(os.environ.get(CHECKPOINT_ENV) or REPO_ROOT / "checkpoints")


def prepare_data(model: str, data_dir: str | None, max_length: int, limit: int | None = None):
    """Tokenizer and tokenized MRPC splits for base model ``model``."""
    tokenizer = load_tokenizer(resolve_model(model))
    raw = load_mrpc(data_dir)
    if limit:
        raw = DatasetDict({k: v.select(range(min(limit, len(v)))) for k, v in raw.items()})
    return tokenizer, tokenize(raw, tokenizer, max_length)


def test_predictions(model: BertMRPC, data: DatasetDict, tokenizer, device, batch_size: int) -> dict[str, int]:
    """Predicted labels on the unlabeled GLUE test split, keyed by its ``index``."""
    if "test" not in data:
        return {}
    loader = make_loader(data["test"], tokenizer, batch_size)
    logits, _ = predict(model, loader, device)
    return {str(i): int(p) for i, p in zip(data["test"]["idx"], logits.argmax(-1))}


def train(
    cfg: TrainConfig,
    model: BertMRPC,
    train_step: TrainStep,
    *,
    script: str,
    out: str | Path | None = None,
    results_dir: str | Path = RESULTS_DIR,
    data=None,
    dcfg: DistillConfig | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``fit`` with ``train_step`` under the recipe in ``cfg``; return the run record.

    ``data`` is ``(tokenizer, tokenized splits)`` when the caller already has it. ``dcfg``
    (distillation) and ``extra`` (the teacher's details) go into the checkpoint and the record.
    """
    device = resolve_device(cfg.device)
    tokenizer, data = data or prepare_data(cfg.model, cfg.data_dir, cfg.max_length, cfg.limit)
    model.set_softmax(cfg.softmax)
    if cfg.freeze_embeddings:
        freeze_embeddings(model)
    if cfg.compile:
        model.compile(dynamic=True)  # in place: parameter names, hence checkpoints, unchanged
    train_loader = make_loader(data["train"], tokenizer, cfg.batch_size, shuffle=True, seed=cfg.seed, group_by_length=cfg.group_by_length)
    eval_loader = make_loader(data["validation"], tokenizer, cfg.eval_batch_size)
    optimizer, scheduler = build_optimizer(model, cfg.lr, cfg.epochs * len(train_loader), cfg.weight_decay)

    name = run_name(script, cfg, dcfg)
    out = Path(out) if out else checkpoint_dir() / f"{name}.pt"
    results_dir = Path(results_dir)
    version, dirty = code_version(), uncommitted_files()
    distill = {**config_json(dcfg), **(extra or {})} if dcfg else None
    meta = {"model": cfg.model, "seed": cfg.seed, "code_version": version, "script": script, **({"distill": distill} if distill else {})}
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    result = fit(
        model, train_step, train_loader, eval_loader, optimizer, scheduler,
        epochs=cfg.epochs, device=device, checkpoint=out, meta=meta,
        metrics_path=results_dir / f"{name}.metrics.jsonl", max_grad_norm=cfg.max_grad_norm,
    )
    best, _ = load_model(out)  # score the test split with the kept (best-epoch) weights
    best.to(device)
    record = {
        "name": name,
        "script": script,
        "command": command_line(),
        "config": config_json(cfg),
        **({"distill": distill} if distill else {}),
        "seed": cfg.seed,
        "epochs": result.history,
        "best_epoch": result.best_epoch,
        "best": result.best,
        "wall_seconds": round(result.seconds, 1),
        "started": started,
        "device": machine(device),
        "code_version": version,
        "uncommitted_files": dirty,
        "checkpoint": repo_relative(out),
        "test_predictions": test_predictions(best, data, tokenizer, device, cfg.eval_batch_size),
    }
    write_json(results_dir / f"{name}.json", record)
    return record
