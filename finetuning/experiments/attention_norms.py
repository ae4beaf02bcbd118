"""Norm-based attention analysis (Kobayashi et al., EMNLP 2020) of checkpoints against their teacher.

Per layer and head: the share of each query row that goes to [CLS], [SEP] and the other tokens,
by attention weight (CGF rows taken as shares of their own total) and by the norm of the weighted
transformed vectors ``||alpha_ij f(x_j)||`` (``cgf_bert.analysis.norms``), over MRPC dev. A table
per checkpoint (head means per layer), heatmaps per head, one JSON record in results/analysis/.

    cd finetuning
    python -m experiments.attention_norms STUDENT.pt --teacher ../checkpoints_teacher/teacher.pt
"""

import textwrap
import time
from pathlib import Path

import numpy as np
from cgf_bert import CgfBertError
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


PANELS = [(w, k) for k in ("cls", "sep") for w in ("weight", "norm")]  # the figure's columns


def short_names(names: list[str]) -> list[str]:
    """Distinct row labels: 'teacher', 'model 1', ... (``main`` numbers the checkpoints 'N: label')."""
    return [n if ":" not in n else f"model {n.split(':', 1)[0]}" for n in names]


def plot(results: dict[str, dict], path: str) -> Path:
    """Per model (a row, its full label in the key below): heatmaps (layer x head) of the share to
    [CLS] and to [SEP], by weight and by norm; one colour scale per column, since the shares to
    [SEP] are a fraction of those to [CLS] and would all be dark on a shared one."""
    plt = pyplot()
    names = list(results)
    rows = short_names(names)
    fig, axes = plt.subplots(len(names), 4, figsize=(14, 2.4 * len(names) + 2.2), squeeze=False, layout="constrained")
    for c, (what, kind) in enumerate(PANELS):
        ms = [np.asarray(results[n][what])[:, :, KINDS.index(kind)] for n in names]
        top = max(float(m.max()) for m in ms)
        for r, m in enumerate(ms):
            ax = axes[r][c]
            im = ax.imshow(m, vmin=0, vmax=top, cmap="viridis", aspect="auto")
            ax.set_title(f"{rows[r]}: [{kind.upper()}] by {what}", fontsize=10)
            ax.set_xticks(range(0, m.shape[1], 2))
            ax.tick_params(labelsize=8)
            ax.set_ylabel("layer", fontsize=9)
        axes[-1][c].set_xlabel("head", fontsize=9)
        fig.colorbar(im, ax=axes[:, c], location="bottom", shrink=0.9, aspect=30).set_label(f"share to [{kind.upper()}] by {what}", fontsize=9)
    key = [textwrap.fill(f"{row}: {results[n].get('label', n)}", 190, subsequent_indent="    ") for row, n in zip(rows, names)]
    fig.supxlabel("\n".join(key), fontsize=8, x=0.01, ha="left")
    fig.suptitle("Mean share of a query row, per layer and head (MRPC dev)", fontsize=11)
    return save(fig, path)


def replot(record: dict, path: str) -> Path:
    """The figure of an attention_norms record, at ``path``; its share kinds must be this code's."""
    if record["kinds"] != list(KINDS):
        raise CgfBertError(f"the record's share kinds {record['kinds']} are not this code's {list(KINDS)}")
    return plot(record["results"], path)


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
