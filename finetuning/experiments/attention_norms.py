"""Norm-based attention analysis (Kobayashi et al., EMNLP 2020) of checkpoints against their teacher.

Per layer and head: the share of each query row that goes to [CLS], [SEP] and the other tokens,
by attention weight (CGF rows taken as shares of their own total) and by the norm of the weighted
transformed vectors ``||alpha_ij f(x_j)||`` (``cgf_bert.analysis.norms``), over MRPC dev. A table
per checkpoint (head means per layer), heatmaps per head, one JSON record in results/analysis/.

    cd finetuning
    python -m experiments.attention_norms STUDENT.pt --teacher ../checkpoints_teacher/teacher.pt
"""

import time
from pathlib import Path

import numpy as np
from cgf_bert.analysis.norms import KINDS, norm_shares
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, run_main
from cgf_bert.config import TEACHER_PATH, TrainConfig
from cgf_bert.data.loader import make_loader
from cgf_bert.report.plots import pyplot, save
from cgf_bert.store.checkpoint import load_model, read_checkpoint
from cgf_bert.store.provenance import (
    RESULTS_DIR,
    code_version,
    command_line,
    repo_relative,
)
from cgf_bert.store.records import write_json
from cgf_bert.train.engine import resolve_device
from cgf_bert.train.run import prepare_data


def plot(results: dict[str, dict], path: str) -> Path:
    """Per model: heatmaps (layer x head) of the share to [CLS] and to [SEP], by weight and by norm."""
    plt = pyplot()
    names = list(results)
    fig, axes = plt.subplots(len(names), 4, figsize=(13, 2.6 * len(names)), squeeze=False, layout="constrained")
    top = max(float(np.max(np.asarray(res[w])[:, :, :2])) for res in results.values() for w in ("weight", "norm"))
    for r, name in enumerate(names):
        for c, (what, kind) in enumerate([(w, k) for k in ("cls", "sep") for w in ("weight", "norm")]):
            m = np.asarray(results[name][what])[:, :, KINDS.index(kind)]
            im = axes[r][c].imshow(m, vmin=0, vmax=top, cmap="viridis", aspect="auto")
            axes[r][c].set_title(f"{name[:22]}: [{kind.upper()}] by {what}", fontsize=8)
            axes[r][c].set_xticks(range(m.shape[1]))
            axes[r][c].set_xlabel("head", fontsize=7)
            axes[r][c].set_ylabel("layer", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean share of a query row")
    return save(fig, path)


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="students (or any checkpoints) to compare with the teacher")
    p.add_argument("--teacher", default=TEACHER_PATH, help="the exact checkpoint (default: %(default)s)")
    add_config_args(p, TrainConfig, only=("device", "data_dir", "eval_batch_size", "max_length", "limit"))
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record and plot go to RESULTS_DIR/analysis/ (default: %(default)s)")
    args = p.parse_args()
    cfg = config_from_args(TrainConfig, args)
    paths = [args.teacher, *args.checkpoints]
    metas = {path: read_checkpoint(path)[1] for path in paths}  # every file checked before any work
    device = resolve_device(cfg.device)
    tokenizer, data = prepare_data(metas[args.teacher]["model"], cfg.data_dir, cfg.max_length, cfg.limit)
    loader = make_loader(data["validation"], tokenizer, cfg.eval_batch_size)
    started, results = time.time(), {}
    for path in paths:
        model, _ = load_model(path)
        shares = norm_shares(model, loader, device, tokenizer.cls_token_id, tokenizer.sep_token_id)
        name = "teacher" if path == args.teacher else f"{len(results)}: {model.approx.label()}"
        results[name] = {"checkpoint": repo_relative(path), "label": model.approx.label(),
                         **{what: s.tolist() for what, s in shares.items()}}
        print(f"\n{name} ({model.approx.label()}): mean share of a query row over heads, by weight | by norm")
        print(f"  {'layer':>5} " + " ".join(f"{k:>7}" for k in KINDS) + " | " + " ".join(f"{k:>7}" for k in KINDS))
        for layer in range(shares["weight"].shape[0]):
            w, n = shares["weight"][layer].mean(0), shares["norm"][layer].mean(0)
            print(f"  {layer:>5} " + " ".join(f"{v:7.3f}" for v in w.tolist()) + " | " + " ".join(f"{v:7.3f}" for v in n.tolist()))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = plot(results, f"{args.results_dir}/analysis/attention_norms-{stamp}.png")
    out = {"command": command_line(), "code_version": code_version(), "examples": len(data["validation"]), "kinds": KINDS,
           "wall_seconds": round(time.time() - started, 1), "results": results, "plot": repo_relative(png)}
    print(f"plot: {png}\nsaved {write_json(Path(args.results_dir) / 'analysis' / f'attention_norms-{stamp}.json', out)}")


if __name__ == "__main__":
    run_main(main)
