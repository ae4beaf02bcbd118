"""Training precision: float32, or bfloat16 autocast for the encoder where the hardware runs it natively.

Under bf16 autocast the matmuls of the encoder run in bfloat16; a softmax whose kind sets
``float32_scores`` (CGF and its polynomial form) still forms its scores and its mean,
variance and exp in float32 (``attention.py``, ``softmax.py``): CGF exponentiates the
centred scores with no max subtracted, so bf16's 8-bit mantissa would cost it more than it
costs the exact softmax. The weights, the optimiser state and evaluation stay float32.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from cgf_bert import CgfBertError, config

# Precision name -> the autocast dtype of the training forward (None: plain float32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
assert tuple(PRECISIONS) == config.PRECISIONS, "every precision a config names has its dtype here"
DEFAULT = config.PRECISION  # the results table's precision; bf16 is a different recipe
# CPU flags (Linux /proc/cpuinfo) that mean bf16 arithmetic in hardware: AVX-512 BF16, AMX, Arm BF16.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where unknown (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA: Ampere or newer; CPU: one of ``NATIVE_BF16_FLAGS``)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool((cpu_flags() if flags is None else flags) & set(NATIVE_BF16_FLAGS))


def check_precision(precision: str, device: torch.device, flags: set[str] | None = None) -> str:
    """``precision`` if ``device`` runs it natively, else a clear error.

    bf16 on a CPU without bf16 instructions is refused rather than warned about: PyTorch then
    emulates it through float32 conversions, slower than float32 and less precise, so the
    run would lose on both counts for no gain.
    """
    if precision not in PRECISIONS:
        raise CgfBertError(f"unknown precision {precision!r}; choose from {sorted(PRECISIONS)}")
    if PRECISIONS[precision] is torch.bfloat16 and not native_bf16(device, flags):
        where = "this GPU" if device.type == "cuda" else "this CPU (no avx512_bf16, amx_bf16 or bf16 flag)"
        raise CgfBertError(f"--precision bf16 needs native bf16 arithmetic, which {where} lacks; use --precision fp32")
    return precision


def autocast(device: torch.device, precision: str = DEFAULT):
    """The training forward's context: bf16 autocast on ``device``, or nothing for fp32."""
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
