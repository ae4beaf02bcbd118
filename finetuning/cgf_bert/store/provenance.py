"""Provenance of a result: the code version, the machine, the command, and paths relative to the repository."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from cgf_bert import __version__

REPO_ROOT = Path(__file__).resolve().parents[3]


RESULTS_DIR = REPO_ROOT / "results"  # committed; checkpoints are not


def code_version() -> str:
    """``git describe`` of the code that ran (``-dirty`` if uncommitted changes), else the package version.
    Read when this module is imported (``_AT_IMPORT``): a run of hours records the code it started
    with, not whatever the tree holds when it saves."""
    return _AT_IMPORT[0]


def uncommitted_files() -> list[str]:
    """Tracked files that differed from the commit in ``code_version`` when the code was imported (what '-dirty' means)."""
    return list(_AT_IMPORT[1])


def _describe() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"v{__version__}"


def _changed() -> tuple[str, ...]:
    try:
        out = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
        return tuple(out.stdout.split())
    except (OSError, subprocess.SubprocessError):
        return ()


_AT_IMPORT = (_describe(), _changed())


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


