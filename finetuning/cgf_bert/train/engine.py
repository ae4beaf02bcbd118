"""The one training loop. What differs between recipes is the ``train_step`` passed to ``fit``."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cgf_bert import CgfBertError
from cgf_bert.data.loader import to_device
from cgf_bert.data.tasks import classification_metrics
from cgf_bert.store.atomic import atomic_write
from cgf_bert.store.checkpoint import save_checkpoint
from cgf_bert.train import distributed
from cgf_bert.train.precision import DEFAULT as FP32
from cgf_bert.train.precision import autocast
from cgf_bert.train.resume import RunState, restore, save_state

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
TrainStep = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


class NonFiniteLoss(CgfBertError):
    """Training produced a nan or inf loss."""


def set_seed(seed: int) -> int:
    """Seed python, numpy and torch (all devices); returns the seed for the record."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else CPU. Under torchrun a bare ``cuda`` is
    this process's GPU (``cuda:LOCAL_RANK``)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise CgfBertError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CgfBertError("--device cuda asked for, but no CUDA device is available")
    if device.type == "cuda" and device.index is None and distributed.from_env().world > 1:
        device = torch.device("cuda", distributed.from_env().local_rank)
    return device


def freeze_embeddings(model: nn.Module) -> int:
    """Freeze BERT's embedding layer (word, position, type, LayerNorm); returns #frozen params."""
    frozen = 0
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
        frozen += p.numel()
    return frozen


def build_optimizer(model: nn.Module, lr: float, total_steps: int, weight_decay: float = 0.0):
    """AdamW over trainable parameters and a linear decay to 0 with no warmup."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, fused=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / max(1, total_steps)))
    return opt, sched






@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, 2) and labels (N,) over a loader, in loader order, without gradients.

    Always float32, whatever the training precision: a checkpoint's dev figure is that of its
    float32 weights, which ``validate.py`` reproduces exactly."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = to_device(batch, device)
        out = model(**batch)["logits"]
        logits.append(out.float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def logit_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cross-entropy loss, accuracy and F1 of logits (N, 2) against labels (N,)."""
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return {"loss": loss, **classification_metrics(logits.argmax(-1), labels)}


def evaluate(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Dev loss, accuracy and F1."""
    return logit_metrics(*predict(model, loader, device))


def ce_step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain cross-entropy fine-tuning step."""
    loss = F.cross_entropy(model(**batch)["logits"], batch["labels"])
    return loss, {"ce": loss.detach()}


@dataclass
class FitResult:
    best_epoch: int
    best: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def fit(
    model: nn.Module,
    train_step: TrainStep,
    train_loader,
    eval_loader,
    optimizer,
    scheduler,
    *,
    epochs: int,
    device: torch.device,
    checkpoint: str | Path,
    meta: dict[str, Any],
    metrics_path: str | Path | None = None,
    max_grad_norm: float = 1.0,
    precision: str = FP32,
    selection: str = "accuracy",
    state: RunState | None = None,
) -> FitResult:
    """Train for ``epochs``, evaluate on dev after each, keep the best epoch's checkpoint.

    The best epoch is the one with the highest dev ``selection`` figure (the task's; the first on ties). Its
    checkpoint is written to ``checkpoint`` as soon as it is found, so a crash or a
    non-finite loss later never loses it. Metrics go to ``metrics_path`` as JSONL.

    With ``state``, the full training state is saved at each epoch's end before that epoch's
    checkpoint and metrics row are written: a kill before the save repeats the epoch on
    resume, a kill after it finds everything the state names. ``state.loaded`` (a state read
    back) continues the run after its epoch. Under torchrun the model trains as DDP on each
    process's share of every batch (``distributed.py``); rank 0 evaluates and writes.
    """
    d = distributed.setup(device)
    model.to(device)
    net = distributed.wrap(model, device, d)  # the training forward; evaluation and saving use ``model``
    result, first = FitResult(best_epoch=0, best={selection: -math.inf}), 1
    if state and state.loaded:
        result, first = _resume(state.loaded, model, optimizer, scheduler, train_loader, device, d, checkpoint, meta, metrics_path)
    start = time.perf_counter() - result.seconds  # a resumed run counts the time trained before
    if metrics_path and d.main:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    metrics_file = open(metrics_path, "a") if metrics_path and d.main else None
    try:
        for epoch in range(first, epochs + 1):
            train = _train_epoch(net, train_step, train_loader, optimizer, scheduler, device, epoch, epochs, max_grad_norm, result, precision, d)
            dev = distributed.broadcast(evaluate(model, eval_loader, device) if d.main else None, d)
            row = {"epoch": epoch, "train": train, "dev": dev, "seconds": round(time.perf_counter() - start, 1)}
            result.history.append(row)
            improved = dev[selection] > result.best[selection]
            if improved:
                result.best_epoch, result.best = epoch, dev
            result.seconds = time.perf_counter() - start
            if state:
                progress = {"history": result.history, "best_epoch": result.best_epoch, "best": result.best, "seconds": result.seconds}
                save_state(state, epoch, model, optimizer, scheduler, train_loader, progress, device, d)
            if d.main:
                _log_epoch(epoch, epochs, train, dev, improved, checkpoint, model, meta, metrics_file, row)
    finally:
        if metrics_file:
            metrics_file.close()
    result.seconds = time.perf_counter() - start
    return result


def _log_epoch(epoch, epochs, train, dev, improved, checkpoint, model, meta, metrics_file, row) -> None:
    """Rank 0's part of an epoch's end: the best checkpoint, the log line, the metrics row."""
    if improved:
        save_checkpoint(checkpoint, model, {**meta, "epoch": epoch, "dev": dev})
    log.info("epoch %d: dev acc %.4f f1 %.4f%s", epoch, dev["accuracy"], dev["f1"], " (best)" if improved else "")
    tqdm.write(f"epoch {epoch}/{epochs}: train {_fmt(train)} | dev acc {dev['accuracy']:.4f} f1 {dev['f1']:.4f}" + (" *" if improved else ""))
    if metrics_file:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()


def _resume(loaded, model, optimizer, scheduler, loader, device, d, checkpoint, meta, metrics_path) -> tuple[FitResult, int]:
    """The run's objects put back as they were after the state's epoch; the result so far and the next epoch.

    A kill between the state's save and the epoch's checkpoint or metrics row leaves those
    behind the state: the metrics file is rewritten from the state's history, and when that
    epoch was the best, its checkpoint from the restored weights (they are the best ones).
    """
    progress = restore(loaded, model, optimizer, scheduler, loader, device, d)
    epoch = progress.pop("epoch")
    result = FitResult(**progress)
    if d.main:
        if metrics_path:
            rows = "".join(json.dumps(r) + "\n" for r in result.history)
            atomic_write(metrics_path, lambda f: f.write(rows), binary=False)
        if result.best_epoch == epoch:
            save_checkpoint(checkpoint, model, {**meta, "epoch": epoch, "dev": result.best})
    log.info("resumed after epoch %d (best so far: epoch %d)", epoch, result.best_epoch)
    return result, epoch + 1


def _train_epoch(net, train_step, loader, optimizer, scheduler, device, epoch, epochs, max_grad_norm, result, precision, d) -> dict[str, float]:
    net.train()
    sums: dict[str, float] = {}
    n = 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True, disable=not d.main)
    for step, batch in enumerate(bar, start=1):
        batch, weight = distributed.shard(batch, d)  # this process's rows of the global batch; weight 1 alone
        batch = to_device(batch, device)
        with autocast(device, precision):
            loss, terms = train_step(net, batch)
        # One sync per step (all processes' values summed under torchrun); needed for the nan check and the bar anyway.
        values = distributed.global_values({"loss": loss.detach(), **terms}, weight, d)
        if not math.isfinite(values["loss"]):
            kept = f"the best checkpoint so far (epoch {result.best_epoch}) is kept" if result.best_epoch else "no checkpoint was written"
            bad = ", ".join(k for k, v in terms.items() if not math.isfinite(values[k]))
            raise NonFiniteLoss(f"loss is {values['loss']} at epoch {epoch}, step {step}{f' (not finite: {bad})' if bad else ''}; {kept}. "
                                "Try a lower --lr or --coeff, or wider intervals for the polynomial ops.")
        optimizer.zero_grad(set_to_none=True)
        (loss if weight == 1.0 else loss * weight).backward()  # DDP averages over processes: weights make it the batch mean
        if max_grad_norm > 0:
            nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        n += 1
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
    return {k: v / max(n, 1) for k, v in sums.items()}


def _fmt(terms: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in terms.items())
