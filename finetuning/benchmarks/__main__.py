"""Benchmarks, side by side and in one run: prints tables with ratios, writes one JSON record.

    cd finetuning
    python -m benchmarks                      # attention, trainer, steps (about 10 min on 2 CPU cores)
    python -m benchmarks --only attention     # one of them
    python -m benchmarks --full               # also whole 5-epoch fine-tunes, fp32 and bf16 (about 13 min each on 2 cores)

1. trainer:   our fit() vs the Hugging Face Trainer, examples/s on the same job
2. attention: CGF vs exact (eager, sdpa) attention in one BERT layer, fwd and fwd+bwd, B=16, L=64/128/256
3. steps:     a distillation step vs a CE step, time and peak memory (each in a fresh process)
4. precision: step time of fp32 vs bf16 autocast training, same examples, same batches
5. full:      wall time of a 5-epoch fine-tune with the default recipe, per precision the device runs natively (--full)
Figures taken on a GPU say so in the record's ``device`` field.
"""

from __future__ import annotations

import time

from cgf_bert.cli import ArgumentParser, number, run_main
from cgf_bert.config import DEFAULT_MODEL, TrainConfig
from cgf_bert.report.tables import markdown_table
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, machine, uncommitted_files
from cgf_bert.store.records import write_json
from cgf_bert.train.engine import resolve_device
from cgf_bert.train.precision import PRECISIONS, native_bf16
from cgf_bert.train.recipes import finetune
from cgf_bert.train.run import prepare_data

from . import attention, precision, steps, trainer

BENCHES = ("trainer", "attention", "steps", "precision")
# The columns of each benchmark's table, in order; written into the record so that summary.md's
# tables render from the record alone.
COLUMNS = {
    "trainer": ["runner", "examples", "examples_per_s", "ours_vs_this"],
    "attention": ["length", "variant", "fwd_ms", "fwd_bwd_ms", "fwd_vs_sdpa", "fwd_bwd_vs_sdpa"],
    "steps": ["mode", "ms_per_step", "examples_per_s", "step_vs_ce", "peak_memory_mb", "memory_vs_ce", "teacher_cache_seconds"],
    "precision": ["precision", "native", "ms_per_step", "examples_per_s", "speedup_vs_fp32"],
    "full": ["precision", "wall_minutes", "best_epoch", "dev_accuracy", "record"],
}


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES), help="benchmarks to run (default: all)")
    p.add_argument("--full", action="store_true", help="also time full 5-epoch fine-tunes (default recipe, seed 42), fp32 and, where native, bf16")
    p.add_argument("--compile", action="store_true", help="steps: also time the CE step under torch.compile")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base BERT (default: %(default)s)")
    p.add_argument("--data-dir", help="MRPC TSV folder (default as in the step scripts)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--lengths", type=number(int, "lengths", min=2, max=512), nargs="+", default=[64, 128, 256], help="attention sequence lengths, 2 to 512 (BERT's positions) (default: %(default)s)")
    p.add_argument("--examples", type=number(int, "examples", min=2), default=1600, help="training examples for trainer (steps and precision use half) (default: %(default)s)")
    p.add_argument("--min-run-time", type=number(float, "min-run-time", above=0.0), default=1.0, help="seconds per attention timing (default: %(default)s)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR / "benchmarks"), help="where the record goes (default: %(default)s)")
    a = p.parse_args()
    device = resolve_device(a.device)
    record = {"command": command_line(), "device": machine(device), "code_version": code_version(),
              "uncommitted_files": uncommitted_files(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": a.model}
    if {"trainer", "precision"} & set(a.only):
        tokenizer, data = prepare_data(a.model, a.data_dir, 128)
    if "trainer" in a.only:
        record["trainer"] = trainer.run(a.model, data, tokenizer, device, a.examples)
    if "attention" in a.only:
        record["attention"] = attention.run(a.model, device, a.lengths, min_run_time=a.min_run_time)
    if "steps" in a.only:
        record["steps"] = steps.run(a.model, device, a.examples // 2, data_dir=a.data_dir, compiled=a.compile)
    if "precision" in a.only:
        record["precision"] = precision.run(a.model, data, tokenizer, device, a.examples // 2)
    if a.full:
        record["full"] = [full_run(a, prec) for prec in PRECISIONS if PRECISIONS[prec] is None or native_bf16(device)]
    record["columns"] = {k: v for k, v in COLUMNS.items() if k in record}
    path = write_json(f"{a.results_dir}/bench-{time.strftime('%Y%m%d-%H%M%S')}.json", record)
    print(f"device: {record['device']}  code: {record['code_version']}")
    for name in (*BENCHES, "full"):
        if name in record:
            print(f"\n## {name}\n\n{markdown_table(record[name], COLUMNS[name])}")
    print(f"\nrecord: {path}")


def full_run(a, prec: str) -> dict:
    """A 5-epoch fine-tune with the default recipe at ``prec``: its wall time and dev accuracy."""
    rec = finetune(TrainConfig(model=a.model, data_dir=a.data_dir, device=a.device, precision=prec), results_dir=a.results_dir)
    return {"precision": prec, "wall_minutes": rec["wall_seconds"] / 60, "best_epoch": rec["best_epoch"],
            "dev_accuracy": rec["best"]["accuracy"], "record": rec["name"]}


if __name__ == "__main__":
    run_main(main)
