"""Step time at each training precision: fp32 vs bf16 autocast, the same job.

One CGF c=0.5 student (CE step, frozen embeddings, the reference optimiser) trained for one
pass over the same MRPC examples in the same length-grouped batches of 16, from the same
initial weights, once per precision, in this process. The first steps of each are not timed
(``trainer.WARMUP_STEPS``). bf16 is timed even where the device lacks native bf16 (PyTorch
emulates it there, and the row says so): training refuses that case, the benchmark shows why.
"""

from __future__ import annotations

import torch

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.bert import build_model
from cgf_bert.train.engine import ce_step, freeze_embeddings, set_seed
from cgf_bert.train.precision import PRECISIONS, native_bf16

from .trainer import timed_fit


def measure(model: str, train, tokenizer, device: torch.device, precision: str, batch_size: int = 16) -> dict:
    """One precision: ms per step and examples/s."""
    set_seed(42)
    student = build_model(model, Approximations(softmax=softmax_spec("cgf", coeff=0.5)))
    freeze_embeddings(student)
    eps = timed_fit(student, ce_step, train, tokenizer, device, batch_size, group_by_length=True, precision=precision)
    native = PRECISIONS[precision] is None or native_bf16(device)
    return {"precision": precision, "native": native, "examples": len(train), "ms_per_step": 1e3 * batch_size / eps, "examples_per_s": eps}


def run(model: str, data, tokenizer, device: torch.device, examples: int = 800, batch_size: int = 16) -> list[dict]:
    """Each precision on the same examples; ``speedup_vs_fp32`` is fp32's step time over this one's."""
    train = data["train"].shuffle(seed=0).select(range(min(examples, len(data["train"]))))
    rows = [measure(model, train, tokenizer, device, p, batch_size) for p in PRECISIONS]
    for r in rows:
        r["speedup_vs_fp32"] = rows[0]["ms_per_step"] / r["ms_per_step"]
    return rows
