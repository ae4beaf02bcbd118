"""The teacher's outputs on the training set, computed once and reused every epoch.

The teacher is frozen and runs in eval mode (no dropout), so its logits and hidden states
for an example are the same in every epoch: computing them once removes the teacher's
forward pass from all training steps. States are kept per example, unpadded, in float32
on the CPU, and padded again to whatever batch the example lands in.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import make_loader
from .engine import autocast_for, to_device

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


def cache_bytes(lengths: list[int], num_states: int, hidden: int, with_hidden: bool) -> int:
    """Float32 bytes the cache of a dataset with these token ``lengths`` takes."""
    per_token = num_states * hidden if with_hidden else 0
    return 4 * (sum(lengths) * per_token + 2 * len(lengths))


class TeacherCache:
    """Teacher logits (N, 2) and, optionally, hidden states per example (S, len_i, H)."""

    def __init__(self, ids: list[int], logits: torch.Tensor, hidden: list[torch.Tensor] | None, seconds: float = 0.0):
        self.row = {int(i): r for r, i in enumerate(ids)}  # example idx -> row in the cache
        self.logits, self.hidden, self.seconds = logits, hidden, seconds

    @property
    def nbytes(self) -> int:
        return self.logits.nbytes + sum(h.nbytes for h in self.hidden or [])

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, dataset, tokenizer, device: torch.device, batch_size: int, with_hidden: bool) -> "TeacherCache":
        """Run ``teacher`` once over ``dataset`` (needs the ``idx`` column)."""
        start = time.perf_counter()
        teacher.eval().to(device)
        ids, logits, hidden = [], [], [] if with_hidden else None
        loader = make_loader(dataset.sort("length") if "length" in dataset.column_names else dataset, tokenizer, batch_size)
        for batch in tqdm(loader, desc="teacher outputs", leave=False, dynamic_ncols=True):
            batch = to_device(batch, device)
            with autocast_for(device):
                out = teacher(**batch, hidden_states=with_hidden)
            lg, hs = out if with_hidden else (out, None)
            ids += batch["idx"].tolist()
            logits.append(lg.float().cpu())
            if with_hidden:
                states = torch.stack(hs, 1).float().cpu()  # (B, S, T, H)
                for b, n in enumerate(batch["attention_mask"].sum(1).tolist()):
                    hidden.append(states[b, :, :n].clone())  # unpadded: (S, n, H)
        return cls(ids, torch.cat(logits), hidden, time.perf_counter() - start)

    def lookup(self, idx: torch.Tensor, seq_len: int, device: torch.device):
        """Teacher logits (B, 2) and hidden states (tuple of S tensors (B, seq_len, H)) for a batch."""
        rows = [self.row[i] for i in idx.tolist()]
        logits = self.logits[rows].to(device, non_blocking=True)
        if self.hidden is None:
            return logits, None
        first = self.hidden[rows[0]]
        states = first.new_zeros(first.shape[0], len(rows), seq_len, first.shape[-1])  # (S, B, T, H)
        for b, r in enumerate(rows):
            h = self.hidden[r]
            states[:, b, : h.shape[1]] = h
        return logits, tuple(states.to(device, non_blocking=True).unbind(0))


def maybe_build(teacher: nn.Module, dataset, tokenizer, device: torch.device, batch_size: int, with_hidden: bool) -> TeacherCache | None:
    """A cache when it fits in ``MEMORY_SHARE`` of the available memory, else None (live teacher)."""
    cfg = teacher.bert.config
    need = cache_bytes(dataset["length"], cfg.num_hidden_layers + 1, cfg.hidden_size, with_hidden)
    free = available_memory()
    if free is not None and need > MEMORY_SHARE * free:
        log.warning("teacher cache needs %.1f GB, %.1f GB available: running the teacher live each step", need / 1e9, free / 1e9)
        return None
    cache = TeacherCache.build(teacher, dataset, tokenizer, device, batch_size, with_hidden)
    log.info("teacher outputs cached: %.2f GB in %.1f s", cache.nbytes / 1e9, cache.seconds)
    return cache
