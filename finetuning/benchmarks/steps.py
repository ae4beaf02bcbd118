"""A distillation step vs a CE step: time per step and peak memory, each mode in its own process.

Modes (all train a CGF c=0.5 student with ``fit``, on the same length-grouped batches):
``ce`` (cross-entropy only), ``kd`` (teacher run live on each batch: CE + logit KD + beta=10
hidden MSE), ``kd-cached`` (the same loss with the teacher's outputs computed once, as
``distill.py`` does by default; the one-off cost of computing them is reported apart), and
with ``--compile`` also ``ce-compiled`` (the CE step under ``torch.compile``; the timing
skips the first steps, which wait for compilation).
Peak memory is the process's peak resident set (CPU) or peak allocated CUDA memory, and
each mode runs in a fresh process so one mode's peak can't hide another's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.cli import ArgumentParser, number
from cgf_bert.model.bert import build_model
from cgf_bert.objective import kd_preset, needs
from cgf_bert.train.engine import ce_step, freeze_embeddings, resolve_device, set_seed
from cgf_bert.train.losses import make_kd_step
from cgf_bert.train.run import prepare_data
from cgf_bert.train.teacher_cache import TeacherCache

from .common import peak_rss_bytes, reset_peak_rss, rss_bytes
from .trainer import timed_fit

MODES = ("ce", "kd", "kd-cached")
COMPILED = "ce-compiled"  # the CE step with torch.compile (``python -m benchmarks --compile``)


def measure(mode: str, model: str, examples: int, batch_size: int, device: torch.device, data_dir: str | None = None) -> dict:
    """Run one mode in this process; seconds per step, examples/s and memory."""
    tokenizer, data = prepare_data(model, data_dir, 128)
    train = data["train"].shuffle(seed=0).select(range(min(examples, len(data["train"]))))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    base = rss_bytes()
    set_seed(42)
    student = build_model(model, Approximations(softmax=softmax_spec("cgf", coeff=0.5)))
    freeze_embeddings(student)
    cache_seconds = None
    if mode in ("ce", COMPILED):
        step = ce_step
        if mode == COMPILED:
            student.compile(dynamic=True)
    else:
        teacher = build_model(model).to(device).eval().requires_grad_(False)
        terms = kd_preset(0.5, 2.0, 10.0)
        cache = None
        if mode == "kd-cached":
            cache = TeacherCache.build(teacher, train, tokenizer, device, 128, needs(terms))
            cache_seconds = cache.seconds
        step = make_kd_step(teacher, terms, cache)
    eps = timed_fit(student, step, train, tokenizer, device, batch_size, group_by_length=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes() - base
    return {"mode": mode, "examples_per_s": eps, "ms_per_step": 1e3 * batch_size / eps, "peak_memory_mb": peak / 2**20,
            "memory_kind": "peak CUDA allocated" if device.type == "cuda" else "peak RSS above the process with data loaded",
            "teacher_cache_seconds": cache_seconds}


def run(model: str, device: torch.device, examples: int = 800, batch_size: int = 16, data_dir: str | None = None,
        compiled: bool = False) -> list[dict]:
    """Each mode in a fresh subprocess; ratios against the CE step."""
    rows = []
    for mode in MODES + ((COMPILED,) if compiled else ()):
        cmd = [sys.executable, "-m", "benchmarks.steps", "--mode", mode, "--model", model, "--examples", str(examples),
               "--batch-size", str(batch_size), "--device", str(device)] + (["--data-dir", str(data_dir)] if data_dir else [])
        p = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"benchmark step mode {mode} failed:\n{p.stderr[-2000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    ce = rows[0]
    for r in rows:
        r["step_vs_ce"] = r["ms_per_step"] / ce["ms_per_step"]
        r["memory_vs_ce"] = r["peak_memory_mb"] / ce["peak_memory_mb"]
    return rows


if __name__ == "__main__":
    p = ArgumentParser(description="one mode of the step benchmark (run by benchmarks/__main__)")
    p.add_argument("--mode", choices=MODES + (COMPILED,), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--examples", type=number(int, "examples", min=1), default=800)
    p.add_argument("--batch-size", type=number(int, "batch-size", min=1), default=16)
    p.add_argument("--device")
    p.add_argument("--data-dir")
    a = p.parse_args()
    print(json.dumps(measure(a.mode, a.model, a.examples, a.batch_size, resolve_device(a.device), a.data_dir)))
