"""Recipes: CE fine-tuning, distillation over seeds, and scoring a checkpoint.

Step scripts are thin wrappers over these functions; each training recipe builds a model and
a ``train_step`` and hands them to ``training.train``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.spec import Spec
from cgf_bert.config import DistillConfig, TrainConfig
from cgf_bert.data.loader import make_loader
from cgf_bert.model.bert import BertMRPC, build_model
from cgf_bert.model.replaced import counting
from cgf_bert.store.atomic import check_writable
from cgf_bert.store.checkpoint import load_model
from cgf_bert.store.names import capped
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, machine, repo_relative
from cgf_bert.store.records import write_json
from cgf_bert.train.engine import ce_step, evaluate, resolve_device, set_seed
from cgf_bert.train.losses import make_kd_step
from cgf_bert.train.run import checkpoint_dir, prepare_data, train
from cgf_bert.train.teacher import load_teacher, prepare_teacher
from cgf_bert.train.teacher_cache import TeacherCache

log = logging.getLogger(__name__)


def _check_outputs(out, results_dir) -> None:
    """Every path the run will write (checkpoint, its training state beside it, metrics, record) creatable, before any work."""
    check_writable({"-o/--out": out} if out else {}, {"--results-dir": results_dir, **({} if out else {"checkpoint folder": checkpoint_dir()})})


def finetune(cfg: TrainConfig, out: str | Path | None = None, results_dir: str | Path = RESULTS_DIR,
             resume: bool | str | Path | None = None) -> dict[str, Any]:
    """CE fine-tuning of a pretrained BERT with the softmax in ``cfg`` (teacher or CGF baseline).

    ``resume``: continue the run from its saved state (``training.train``)."""
    _check_outputs(out, results_dir)
    data = prepare_data(cfg.model, cfg.data_dir, cfg.max_length, cfg.limit, cfg.task)  # bad data fails before any work
    set_seed(cfg.seed)
    model = build_model(cfg.model, cfg.approx)
    return train(cfg, model, ce_step, script="finetune", out=out, results_dir=results_dir, data=data, resume=resume)


def distill(
    cfg: TrainConfig,
    dcfg: DistillConfig,
    teacher_path: str | Path,
    out: str | Path | None = None,
    results_dir: str | Path = RESULTS_DIR,
    data=None,
    teacher: tuple[BertMRPC, dict, TeacherCache | None] | None = None,
    resume: bool | str | Path | None = None,
) -> dict[str, Any]:
    """KD from the exact teacher at ``teacher_path`` into a student with the softmax in ``cfg``.

    ``teacher`` is ``(model, metadata, cache)`` from ``prepare_teacher`` when the caller
    already has it (``distill_seeds`` shares one across seeds). ``resume`` continues the
    student's run from its saved state (the teacher's cache is computed again: it is
    deterministic, and smaller to recompute than to store).
    """
    data = data or prepare_data(cfg.model, cfg.data_dir, cfg.max_length, cfg.limit, cfg.task)
    teacher_model, tmeta, cache = teacher or prepare_teacher(teacher_path, cfg, dcfg, results_dir, data, resume=bool(resume))
    set_seed(cfg.seed)
    if dcfg.init == "teacher":
        student = copy.deepcopy(teacher_model).requires_grad_(True)  # the teacher itself is frozen
    else:
        student = build_model(cfg.model)
    step = make_kd_step(teacher_model, dcfg.terms, cache)
    extra = {
        "teacher": repo_relative(teacher_path), "teacher_dev": tmeta.get("dev"),
        "teacher_seed": tmeta.get("seed"), "teacher_cached": cache is not None,
        "teacher_cache_seconds": round(cache.seconds, 1) if cache else None, "teacher_cache_bytes": cache.nbytes if cache else None,
    }
    return train(cfg, student, step, script="distill", out=out, results_dir=results_dir, data=data, dcfg=dcfg, extra=extra, resume=resume)


def distill_seeds(cfg: TrainConfig, dcfg: DistillConfig, seeds: list[int], teacher_path: str | Path,
                  out: str | Path | None = None, results_dir: str | Path = RESULTS_DIR,
                  resume: bool | str | Path | None = None) -> Iterator[dict[str, Any]]:
    """One student per seed, sharing the tokenized data, the teacher and its cached outputs.

    With ``resume=True`` each seed continues from its own saved state; a seed that had finished
    returns its record, one that never saved a state starts afresh."""
    if isinstance(resume, (str, Path)) and len(seeds) > 1:
        raise CgfBertError("--resume STATE names one run's state; with several --seeds give --resume alone")
    _check_outputs(out, results_dir)
    # An existing teacher is read (once) and checked before any data work, so a wrong one fails fast.
    loaded = load_teacher(teacher_path, cfg.model) if Path(teacher_path).exists() else None
    data = prepare_data(cfg.model, cfg.data_dir, cfg.max_length, cfg.limit, cfg.task)
    teacher = prepare_teacher(teacher_path, cfg, dcfg, results_dir, data, loaded, resume=bool(resume))
    for seed in seeds:
        yield distill(dataclasses.replace(cfg, seed=seed), dcfg, teacher_path, out, results_dir, data, teacher, resume)


def score(
    checkpoint: str | Path,
    override: dict[str, Spec] | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    batch_size: int = 128,
    max_length: int = 128,
    data=None,
) -> dict[str, Any]:
    """Dev accuracy and F1 of a checkpoint, with its own approximations, ``override``'s ops replaced.

    An op that approximates a function on an interval also reports how many of its inputs fell
    outside it (``out_of_range``: they are evaluated, never clipped).
    """
    dev = resolve_device(device)
    model, meta = load_model(checkpoint)
    model.set_approx(model.approx.replace(**(override or {})))
    model.to(dev)
    tokenizer, data = data or prepare_data(meta["model"], data_dir, max_length)
    with counting(model.bert) as counter:
        metrics = evaluate(model, make_loader(data["validation"], tokenizer, batch_size), dev)
    result = {
        "checkpoint": repo_relative(checkpoint), "approx": model.approx.to_json(), "label": model.approx.label(),
        "dev": metrics, "trained": {**meta, "approx": meta["approx"].to_json()}, "device": machine(dev),
    }
    if counter.result():
        result["out_of_range"] = counter.result()
    return result


def record_score(result: dict[str, Any], results_dir: str | Path = RESULTS_DIR) -> Path:
    """A validate run's record, in ``results_dir/validate/`` (kept out of the training tables)."""
    what = f"{Path(result['checkpoint']).stem}-{Approximations.from_json(result['approx']).slug()}"
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-validate-{capped(what, 200)}"  # a name fits the file system's 255 bytes
    rec = {"name": name, "script": "validate", "command": command_line(), "code_version": code_version(), **result}
    return write_json(Path(results_dir) / "validate" / f"{name}.json", rec)
