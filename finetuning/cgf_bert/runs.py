"""Recipes: set up model, data and optimizer, call ``fit``, and leave a run record.

Step scripts are thin wrappers over these functions.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from datasets import DatasetDict

from . import CgfBertError
from .checkpoint import load_model, model_from_checkpoint, read_checkpoint
from .config import DistillConfig, TrainConfig
from .data import load_mrpc, load_tokenizer, make_loader, tokenize
from .engine import (
    TrainStep,
    build_optimizer,
    ce_step,
    evaluate,
    fit,
    freeze_embeddings,
    predict,
    resolve_device,
    set_seed,
)
from .losses import kd_terms, make_kd_step, needs_hidden
from .model import BertMRPC, build_model, resolve_model
from .teacher_cache import TeacherCache, maybe_build
from .records import RESULTS_DIR, REPO_ROOT, code_version, command_line, machine, run_name, uncommitted_files, write_json

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
    extra: dict[str, Any] | None = None,
    name_suffix: str = "",
) -> dict[str, Any]:
    """Run ``fit`` with ``train_step`` under the recipe in ``cfg``; return the run record.

    ``data`` is ``(tokenizer, tokenized splits)`` when the caller already has it.
    ``extra`` (e.g. distillation settings) goes into the checkpoint and the record.
    """
    device = resolve_device(cfg.device)
    tokenizer, data = data or prepare_data(cfg.model, cfg.data_dir, cfg.max_length, cfg.limit)
    if cfg.freeze_embeddings:
        freeze_embeddings(model)
    if cfg.compile:
        model.compile(dynamic=True)  # in place: parameter names, hence checkpoints, unchanged
    train_loader = make_loader(data["train"], tokenizer, cfg.batch_size, shuffle=True, seed=cfg.seed, group_by_length=cfg.group_by_length)
    eval_loader = make_loader(data["validation"], tokenizer, cfg.eval_batch_size)
    optimizer, scheduler = build_optimizer(model, cfg.lr, cfg.epochs * len(train_loader), cfg.weight_decay)

    name = run_name(script, cfg.softmax, cfg.coeff, cfg.seed, name_suffix)
    out = Path(out) if out else checkpoint_dir() / f"{name}.pt"
    results_dir = Path(results_dir)
    version, dirty = code_version(), uncommitted_files()
    meta = {"model": cfg.model, "seed": cfg.seed, "code_version": version, "script": script, **(extra or {})}
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
        "config": dataclasses.asdict(cfg),
        **({"distill": extra} if extra else {}),
        "seed": cfg.seed,
        "epochs": result.history,
        "best_epoch": result.best_epoch,
        "best": result.best,
        "wall_seconds": round(result.seconds, 1),
        "started": started,
        "device": machine(device),
        "code_version": version,
        "uncommitted_files": dirty,
        "checkpoint": str(out),
        "test_predictions": test_predictions(best, data, tokenizer, device, cfg.eval_batch_size),
    }
    write_json(results_dir / f"{name}.json", record)
    return record


def finetune(cfg: TrainConfig, out: str | Path | None = None, results_dir: str | Path = RESULTS_DIR) -> dict[str, Any]:
    """CE fine-tuning of a pretrained BERT with the softmax in ``cfg`` (teacher or CGF baseline)."""
    data = prepare_data(cfg.model, cfg.data_dir, cfg.max_length, cfg.limit)  # bad data fails before any work
    set_seed(cfg.seed)
    model = build_model(cfg.model, cfg.softmax, cfg.coeff)
    return train(cfg, model, ce_step, script="finetune", out=out, results_dir=results_dir, data=data)


def score(
    checkpoint: str | Path,
    softmax: str | None = None,
    coeff: float | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    batch_size: int = 128,
    max_length: int = 128,
    data=None,
) -> dict[str, Any]:
    """Dev accuracy and F1 of a checkpoint, with its own softmax unless overridden."""
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, softmax, coeff)
    model.to(dev)
    tokenizer, data = data or prepare_data(meta["model"], data_dir, max_length)
    metrics = evaluate(model, make_loader(data["validation"], tokenizer, batch_size), dev)
    kind, c = model.softmax
    return {"checkpoint": str(checkpoint), "softmax": kind, "coeff": c, "dev": metrics, "trained": meta, "device": machine(dev)}


def record_score(result: dict[str, Any], results_dir: str | Path = RESULTS_DIR) -> Path:
    """A validate run's record, in ``results_dir/validate/`` (kept out of the training tables)."""
    soft = "exact" if result["softmax"] == "exact" else f"cgf{result['coeff']:g}"
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-validate-{Path(result['checkpoint']).stem}-{soft}"
    rec = {"name": name, "script": "validate", "command": command_line(), "code_version": code_version(), **result}
    return write_json(Path(results_dir) / "validate" / f"{name}.json", rec)


def check_teacher(meta: dict, path: str | Path, model: str) -> dict:
    """``meta`` if it is an exact-softmax teacher of base ``model``; anything else is a clear error."""
    if meta["softmax"] != "exact":
        raise CgfBertError(f"teacher {path} uses the {meta['softmax']} softmax (c={meta['coeff']:g}); a teacher must be exact")
    if meta["model"] != model:
        raise CgfBertError(f"teacher {path} was fine-tuned from {meta['model']!r}, but the student base model is {model!r}")
    return meta


def load_teacher(path: str | Path, model: str) -> tuple[BertMRPC, dict]:
    """An exact-softmax teacher of base ``model`` from ``path``, the file read once."""
    state_dict, meta = read_checkpoint(path)
    check_teacher(meta, path, model)
    return model_from_checkpoint(state_dict, meta, path), meta


def ensure_teacher(path: str | Path, cfg: TrainConfig, results_dir: str | Path = RESULTS_DIR, data=None) -> tuple[BertMRPC, dict]:
    """Load the teacher at ``path``, training it once with the finetune recipe when absent."""
    path = Path(path)
    if not path.exists():
        log.warning("no teacher at %s: fine-tuning one (exact softmax, seed %d)", path, cfg.seed)
        tcfg = dataclasses.replace(cfg, softmax="exact")
        set_seed(tcfg.seed)
        train(tcfg, build_model(tcfg.model, "exact"), ce_step, script="finetune", out=path, results_dir=results_dir, data=data)
    return load_teacher(path, cfg.model)


def distill(
    cfg: TrainConfig,
    dcfg: DistillConfig,
    teacher_path: str | Path,
    out: str | Path | None = None,
    results_dir: str | Path = RESULTS_DIR,
    data=None,
    teacher: tuple[BertMRPC, dict, TeacherCache | None] | None = None,
) -> dict[str, Any]:
    """KD from the exact teacher at ``teacher_path`` into a CGF student (softmax/coeff in ``cfg``).

    ``teacher`` is ``(model, metadata, cache)`` from ``prepare_teacher`` when the caller
    already has it (``distill_seeds`` shares one across seeds).
    """
    data = data or prepare_data(cfg.model, cfg.data_dir, cfg.max_length, cfg.limit)
    teacher_model, tmeta, cache = teacher or prepare_teacher(teacher_path, cfg, dcfg, results_dir, data)
    set_seed(cfg.seed)
    if dcfg.init == "teacher":
        student = copy.deepcopy(teacher_model).requires_grad_(True)  # the teacher itself is frozen
    else:
        student = build_model(cfg.model)
    student.set_softmax(cfg.softmax, cfg.coeff)
    terms = kd_terms(dcfg.alpha, dcfg.beta)
    step = make_kd_step(teacher_model, terms, dcfg.temperature, cache)
    extra = {
        **dataclasses.asdict(dcfg), "terms": terms, "teacher": str(teacher_path), "teacher_dev": tmeta.get("dev"),
        "teacher_seed": tmeta.get("seed"), "teacher_cached": cache is not None,
        "teacher_cache_seconds": round(cache.seconds, 1) if cache else None, "teacher_cache_bytes": cache.nbytes if cache else None,
    }
    return train(cfg, student, step, script="distill", out=out, results_dir=results_dir, data=data, extra=extra, name_suffix=f"-b{dcfg.beta:g}-{dcfg.init}")


def prepare_teacher(teacher_path: str | Path, cfg: TrainConfig, dcfg: DistillConfig, results_dir: str | Path, data,
                    loaded: tuple[BertMRPC, dict] | None = None) -> tuple[BertMRPC, dict, TeacherCache | None]:
    """The frozen teacher on the run's device, its metadata, and its cached outputs if asked for.

    ``loaded`` is ``load_teacher``'s result when the caller has already read the checkpoint.
    """
    teacher, tmeta = loaded or ensure_teacher(teacher_path, cfg, results_dir, data)
    device = resolve_device(cfg.device)
    teacher.to(device).eval().requires_grad_(False)
    cache = None
    if dcfg.cache_teacher:
        tokenizer, splits = data
        cache = maybe_build(teacher, splits["train"], tokenizer, device, cfg.eval_batch_size, needs_hidden(kd_terms(dcfg.alpha, dcfg.beta)))
    return teacher, tmeta, cache


def distill_seeds(cfg: TrainConfig, dcfg: DistillConfig, seeds: list[int], teacher_path: str | Path,
                  out: str | Path | None = None, results_dir: str | Path = RESULTS_DIR) -> Iterator[dict[str, Any]]:
    """One student per seed, sharing the tokenized data, the teacher and its cached outputs."""
    # An existing teacher is read (once) and checked before any data work, so a wrong one fails fast.
    loaded = load_teacher(teacher_path, cfg.model) if Path(teacher_path).exists() else None
    data = prepare_data(cfg.model, cfg.data_dir, cfg.max_length, cfg.limit)
    teacher = prepare_teacher(teacher_path, cfg, dcfg, results_dir, data, loaded)
    for seed in seeds:
        yield distill(dataclasses.replace(cfg, seed=seed), dcfg, teacher_path, out, results_dir, data, teacher)
