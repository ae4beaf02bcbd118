"""Training throughput: our ``fit()`` vs the Hugging Face ``Trainer`` on the same job.

Same pretrained weights, same examples, batch 16, AdamW lr 5e-5 with linear decay and no
warmup, gradient clipping at 1.0, frozen embeddings, one epoch, same machine. The Trainer
runs transformers' stock ``BertForSequenceClassification`` (its default attention, sdpa)
with ``DataCollatorWithPadding``, as a user would set it up; once with its defaults (random
batches) and once with ``train_sampling_strategy="group_by_length"``. Throughput is examples per second between
the first timed step and the last, so model loading and the first warm-up steps are not
counted for either side.
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import BertForSequenceClassification, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from cgf_bert import CgfBertError
from cgf_bert.data.loader import make_loader
from cgf_bert.model.bert import build_model, resolve_model
from cgf_bert.train.engine import build_optimizer, ce_step, fit, freeze_embeddings, set_seed

WARMUP_STEPS = 3  # steps before the clock starts (allocator, lazy initialisation)


class StepClock:
    """Timestamps at the start of each step; examples/s after the warm-up steps."""

    def __init__(self):
        self.times: list[float] = []

    def tick(self):
        self.times.append(time.perf_counter())

    def examples_per_second(self, batch_size: int) -> float:
        if len(self.times) < 2:
            raise CgfBertError(f"only {len(self.times)} training step(s): too few to time; use more --examples")
        t = self.times[min(WARMUP_STEPS, len(self.times) - 2) :]  # tiny smoke runs keep at least one interval
        return (len(t) - 1) * batch_size / (t[-1] - t[0])


class _TrainerClock(TrainerCallback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kw):
        self.clock.tick()


def timed_fit(model, step, train, tokenizer, device: torch.device, batch_size: int, group_by_length: bool, precision: str = "fp32") -> float:
    """One epoch of ``fit`` over ``train`` with ``step`` (reference optimiser) at ``precision``; examples/s."""
    loader = make_loader(train, tokenizer, batch_size, shuffle=True, seed=42, group_by_length=group_by_length)
    opt, sched = build_optimizer(model, 5e-5, len(loader))
    clock = StepClock()

    def timed_step(m, batch):
        clock.tick()
        return step(m, batch)

    with tempfile.TemporaryDirectory() as tmp:
        dev = make_loader(train.select(range(batch_size)), tokenizer, batch_size)  # fit evaluates each epoch
        fit(model, timed_step, loader, dev, opt, sched, epochs=1, device=device, checkpoint=f"{tmp}/b.pt", meta={}, precision=precision)
    return clock.examples_per_second(batch_size)


def ours(model: str, train, tokenizer, device: torch.device, batch_size: int, group_by_length: bool) -> float:
    set_seed(42)
    m = build_model(model)
    freeze_embeddings(m)
    return timed_fit(m, ce_step, train, tokenizer, device, batch_size, group_by_length)


def hf_trainer(model: str, train, tokenizer, device: torch.device, batch_size: int, group_by_length: bool) -> float:
    set_seed(42)
    m = BertForSequenceClassification.from_pretrained(resolve_model(model), num_labels=2)
    for p in m.bert.embeddings.parameters():
        p.requires_grad_(False)
    ds = train.remove_columns([c for c in ("idx",) if c in train.column_names])  # keeps "length" for its sampler
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch_size, learning_rate=5e-5, lr_scheduler_type="linear",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, num_train_epochs=1,
            train_sampling_strategy="group_by_length" if group_by_length else "random",
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True, seed=42,
            use_cpu=device.type == "cpu", bf16=device.type == "cuda", dataloader_pin_memory=device.type == "cuda",
        )
        Trainer(model=m, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer), callbacks=[_TrainerClock(clock)]).train()
    return clock.examples_per_second(batch_size)


def run(model: str, data, tokenizer, device: torch.device, examples: int = 1600, batch_size: int = 16) -> list[dict]:
    train = data["train"].shuffle(seed=0).select(range(min(examples, len(data["train"]))))
    rows = []
    for label, fn, grouped in [
        ("fit (ours, default: length-grouped)", ours, True),
        ("fit (ours, random batches)", ours, False),
        ("HF Trainer (default: random batches)", hf_trainer, False),
        ("HF Trainer (train_sampling_strategy=group_by_length)", hf_trainer, True),
    ]:
        rows.append({"runner": label, "examples": len(train), "examples_per_s": fn(model, train, tokenizer, device, batch_size, grouped)})
    base = rows[0]["examples_per_s"]
    for r in rows:
        r["ours_vs_this"] = base / r["examples_per_s"]
    return rows
