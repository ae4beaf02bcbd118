"""Run records: one JSON per run (config, per-epoch metrics, best epoch, test predictions)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import atomic_write
from .config import EXACT, DistillConfig, TrainConfig
from .losses import LossTerm, objective_label, objective_slug
from .precision import DEFAULT as PRECISION
from .softmax import SoftmaxSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "results"  # committed; checkpoints are not


def code_version() -> str:
    """``git describe`` of the code that ran (``-dirty`` if uncommitted changes), else the package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"v{__version__}"


def uncommitted_files() -> list[str]:
    """Tracked files that differ from the commit in ``code_version`` (what '-dirty' means)."""
    try:
        out = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.split()
    except (OSError, subprocess.SubprocessError):
        return []


def cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """A one-line description of where the run happened.

    The CPU's model and vector ISA are named because they change float results: the same
    seed on an AVX2 and an AVX-512 machine drifts apart like a different thread count.
    """
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    isa = torch.backends.cpu.get_cpu_capability()
    return f"cpu: {cpu_model()} ({isa}), {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def command_line() -> str:
    """The command as typed from ``finetuning/``: ``finetune.py ...``, ``-m benchmarks ...`` or
    ``-m experiments.coeff_sweep ...``; absolute paths inside the repository made relative to it."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name.removesuffix(".__main__")] if spec is not None else [Path(sys.argv[0]).name]
    return shlex.join([*head, *(_relative_arg(a) for a in sys.argv[1:])])


def _relative_arg(arg: str) -> str:
    """An argument that is an absolute path inside the repository, as a path relative to finetuning/."""
    if not arg.startswith("/"):
        return arg
    rel = repo_relative(arg)
    return arg if rel == arg else os.path.join("..", rel)


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (records travel between machines)."""
    p = Path(os.path.abspath(path))  # not resolve(): a linked checkpoint is named where it was given
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- configs in records


def config_json(cfg) -> dict[str, Any]:
    """A TrainConfig or DistillConfig as JSON: the softmax as its spec, the objective as its terms."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.to_json() if isinstance(v, SoftmaxSpec) else [t.to_json() for t in v] if f.name == "terms" else v
    return out


def train_config(rec: dict) -> TrainConfig:
    """The TrainConfig a record ran with. A field the record predates takes its default: a field
    is added with the default that keeps the old behaviour (``compile`` came after the first
    runs, off by default; ``precision`` later, fp32 as every run before it). Records before
    specs held ``softmax`` as a name and ``coeff`` apart."""
    values = dict(rec["config"])
    values["softmax"] = SoftmaxSpec.from_json(values["softmax"], values.pop("coeff", None))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


def distill_config(rec: dict) -> DistillConfig | None:
    """The DistillConfig of a distillation record (None for a fine-tune). Records before terms
    carried parameters kept the KD temperature apart."""
    d = rec.get("distill")
    if not d:
        return None
    terms = tuple(LossTerm.from_json(t, d.get("temperature")) for t in d["terms"])
    names = {f.name for f in dataclasses.fields(DistillConfig)} - {"terms"}
    return DistillConfig(terms=terms, **{k: v for k, v in d.items() if k in names})


def method_label(dcfg: DistillConfig | None) -> str:
    """'CE', or 'KD beta=10 (pretrained init)': how a variant was trained."""
    return "CE" if dcfg is None else f"{objective_label(dcfg.terms)} ({dcfg.init} init)"


def variant_label(cfg: TrainConfig, dcfg: DistillConfig | None) -> str:
    """A results-table row: 'exact', 'cgf c=0.65 CE', 'cgf c=0.5 KD beta=10 (pretrained init)';
    a precision other than fp32 is named at the end ('exact, bf16')."""
    label = "exact" if dcfg is None and cfg.softmax == EXACT else f"{cfg.softmax.label()} {method_label(dcfg)}"
    return label if cfg.precision == PRECISION else f"{label}, {cfg.precision}"


def record_variant(rec: dict) -> str:
    return variant_label(train_config(rec), distill_config(rec))


def run_name(script: str, cfg: TrainConfig, dcfg: DistillConfig | None = None) -> str:
    """'20261125-031500-distill-cgf0.5-b10-pretrained-s42': time, script, variant, precision unless fp32, seed."""
    method = "" if dcfg is None else f"-{objective_slug(dcfg.terms)}-{dcfg.init}"
    precision = "" if cfg.precision == PRECISION else f"-{cfg.precision}"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{script}-{cfg.softmax.slug()}{method}{precision}-s{cfg.seed}"


def strict_json(obj: Any, reasons: dict[str, str] | None = None, where: str = "") -> tuple[Any, list[dict[str, str]]]:
    """``obj`` with each non-finite float replaced by None, and a note for each: where, what and
    why (the first of ``reasons``, a key-path fragment -> reason, that matches). Strict JSON
    (RFC 8259) has no nan or inf; a record says what happened instead."""
    notes: list[dict[str, str]] = []

    def walk(x, at):
        if isinstance(x, dict):
            return {k: walk(v, f"{at}.{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):
            why = next((r for key, r in (reasons or {}).items() if key in at), "not a finite number")
            notes.append({"at": at.lstrip("."), "value": str(x), "reason": why})
            return None
        return x

    return walk(obj, where), notes


def write_json(path: str | Path, obj: Any) -> Path:
    """Write strict JSON (no NaN or Infinity: RFC 8259) atomically."""
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text), binary=False)


def is_benchmark(rec: dict) -> bool:
    """Whether a record belongs to a benchmark (``results/benchmarks/``): its fine-tunes time the
    machine and stay out of the tables and of record reuse, which take the step-script runs."""
    return "benchmarks" in Path(rec.get("_path", "")).parts


def load_records(results_dir: str | Path = RESULTS_DIR) -> list[dict]:
    """Every run record (``*.json``) under ``results_dir``, oldest first."""
    paths = sorted(Path(results_dir).rglob("*.json"))
    return [json.loads(p.read_text()) | {"_path": str(p)} for p in paths]
