"""How linear is each layer, and do the layers commute? Per layer and per block (attention,
feed-forward) of each checkpoint: a ridge linear map fitted on MRPC train tokens and its relative
residual on dev tokens, and dev accuracy with the block replaced by its map, the layer removed,
adjacent layers swapped and the layers shuffled (no training). After "Of Non-Linearity and
Commutativity in BERT" (Zhao et al., 2021); see cgf_bert/analysis/probes.py for the definitions.
One JSON record and two PNGs (all checkpoints side by side) in results/probes/.

    cd finetuning
    python -m experiments.layer_probes --checkpoint ../checkpoints_teacher/teacher.pt \\
        --checkpoint ../checkpoints/student_kd_s42.pt --limit-train 1000
"""

import time
from pathlib import Path

from cgf_bert import CgfBertError
from cgf_bert.analysis.probes import BLOCKS, ProbeConfig, plot_accuracy, plot_nonlinearity, probe, random_subset
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, run_main
from cgf_bert.data.loader import make_loader
from cgf_bert.store.checkpoint import load_model
from cgf_bert.store.provenance import REPO_ROOT, RESULTS_DIR, code_version, command_line, machine, repo_relative, uncommitted_files
from cgf_bert.store.records import config_json, write_json
from cgf_bert.train.engine import resolve_device
from cgf_bert.train.run import prepare_data

OUT_DIR = RESULTS_DIR / "probes"  # records and plots of this module and of kernel_view


def print_table(entry: dict) -> None:
    p = entry["probes"]
    acc = {(r["probe"], r.get("block"), r.get("layer")): r["accuracy"] for r in p["variants"]}
    print(f"\n{entry['checkpoint']} ({entry['softmax']}): dev accuracy {p['baseline']['accuracy'] * 100:.2f}")
    print(f"{'layer':>5} " + " ".join(f"{'nl ' + b:>12}" for b in BLOCKS) + " " + " ".join(f"{'acc ' + b:>12}" for b in BLOCKS) + f" {'removed':>8}")
    for row in p["layers"]:
        i = row["layer"]
        nl = " ".join(f"{row['nonlinearity'][b]['linear']:12.4f}" for b in BLOCKS)
        ac = " ".join(f"{acc[('replace', b, i)] * 100:12.2f}" for b in BLOCKS)
        print(f"{i:>5} {nl} {ac} {acc[('remove', None, i)] * 100:8.2f}")
    for r in p["variants"]:
        if r["probe"] in ("swap", "shuffle"):
            print(f"  {r['probe']} {r.get('layers') or r.get('order')}: {r['accuracy'] * 100:.2f} (agreement {r['agreement'] * 100:.1f} %)")


def replot(record: dict, path) -> Path:
    """Both figures of a layer_probes record, at the paths it names (``path``, the one replot would
    pick for a single figure, is not used); the accuracy figure's path is returned."""
    entries, figures = record["checkpoints"], record["figures"]
    plot_nonlinearity(entries, REPO_ROOT / figures["nonlinearity"])
    return plot_accuracy(entries, REPO_ROOT / figures["accuracy"])


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                   help="a checkpoint to probe; repeatable, all plotted side by side")
    add_config_args(p, ProbeConfig)
    p.add_argument("--out-dir", default=str(OUT_DIR), help="where the JSON record and the PNGs go (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(ProbeConfig, args)
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.time()
    device = resolve_device(cfg.device)
    models = [(path, *load_model(path)) for path in args.checkpoint]  # every checkpoint read before any long work
    bases = {meta["model"] for _, _, meta in models}
    if len(bases) != 1:
        raise CgfBertError(f"the checkpoints come from different base models {sorted(bases)}: one tokenizer and data set needed")
    tokenizer, data = prepare_data(bases.pop(), cfg.data_dir, cfg.max_length)
    train = random_subset(data["train"], cfg.limit_train, cfg.seed)
    dev = random_subset(data["validation"], cfg.limit_dev, cfg.seed)
    train_loader, dev_loader = make_loader(train, tokenizer, cfg.batch_size), make_loader(dev, tokenizer, cfg.batch_size)
    entries = []
    for path, model, meta in models:
        t = time.time()
        result = probe(model, train_loader, dev_loader, device, cfg.ridge, cfg.shuffles, cfg.seed, desc=Path(path).name)
        entries.append({"checkpoint": repo_relative(path), "name": Path(path).stem, "softmax": meta["approx"].label(),
                        "trained": {k: meta.get(k) for k in ("model", "seed", "epoch", "dev", "code_version")},
                        "seconds": round(time.time() - t, 1), "probes": result})
        print_table(entries[-1])
    stem = Path(args.out_dir) / f"layer_probes-{time.strftime('%Y%m%d-%H%M%S')}"
    figures = {"nonlinearity": repo_relative(plot_nonlinearity(entries, f"{stem}-nonlinearity.png")),
               "accuracy": repo_relative(plot_accuracy(entries, f"{stem}-accuracy.png"))}
    record = {
        "command": command_line(), "code_version": code_version(), "uncommitted_files": uncommitted_files(),
        "started": started, "wall_seconds": round(time.time() - t0, 1), "device": machine(device),
        "settings": config_json(cfg),
        "data": {"train_examples": len(train), "dev_examples": len(dev), "subsets": "seeded random (ProbeConfig.seed), no stratification"},
        "definitions": {
            "blocks": "layer: h_i -> h_{i+1}; attention: h_i -> a_i (self-attention, projection, residual, LayerNorm); "
                      "ffn: a_i -> h_{i+1} (intermediate, GELU, projection, residual, LayerNorm)",
            "linear_map": "ridge least squares Y ~ XW + b on valid train tokens; bias unpenalised; lambda = ridge * tr(C_xx)/d "
                          "on the per-token centred covariance (ridge_lambda per block)",
            "nonlinearity": "||Y - XW - b||^2 / ||Y - mean(Y)||^2 on valid dev tokens (1 - R^2, pooled over output dims); "
                            "identity: the same with XW + b replaced by X",
            "accuracy": "dev accuracy with no training; agreement: share of dev predictions equal to the unchanged model's",
        },
        "checkpoints": entries, "figures": figures,
    }
    print(f"\n{record['wall_seconds']:.0f} s; saved {write_json(f'{stem}.json', record)} and its two PNGs")


if __name__ == "__main__":
    run_main(main)
