"""Data-parallel training over the processes ``torchrun`` starts (DistributedDataParallel).

Every process builds the same loader (same seed, same length-grouped order) and draws the same
global batch; each keeps its contiguous share of the batch's rows. Slicing the padded global
batch keeps every example's padding as in a one-process run, so N processes compute the
one-process step up to float summation order. Each process weighs its loss by its share of
the batch's examples (``n_r * N / n``) before DDP averages the gradients over the N
processes: the sum is then the gradient of the global batch mean, also for the last,
smaller batch of an epoch. A process whose share is empty (a last batch with fewer examples
than processes) runs one row of the batch with weight 0, since every process must join
each gradient exchange.

Evaluation, checkpoints, metrics and records are rank 0's; rank 0 broadcasts what the others
need (dev metrics, the record). Outside ``torchrun`` (``WORLD_SIZE`` unset) all of this is a
no-op and the run is the plain one-process run.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cgf_bert import CgfBertError

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # device type -> process-group backend


@dataclass(frozen=True)
class Dist:
    """This process's place among ``world`` processes (rank 0 is the main one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The process's rank and world size as torchrun sets them (one process when unset)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    """Whether this process prints and writes (rank 0, or the only process)."""
    return from_env().main


def setup(device: torch.device) -> Dist:
    """Join the process group once (gloo on CPU, nccl on CUDA); the one-process run joins nothing."""
    d = from_env()
    if d.world > 1 and not dist.is_initialized():
        if device.type not in BACKENDS:
            raise CgfBertError(f"data-parallel training runs on {sorted(BACKENDS)}, not {device.type}")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # object collectives (broadcast of metrics, records) use the current GPU
        dist.init_process_group(BACKENDS[device.type], device_id=device if device.type == "cuda" else None)
        atexit.register(dist.destroy_process_group)
    return d


def per_process_batch(batch_size: int, d: Dist) -> int:
    """The batch each process trains on: the global ``batch_size`` split evenly, or a clear error."""
    if batch_size % d.world:
        raise CgfBertError(f"--batch-size {batch_size} is the global batch and must divide evenly over the {d.world} "
                           f"processes; use a multiple of {d.world} or another --nproc-per-node")
    return batch_size // d.world


def shard(batch: dict[str, torch.Tensor], d: Dist) -> tuple[dict[str, torch.Tensor], float]:
    """This process's contiguous rows of a global batch, and the weight of its loss (``n_r * N / n``)."""
    if d.world == 1:
        return batch, 1.0
    n = len(batch["input_ids"])
    start, stop = d.rank * n // d.world, (d.rank + 1) * n // d.world  # sizes differ by at most one
    weight = (stop - start) * d.world / n
    if stop == start:  # an empty share (start < n) still joins the gradient exchange, with weight 0
        stop = start + 1
    return {k: v[start:stop] for k, v in batch.items()}, weight


def global_values(values: dict[str, float | torch.Tensor], weight: float, d: Dist) -> dict[str, float]:
    """The global batch's loss and terms from each process's (weighted by its share): what one process would log."""
    if d.world == 1:
        return {k: float(v) for k, v in values.items()}
    t = torch.tensor([float(v) * weight / d.world for v in values.values()], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def wrap(model: nn.Module, device: torch.device, d: Dist) -> nn.Module:
    """``model`` under DDP when there are several processes (buffers are constant in BERT: not broadcast)."""
    if d.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every process."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, d: Dist) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
