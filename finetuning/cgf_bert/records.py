"""Run records: one JSON per run (config, per-epoch metrics, best epoch, test predictions)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__

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
    """The command as typed from ``finetuning/``: ``finetune.py ...`` or ``-m benchmarks ...``."""
    prog = Path(sys.argv[0])
    head = ["-m", prog.parent.name] if prog.name == "__main__.py" else [prog.name]
    return shlex.join([*head, *sys.argv[1:]])


def run_name(script: str, softmax: str, coeff: float, seed: int, extra: str = "") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    soft = "exact" if softmax == "exact" else f"cgf{coeff:g}"
    return f"{stamp}-{script}-{soft}{extra}-s{seed}"


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes files private; records are for sharing
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_records(results_dir: str | Path = RESULTS_DIR) -> list[dict]:
    """Every run record (``*.json``) under ``results_dir``, oldest first."""
    paths = sorted(Path(results_dir).rglob("*.json"))
    return [json.loads(p.read_text()) | {"_path": str(p)} for p in paths]
