"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import resource
import sys
from typing import Callable

import torch
from torch.utils import benchmark


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median wall time of ``fn()`` over repeated blocks (torch.utils.benchmark; syncs CUDA)."""
    fn()  # warm up: allocator, lazy init
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def rss_bytes() -> int:
    """Current resident memory of this process (Linux), else 0."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def reset_peak_rss() -> None:
    """Restart the peak-RSS count from the current RSS (Linux ``clear_refs``; else no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory since start or ``reset_peak_rss`` (Linux VmHWM; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
