"""The one training loop. What differs between recipes is the ``train_step`` passed to ``fit``."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import CgfBertError
from .checkpoint import save_checkpoint

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
    """``name`` if given, else CUDA when available, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CgfBertError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CgfBertError("--device cuda asked for, but no CUDA device is available")
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


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (CGF keeps its reductions in float32), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def classification_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and F1 of the positive class (label 1 = paraphrase), as GLUE reports MRPC."""
    tp = int(((preds == 1) & (labels == 1)).sum())
    fp = int(((preds == 1) & (labels == 0)).sum())
    fn = int(((preds == 0) & (labels == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"accuracy": float((preds == labels).mean()), "f1": f1}


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, 2) and labels (N,) over a loader, in loader order, without gradients."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast_for(device):
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
) -> FitResult:
    """Train for ``epochs``, evaluate on dev after each, keep the best epoch's checkpoint.

    The best epoch is the one with the highest dev accuracy (the first on ties). Its
    checkpoint is written to ``checkpoint`` as soon as it is found, so a crash or a
    non-finite loss later never loses it. Metrics go to ``metrics_path`` as JSONL.
    """
    model.to(device)
    result = FitResult(best_epoch=0, best={"accuracy": -1.0})
    start = time.perf_counter()
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    metrics_file = open(metrics_path, "a") if metrics_path else None
    try:
        for epoch in range(1, epochs + 1):
            train = _train_epoch(model, train_step, train_loader, optimizer, scheduler, device, epoch, epochs, max_grad_norm, result)
            dev = evaluate(model, eval_loader, device)
            row = {"epoch": epoch, "train": train, "dev": dev, "seconds": round(time.perf_counter() - start, 1)}
            result.history.append(row)
            improved = dev["accuracy"] > result.best["accuracy"]
            if improved:
                result.best_epoch, result.best = epoch, dev
                save_checkpoint(checkpoint, model, {**meta, "epoch": epoch, "dev": dev})
            log.info("epoch %d: dev acc %.4f f1 %.4f%s", epoch, dev["accuracy"], dev["f1"], " (best)" if improved else "")
            tqdm.write(f"epoch {epoch}/{epochs}: train {_fmt(train)} | dev acc {dev['accuracy']:.4f} f1 {dev['f1']:.4f}" + (" *" if improved else ""))
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
    finally:
        if metrics_file:
            metrics_file.close()
    result.seconds = time.perf_counter() - start
    return result


def _train_epoch(model, train_step, loader, optimizer, scheduler, device, epoch, epochs, max_grad_norm, result) -> dict[str, float]:
    model.train()
    sums: dict[str, float] = {}
    n = 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)
    for step, batch in enumerate(bar, start=1):
        batch = to_device(batch, device)
        with autocast_for(device):
            loss, terms = train_step(model, batch)
        value = loss.item()  # one sync per step; needed for the nan check and the bar anyway
        if not math.isfinite(value):
            kept = f"the best checkpoint so far (epoch {result.best_epoch}) is kept" if result.best_epoch else "no checkpoint was written"
            raise NonFiniteLoss(f"loss is {value} at epoch {epoch}, step {step}; {kept}. Try a lower --lr or --coeff.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        n += 1
        for k, v in {"loss": value, **terms}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
    return {k: v / max(n, 1) for k, v in sums.items()}


def _fmt(terms: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in terms.items())
