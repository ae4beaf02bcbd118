"""Does fine-tuning each checkpoint stay in the kernel regime? The empirical NTK of the logit
difference z1 - z0 w.r.t. the trainable parameters (embeddings frozen) at each checkpoint's
weights, on k-shot MRPC train subsets (k small and large per class, seeded, the small subset
nested in the large one) against dev: SGD and SignGD kernels, three kernel solvers, and a real
fine-tune on the same subset beside them; between the first two checkpoints, the CKA of their
kernels. After Malladi et al. (2023); see cgf_bert/analysis/kernel.py for the definitions and the
chunking. One JSON record, a PNG and the kernel blocks (.npz, float32) in results/probes/.

    cd finetuning
    python -m experiments.kernel_view --checkpoint ../checkpoints_teacher/teacher.pt \\
        --checkpoint ../checkpoints/student_kd_s42.pt --limit-dev 64
    # or one checkpoint per run, the second reading the first's record and blocks (same settings):
    python -m experiments.kernel_view --checkpoint ../checkpoints_teacher/teacher.pt --limit-dev 64
    python -m experiments.kernel_view --checkpoint ../checkpoints/student_kd_s42.pt --limit-dev 64 \\
        --reuse ../results/probes/kernel_view-TEACHER_RUN.json
"""

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cgf_bert import CgfBertError
from cgf_bert.analysis.kernel import KernelConfig, compare, load_blocks, plot_kernel_vs_finetune, save_blocks, study
from cgf_bert.analysis.probes import random_subset
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, note, run_main
from cgf_bert.store.checkpoint import read_checkpoint
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, machine, repo_relative, uncommitted_files
from cgf_bert.store.records import config_json, write_json
from cgf_bert.train.engine import resolve_device
from cgf_bert.train.run import prepare_data

OUT_DIR = RESULTS_DIR / "probes"
SOLVERS = ("lstsq", "logistic", "linearised")


def print_table(entry: dict) -> None:
    print(f"\n{entry['checkpoint']} ({entry['softmax']}): unchanged dev accuracy {entry['f0_dev_accuracy'] * 100:.2f}")
    print(f"{'k':>4} {'fine-tune':>10} " + " ".join(f"{kern + ' ' + s:>17}" for kern in ("sgd", "sign") for s in SOLVERS))
    for k in sorted({r["k"] for r in entry["runs"]}):
        runs = [r for r in entry["runs"] if r["k"] == k]
        cell = lambda xs: f"{np.mean(xs) * 100:.1f}±{np.std(xs, ddof=1) * 100 if len(xs) > 1 else 0:.1f}"  # noqa: E731
        print(f"{k:>4} {cell([r['fine_tune']['accuracy'] for r in runs]):>10} "
              + " ".join(f"{cell([r['kernels'][kern][s]['accuracy'] for r in runs]):>17}" for kern in ("sgd", "sign") for s in SOLVERS))


def reused(records: list[str], settings: dict) -> tuple[list[dict], list[dict]]:
    """The entries and kernel blocks of earlier records, checked to have run with ``settings``."""
    entries, kept = [], []
    for path in records:
        rec = json.loads(Path(path).read_text())
        if rec["settings"] != settings:
            diff = sorted(k for k in settings if rec["settings"].get(k) != settings[k])
            raise CgfBertError(f"{path} ran with other settings ({', '.join(diff)}): its kernels do not compare with these")
        npz = Path(path).with_suffix(".npz")
        for entry in rec["checkpoints"]:
            if entry["checkpoint"] not in rec["blocks"]["of"]:
                raise CgfBertError(f"{path} holds no kernel blocks of {entry['checkpoint']} (itself reused)")
            entries.append({**entry, "from_record": repo_relative(path)})
            kept.append(load_blocks(npz, entry["runs"]))
    return entries, kept


def replot(record: dict, path):
    """This experiment's figure from its record (the entries it stores are what the figure reads)."""
    return plot_kernel_vs_finetune(record["checkpoints"], path)


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", action="append", required=True, metavar="CKPT", help="a checkpoint; repeatable")
    p.add_argument("--reuse", action="append", default=[], metavar="RECORD",
                   help="a kernel_view record (and its .npz blocks) whose checkpoints are taken as they are, not recomputed; "
                        "its settings must equal these; repeatable; reused checkpoints come first")
    add_config_args(p, KernelConfig)
    p.add_argument("--out-dir", default=str(OUT_DIR), help="where the JSON record and the PNG go (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(KernelConfig, args)
    if cfg.k_small > cfg.k_large:
        p.error(f"--k-small {cfg.k_small} is larger than --k-large {cfg.k_large}: the small subset is nested in the large one")
    started, t0, load0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.time(), os.getloadavg()
    device = resolve_device(cfg.device)
    bases = {read_checkpoint(path)[1]["model"] for path in args.checkpoint}  # every checkpoint read before any long work
    if len(bases) != 1:
        raise CgfBertError(f"the checkpoints come from different base models {sorted(bases)}")
    entries, kept = reused(args.reuse, config_json(cfg))
    n_reused = len(entries)
    tokenizer, data = prepare_data(bases.pop(), cfg.data_dir, cfg.max_length)
    dev = random_subset(data["validation"], cfg.limit_dev, cfg.seed)
    with tempfile.TemporaryDirectory() as workdir:  # the fine-tunes' checkpoints, thrown away
        for path in args.checkpoint:
            t = time.time()
            entry, blocks = study(path, cfg, data, tokenizer, dev, device, workdir)
            entry.update(checkpoint=repo_relative(path), name=Path(path).stem, seconds=round(time.time() - t, 1))
            entries.append(entry)
            kept.append(blocks)
            print_table(entry)
    comparison = compare(kept[0], kept[1]) if len(kept) > 1 else []
    for row in comparison:
        note(f"  seed {row['seed']} k={row['k']}: CKA sgd {row['cka_sgd']:.3f} sign {row['cka_sign']:.3f}; "
              f"dev alignment sgd {row['dev_alignment_sgd']:.3f} sign {row['dev_alignment_sign']:.3f}")
    stem = Path(args.out_dir) / f"kernel_view-{time.strftime('%Y%m%d-%H%M%S')}"
    figure = repo_relative(plot_kernel_vs_finetune(entries, f"{stem}.png"))
    blocks = repo_relative(save_blocks(f"{stem}.npz", [b for k in kept[n_reused:] for b in k["kept"]]))
    record = {
        "command": command_line(), "code_version": code_version(), "uncommitted_files": uncommitted_files(),
        "started": started, "wall_seconds": round(time.time() - t0, 1), "device": machine(device),
        "load_average": {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]},
        "settings": config_json(cfg),
        "data": {"dev_examples": len(dev), "train_pool": len(data["train"]),
                 "subsets": "per seed, k_large examples per class drawn without replacement; the k_small subset is the "
                            "first k_small of each class of that draw; dev: a seeded random subset when limited"},
        "definitions": {
            "output": "f(x) = z1(x) - z0(x), eval mode (no dropout)",
            "parameters": "every parameter with requires_grad after freezing the embeddings (encoder, pooler, classifier)",
            "kernels": "sgd: <grad f(x), grad f(x')>; sign: <grad f(x), sign grad f(x')>, x' the training example",
            "memory": "gradients of row_chunk training rows held at once; every other example's gradient recomputed once "
                      "per row chunk; products over parameter slabs summed in float64 (exact)",
            "solvers": "kernels divided by the train block's operator norm; lstsq: (K + ridge I)^-1 y with y = +-1; "
                       "logistic: kernel rows as features + intercept, L2 ridge/2 |alpha|^2, Newton; linearised: the same "
                       "with the checkpoint's f0 as an offset (f0 + K alpha + b)",
            "fine_tune": "from the checkpoint, embeddings frozen, AdamW at lr with linear decay to 0 and no warmup, "
                         "ft_epochs epochs of ft_batch_size, grad clipping 1.0, dropout on; accuracy of the final weights",
            "agreement_with_fine_tune": "share of dev examples whose predicted class equals the fine-tune's",
            "delta_correlation": "Pearson correlation over dev of the fine-tune's logit change f_ft - f0 and the linearised "
                                 "solver's K alpha + b",
            "comparison": "per subset: CKA of the two checkpoints' train Gram blocks, uncentred alignment of their dev x train blocks",
        },
        "checkpoints": entries, "comparison": comparison, "figure": figure,
        "blocks": {"file": blocks, "of": [e["checkpoint"] for e in entries[n_reused:]]},
    }
    print(f"\n{record['wall_seconds']:.0f} s; saved {write_json(f'{stem}.json', record)} and {figure}")


if __name__ == "__main__":
    run_main(main)
