"""One training run under a recipe: data, optimizer, ``fit``, the test-split predictions of the
best checkpoint, and the run record. The recipes (``recipes.py``) and the teacher
(``teacher.py``) call ``train`` with their model and ``train_step``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict

from cgf_bert import CgfBertError
from cgf_bert.config import TASK, DistillConfig, TrainConfig
from cgf_bert.data.loader import load_tokenizer, make_loader, tokenize
from cgf_bert.data.tasks import data_fingerprint, get_task
from cgf_bert.model.bert import BertMRPC, resolve_model
from cgf_bert.store.atomic import remove_leftovers
from cgf_bert.store.checkpoint import load_model
from cgf_bert.store.names import run_name
from cgf_bert.store.provenance import (
    REPO_ROOT,
    RESULTS_DIR,
    code_version,
    command_line,
    machine,
    repo_relative,
    uncommitted_files,
)
from cgf_bert.store.records import config_json, write_json
from cgf_bert.train import distributed
from cgf_bert.train.engine import (
    TrainStep,
    build_optimizer,
    fit,
    freeze_embeddings,
    predict,
    resolve_device,
)
from cgf_bert.train.precision import check_precision
from cgf_bert.train.resume import SUFFIX, RunState, load_state, save_finished

log = logging.getLogger(__name__)
CHECKPOINT_ENV = "CGF_BERT_CHECKPOINT_DIR"  # where checkpoints go when no -o is given


def checkpoint_dir() -> Path:
    """$CGF_BERT_CHECKPOINT_DIR, else ``checkpoints/`` in the repository (git-ignored)."""
    return Path(os.environ.get(CHECKPOINT_ENV) or REPO_ROOT / "checkpoints")


def prepare_data(model: str, data_dir: str | None, max_length: int, limit: int | None = None, task: str = TASK):
    """Tokenizer and the tokenized splits of ``task`` for base model ``model``."""
    tokenizer = load_tokenizer(resolve_model(model))
    raw = get_task(task).load(data_dir)
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


def check_model(cfg: TrainConfig, model: BertMRPC, data) -> None:
    """Options the loaded model must be able to honour, checked before the first step: the
    longest tokenized example (cut at --max-length) must fit the model's position embeddings."""
    positions = model.bert.config.max_position_embeddings
    longest = max(max(split["length"]) if "length" in split.column_names else max(map(len, split["input_ids"])) for split in data.values())
    if longest > positions:
        raise CgfBertError(f"--max-length {cfg.max_length}: examples of up to {longest} tokens, but the model {cfg.model!r} "
                           f"has {positions} position embeddings (give --max-length {positions} or less)")


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
    resume: bool | str | Path | None = None,
) -> dict[str, Any]:
    """Run ``fit`` with ``train_step`` under the recipe in ``cfg``; return the run record.

    ``data`` is ``(tokenizer, tokenized splits)`` when the caller already has it. ``dcfg``
    (distillation) and ``extra`` (the teacher's details) go into the checkpoint and the record.
    ``resume`` continues the run from its saved state (True: where this run saves it; a path:
    that state file); a finished run's record is returned as it is. Under torchrun every process
    calls this and gets the record; only rank 0 writes.
    """
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    d = distributed.setup(device)
    distributed.per_process_batch(cfg.batch_size, d)  # an uneven split fails before any work
    distill = {**config_json(dcfg), **(extra or {})} if dcfg else None
    state = open_state(script, cfg, dcfg, (extra or {}).get("teacher"), out, resume, d)
    if "finished" in (state.loaded or {}):
        return finished_record(state)
    tokenizer, data = data or prepare_data(cfg.model, cfg.data_dir, cfg.max_length, cfg.limit, cfg.task)
    check_model(cfg, model, data)
    _setup_model(model, cfg, d)
    train_loader = make_loader(data["train"], tokenizer, cfg.batch_size, shuffle=True, seed=cfg.seed, group_by_length=cfg.group_by_length)
    eval_loader = make_loader(data["validation"], tokenizer, cfg.eval_batch_size)
    optimizer, scheduler = build_optimizer(model, cfg.lr, cfg.epochs * len(train_loader), cfg.weight_decay)

    name = state.info["name"]
    out = Path(out) if out else checkpoint_dir() / f"{name}.pt"
    results_dir = Path(results_dir)
    if state.loaded and d.main:
        for path in (out, state.path, results_dir / f"{name}.json", results_dir / f"{name}.metrics.jsonl"):
            remove_leftovers(path)
    version, dirty = code_version(), uncommitted_files()
    meta = {"model": cfg.model, "seed": cfg.seed, "code_version": version, "script": script, **({"distill": distill} if distill else {})}
    result = fit(
        model, train_step, train_loader, eval_loader, optimizer, scheduler,
        epochs=cfg.epochs, device=device, checkpoint=out, meta=meta, metrics_path=results_dir / f"{name}.metrics.jsonl",
        max_grad_norm=cfg.max_grad_norm, precision=cfg.precision, selection=get_task(cfg.task).selection, state=state,
    )
    record = None
    if d.main:
        best, _ = load_model(out)  # score the test split with the kept (best-epoch) weights
        best.to(device)
        record = {
            "name": name,
            "script": script,
            "command": state.info["command"],
            "config": config_json(cfg),
            "data_fingerprint": data_fingerprint(cfg.task, cfg.data_dir),
            **({"distill": distill} if distill else {}),
            "seed": cfg.seed,
            "epochs": result.history,
            "best_epoch": result.best_epoch,
            "best": result.best,
            "wall_seconds": round(result.seconds, 1),
            "started": state.info["started"],
            "device": machine(device),
            **({"processes": d.world} if d.world > 1 else {}),
            **({"resumed": state.info["resumed"]} if state.info.get("resumed") else {}),
            "code_version": version,
            "uncommitted_files": dirty,
            "checkpoint": repo_relative(out),
            "test_predictions": test_predictions(best, data, tokenizer, device, cfg.eval_batch_size),
        }
        path = write_json(results_dir / f"{name}.json", record)
        save_finished(state, repo_relative(path))  # the weights are in the checkpoint: the state shrinks to a marker
    return distributed.broadcast(record, d)  # also keeps the other processes until rank 0 has written


def _setup_model(model: BertMRPC, cfg: TrainConfig, d: distributed.Dist) -> None:
    model.set_approx(cfg.approx)
    if cfg.freeze_embeddings:
        freeze_embeddings(model)
    if cfg.compile:
        model.compile(dynamic=True)  # in place: parameter names, hence checkpoints, unchanged
    if d.world > 1:
        # Every process built the same initial weights from cfg.seed; from here each draws its own
        # dropout masks, as one process would for different examples.
        torch.manual_seed(cfg.seed + d.rank)


# ---------------------------------------------------------------- the run's saved state


def run_identity(script: str, cfg: TrainConfig, dcfg: DistillConfig | None, teacher: str | None) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: script, recipe and teacher."""
    return {"script": script, "config": config_json(cfg), "distill": config_json(dcfg) if dcfg else None, "teacher": teacher}


def state_path(identity: dict[str, Any], cfg: TrainConfig, out: str | Path | None) -> Path:
    """Where a run saves its state: beside ``-o``, else in the checkpoint folder; the name is fixed
    by the run's identity and checkpoint path (not by the clock), so the same command finds it."""
    key = json.dumps({**identity, "out": os.path.abspath(out) if out else None}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = Path(out).parent if out else checkpoint_dir()
    return folder / f"{identity['script']}-{cfg.approx.slug()}-s{cfg.seed}-{digest}{SUFFIX}"


def open_state(script: str, cfg: TrainConfig, dcfg: DistillConfig | None, teacher: str | None, out, resume, d) -> RunState:
    """This run's ``RunState``: a fresh one (new name, start time, command), or the saved one that ``resume`` names."""
    identity = run_identity(script, cfg, dcfg, teacher)
    path = Path(resume) if isinstance(resume, (str, Path)) else state_path(identity, cfg, out)
    loaded = None
    if resume and (path.is_file() or isinstance(resume, (str, Path))):
        loaded = load_state(path)  # a named state file that is missing is an error
        _check_identity(loaded["info"]["identity"], identity, path)
    elif resume:
        log.warning("no saved state at %s: nothing to resume, starting from the first epoch", path)
    elif path.is_file() and d.main:
        log.warning("a saved state of this run exists at %s and is overwritten; --resume would continue it", path)
    if loaded is None:
        info = {"name": run_name(script, cfg, dcfg), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command_line(),
                "identity": identity}
        return RunState(path, distributed.broadcast(info, d))  # one name for every process: rank 0's clock
    info = loaded["info"]
    if "finished" not in loaded:
        info["resumed"] = [*info.get("resumed", []), {"after_epoch": loaded["epoch"], "command": command_line(), "code_version": code_version()}]
    return RunState(path, info, loaded)


def _check_identity(saved: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """A clear error naming the fields in which a state's run differs from this command's."""
    a, b = _flat(saved), _flat(identity)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        raise CgfBertError(f"{path} is the state of another run (it differs in {', '.join(differ)}); resume with that run's own command")


def _flat(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'config': {'lr': 1e-3}} -> {'config.lr': 1e-3}."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def finished_record(state: RunState) -> dict[str, Any]:
    """The record of a run that had already finished when ``--resume`` asked for it."""
    path = REPO_ROOT / state.loaded["finished"]
    if not path.is_file():
        raise CgfBertError(f"{state.path} marks run {state.info['name']} finished, but its record {path} is gone; "
                           f"run without --resume to train it again")
    log.warning("run %s had finished: its record is %s", state.info["name"], path)
    return json.loads(path.read_text())
