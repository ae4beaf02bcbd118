"""The teacher's outputs on the training set, computed once and reused every epoch.

The teacher is frozen and runs in eval mode (no dropout), so its outputs for an example are
the same in every epoch: computing them once removes the teacher's forward pass from all
training steps. The cache holds exactly what the objective's terms need (logits always;
hidden states, attention maps when asked), per example, unpadded, in float32 on the CPU, and
pads them again to whatever batch the example lands in.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from cgf_bert.data.loader import make_loader, to_device
from cgf_bert.model.bert import OUTPUTS

log = logging.getLogger(__name__)
MEMORY_SHARE = 0.5  # use at most this share of the available memory for the cache


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cache_bytes(lengths: list[int], config, needs: tuple[str, ...]) -> int:
    """Float32 bytes the cache of a dataset with these token ``lengths`` takes."""
    return 4 * sum(2 + sum(OUTPUTS[k].size(config, n) for k in needs) for n in lengths)


def _unpad(stacked: torch.Tensor, dims: tuple[int, ...], n: int) -> torch.Tensor:
    """One example's tensor cut to its ``n`` real tokens along its token ``dims``."""
    for d in dims:
        stacked = stacked.narrow(d, 0, n)
    return stacked.clone()


class TeacherCache:
    """Teacher logits (N, 2) and, per needed output, one unpadded tensor per example."""

    def __init__(self, ids: list[int], logits: torch.Tensor, outputs: dict[str, list[torch.Tensor]], seconds: float = 0.0):
        self.row = {int(i): r for r, i in enumerate(ids)}  # example idx -> row in the cache
        self.logits, self.outputs, self.seconds = logits, outputs, seconds

    @property
    def nbytes(self) -> int:
        return self.logits.nbytes + sum(t.nbytes for ts in self.outputs.values() for t in ts)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, dataset, tokenizer, device: torch.device, batch_size: int, needs: tuple[str, ...]) -> "TeacherCache":
        """Run ``teacher`` once over ``dataset`` (needs the ``idx`` column)."""
        start = time.perf_counter()
        teacher.eval().to(device)
        ids, logits, outputs = [], [], {k: [] for k in needs}
        loader = make_loader(dataset.sort("length") if "length" in dataset.column_names else dataset, tokenizer, batch_size)
        for batch in tqdm(loader, desc="teacher outputs", leave=False, dynamic_ncols=True):
            batch = to_device(batch, device)
            out = teacher(**batch, needs=needs)  # float32 whatever the training precision: these are the targets
            ids += batch["idx"].tolist()
            logits.append(out["logits"].float().cpu())
            lengths = batch["attention_mask"].sum(1).tolist()
            for k in needs:
                stacked = torch.stack(out[k], 1).float().cpu()  # (B, layers, ...) with token dims shifted by one
                for b, n in enumerate(lengths):
                    outputs[k].append(_unpad(stacked[b], OUTPUTS[k].token_dims, n))
        return cls(ids, torch.cat(logits), outputs, time.perf_counter() - start)

    def lookup(self, idx: torch.Tensor, seq_len: int, device: torch.device) -> dict:
        """The teacher's outputs for a batch, as the model's forward returns them, padded to ``seq_len``."""
        rows = [self.row[i] for i in idx.tolist()]
        out = {"logits": self.logits[rows].to(device, non_blocking=True)}
        for k, per_example in self.outputs.items():
            first = per_example[rows[0]]
            shape = [seq_len if d in OUTPUTS[k].token_dims else s for d, s in enumerate(first.shape)]
            states = first.new_zeros(shape[0], len(rows), *shape[1:])  # (layers, B, ...)
            for b, r in enumerate(rows):
                t = per_example[r]
                states[(slice(None), b, *(slice(0, s) for s in t.shape[1:]))] = t
            out[k] = tuple(states.to(device, non_blocking=True).unbind(0))
        return out


def maybe_build(teacher: nn.Module, dataset, tokenizer, device: torch.device, batch_size: int, needs: tuple[str, ...]) -> TeacherCache | None:
    """A cache when it fits in ``MEMORY_SHARE`` of the available memory, else None (live teacher)."""
    need = cache_bytes(dataset["length"], teacher.bert.config, needs)
    free = available_memory()
    if free is not None and need > MEMORY_SHARE * free:
        log.warning("teacher cache needs %.1f GB, %.1f GB available: running the teacher live each step", need / 1e9, free / 1e9)
        return None
    cache = TeacherCache.build(teacher, dataset, tokenizer, device, batch_size, needs)
    log.info("teacher outputs cached: %.2f GB in %.1f s", cache.nbytes / 1e9, cache.seconds)
    return cache
