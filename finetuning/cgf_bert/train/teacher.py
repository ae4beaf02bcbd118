"""The exact-softmax teacher: checked, loaded once, trained once when absent, and its outputs cached."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cgf_bert import CgfBertError
from cgf_bert.config import EXACT, DistillConfig, TrainConfig
from cgf_bert.model.bert import BertMRPC, build_model
from cgf_bert.objective import needs
from cgf_bert.store.checkpoint import model_from_checkpoint, read_checkpoint
from cgf_bert.store.provenance import RESULTS_DIR
from cgf_bert.train.engine import ce_step, resolve_device, set_seed
from cgf_bert.train.run import train
from cgf_bert.train.teacher_cache import TeacherCache, maybe_build

log = logging.getLogger(__name__)


def check_teacher(meta: dict, path: str | Path, model: str) -> dict:
    """``meta`` if it is an exact-softmax teacher of base ``model``; anything else is a clear error."""
    if not meta["approx"].is_exact:
        raise CgfBertError(f"teacher {path} runs {meta['approx'].label()}; a teacher must be exact in every op and layer")
    if model not in (meta["model"], meta.get("base_model")):  # an exported teacher names its folder and its base
        raise CgfBertError(f"teacher {path} was fine-tuned from {meta.get('base_model', meta['model'])!r}, but the student base model is {model!r}")
    return meta


def load_teacher(path: str | Path, model: str) -> tuple[BertMRPC, dict]:
    """An exact-softmax teacher of base ``model`` from ``path``, the file read once."""
    state_dict, meta = read_checkpoint(path)
    check_teacher(meta, path, model)
    return model_from_checkpoint(state_dict, meta, path), meta


def ensure_teacher(path: str | Path, cfg: TrainConfig, results_dir: str | Path = RESULTS_DIR, data=None,
                   resume: bool = False) -> tuple[BertMRPC, dict]:
    """Load the teacher at ``path``, training it once with the finetune recipe when absent
    (``resume``: continuing its training from its saved state, if a kill interrupted it)."""
    path = Path(path)
    if not path.exists():
        log.warning("no teacher at %s: fine-tuning one (exact softmax, seed %d)", path, cfg.seed)
        tcfg = dataclasses.replace(cfg, approx=EXACT)
        set_seed(tcfg.seed)
        train(tcfg, build_model(tcfg.model), ce_step, script="finetune", out=path, results_dir=results_dir, data=data, resume=resume)
    return load_teacher(path, cfg.model)


def prepare_teacher(teacher_path: str | Path, cfg: TrainConfig, dcfg: DistillConfig, results_dir: str | Path, data,
                    loaded: tuple[BertMRPC, dict] | None = None, resume: bool = False) -> tuple[BertMRPC, dict, TeacherCache | None]:
    """The frozen teacher on the run's device, its metadata, and its cached outputs if asked for.

    ``loaded`` is ``load_teacher``'s result when the caller has already read the checkpoint.
    The cache holds exactly the outputs the objective's terms need.
    """
    teacher, tmeta = loaded or ensure_teacher(teacher_path, cfg, results_dir, data, resume)
    device = resolve_device(cfg.device)
    teacher.to(device).eval().requires_grad_(False)
    cache = None
    if dcfg.cache_teacher:
        tokenizer, splits = data
        cache = maybe_build(teacher, splits["train"], tokenizer, device, cfg.eval_batch_size, needs(dcfg.terms))
    return teacher, tmeta, cache
