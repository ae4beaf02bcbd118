"""Loss-landscape curvature of checkpoints (after PyHessian and "Understanding and Improving Knowledge
Distillation for QAT of Transformer Encoders"): the top Hessian eigenvalues (power iteration), the
trace (Hutchinson) and the eigenvalue density (stochastic Lanczos quadrature) of the cross-entropy
on a fixed sample of MRPC train examples, over the parameters a run trains (every one but the
frozen embeddings; ``--include-embeddings`` adds them). The same loss (CE, eval mode, no dropout)
for every model, so teacher, CE-trained CGF model and KD student compare on one footing: does
distillation land the student in a flatter region?

    cd finetuning
    python -m experiments.hessian ../checkpoints_teacher/teacher.pt CGF_CE.pt KD_STUDENT.pt

Cost: one Hessian-vector product is a double backward over the sample (``--examples``, default
32); the defaults take at most 2 x 15 + 12 + 24 = 66 products per checkpoint. Measured here with the
defaults on the MiniLM teacher: 48 products (the power iterations stopped early), 16 s each, 12.8
minutes and 3.0 GB on one thread beside a training run (record hessian-20261203-075434). The time per
product is printed first, and the record keeps the seconds and the peak memory.
"""

import resource
import time
from pathlib import Path

import numpy as np
import torch

from cgf_bert.analysis import hessian as H
from cgf_bert.cli import (
    ArgumentParser,
    add_config_args,
    config_from_args,
    note,
    number,
    run_main,
)
from cgf_bert.config import TrainConfig
from cgf_bert.data.loader import make_loader, to_device
from cgf_bert.report.plots import pyplot, save
from cgf_bert.store.checkpoint import load_model, read_checkpoint
from cgf_bert.store.provenance import (
    RESULTS_DIR,
    code_version,
    command_line,
    machine,
    repo_relative,
)
from cgf_bert.store.records import write_json
from cgf_bert.train.engine import resolve_device
from cgf_bert.train.run import prepare_data


class Counted:
    """An HVP that counts its calls and their time (the cost the record states)."""

    def __init__(self, hvp):
        self.hvp, self.calls, self.seconds = hvp, 0, 0.0

    def __call__(self, v):
        start = time.perf_counter()
        out = self.hvp(v)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        if self.calls == 1:
            note(f"    one Hessian-vector product: {self.seconds:.1f} s")
        return out


def curvature(path: str, batches: list[dict], device, args) -> dict:
    model, _ = load_model(path)
    model = model.eval().to(device)
    params = [p for n, p in model.named_parameters() if args.include_embeddings or not n.startswith("bert.embeddings.")]
    for n, p in model.named_parameters():
        p.requires_grad_(any(p is q for q in params))

    def loss(b):
        batch = batches[b]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])["logits"]
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum") * len(batches) / args.examples

    hvp = Counted(H.loss_hvp(loss, params, batches=len(batches)))
    start = time.perf_counter()
    top, costs = H.top_eigenvalues(hvp, params, k=args.top_k, iters=args.power_iters, seed=args.seed)
    note(f"    top eigenvalues {np.round(top, 3).tolist()} ({sum(costs)} products)")
    trace, err = H.hutchinson_trace(hvp, params, samples=args.trace_samples, seed=args.seed)
    note(f"    trace {trace:.2f} +/- {err:.2f}")
    density = H.slq_density(hvp, params, steps=args.lanczos_steps, runs=args.slq_runs, seed=args.seed)
    return {"checkpoint": repo_relative(path), "label": model.approx.label(), "parameters": int(sum(p.numel() for p in params)),
            "top_eigenvalues": top, "power_iterations": costs, "trace": trace, "trace_stderr": err, "density": density,
            "hvps": hvp.calls, "seconds": round(time.perf_counter() - start, 1), "seconds_per_hvp": round(hvp.seconds / hvp.calls, 2)}


def plot(results: list[dict], path: str) -> Path:
    """The eigenvalue density per model, each model's top eigenvalue a dashed line of its colour (it
    can sit where the smoothed density is below the axis floor); the top eigenvalue and the trace
    each on their own panel, so the trace's error bars are not dwarfed."""
    plt = pyplot()
    fig, (ax, ex, tx) = plt.subplots(1, 3, figsize=(14, 4.4), layout="constrained", width_ratios=(2.2, 1, 1))
    _density(ax, results)
    x = np.arange(len(results))
    colours = [f"C{j}" for j in range(len(results))]
    ex.bar(x, [r["top_eigenvalues"][0] for r in results], 0.6, color=colours)
    ex.set_ylabel("top Hessian eigenvalue")
    ex.set_title("top eigenvalue (power iteration)", fontsize=10)
    tx.bar(x, [r["trace"] for r in results], 0.6, yerr=[2 * r["trace_stderr"] for r in results], capsize=5, color=colours)
    tx.set_ylabel("Hessian trace")
    tx.set_title("trace (Hutchinson, ±2 s.e.)", fontsize=10)
    for bx in (ex, tx):
        bx.set_xticks(x, [r["name"] for r in results], rotation=20, ha="right", fontsize=8)
        bx.margins(y=0.1)
        bx.grid(alpha=0.3, axis="y")
    fig.legend(loc="outside lower center", ncols=len(results), fontsize=8)
    return save(fig, path)


def _density(ax, results: list[dict]) -> None:
    """Each model's smoothed SLQ density on a log axis, its top eigenvalue dashed in its colour."""
    lo = min(min(q["nodes"]) for r in results for q in r["density"])
    hi = max(max(q["nodes"]) for r in results for q in r["density"])
    pad = 0.05 * (hi - lo)
    grid = torch.linspace(lo - pad, hi + pad, 2000, dtype=torch.float64)
    for j, r in enumerate(results):
        dens = H.smoothed(r["density"], grid, sigma=max((hi - lo) / 200, 1e-6))
        ax.semilogy(grid.numpy(), np.maximum(dens.numpy(), 1e-12), color=f"C{j}", label=f"{r['name']}: density")
        top = r["top_eigenvalues"][0]
        ax.axvline(top, color=f"C{j}", ls="--", lw=1, label=f"{r['name']}: top eigenvalue {top:.0f}")
    ax.set_ylim(bottom=1e-8)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.set_title("Hessian eigenvalue density, CE on a fixed train sample", fontsize=10)
    ax.grid(alpha=0.3)


def replot(record: dict, path: str) -> Path:
    """The figure of a hessian record, at ``path``."""
    return plot(record["results"], path)


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints to compare (e.g. the teacher, a CE CGF model, a KD student)")
    p.add_argument("--names", nargs="+", help="a short name per checkpoint for the plot (default: each one's label)")
    p.add_argument("--examples", type=number(int, "examples", min=1), default=32, help="MRPC train examples in the loss (default: %(default)s)")
    p.add_argument("--batch-size", type=number(int, "batch-size", min=1), default=16, help="examples per double backward (default: %(default)s)")
    p.add_argument("--top-k", type=number(int, "top-k", min=1), default=2, help="top eigenvalues (default: %(default)s)")
    p.add_argument("--power-iters", type=number(int, "power-iters", min=1), default=15, help="power iterations per eigenvalue at most (default: %(default)s)")
    p.add_argument("--trace-samples", type=number(int, "trace-samples", min=1), default=12, help="Hutchinson vectors (default: %(default)s)")
    p.add_argument("--lanczos-steps", type=number(int, "lanczos-steps", min=2), default=24, help="Lanczos steps per SLQ run (default: %(default)s)")
    p.add_argument("--slq-runs", type=number(int, "slq-runs", min=1), default=1, help="SLQ runs averaged (default: %(default)s)")
    p.add_argument("--seed", type=number(int, "seed", min=0), default=0, help="the sample's and the random vectors' seed (default: %(default)s)")
    p.add_argument("--include-embeddings", action="store_true", help="the embeddings too (frozen in the reference recipe)")
    add_config_args(p, TrainConfig, only=("device", "data_dir", "max_length"))
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record and plot go to RESULTS_DIR/analysis/ (default: %(default)s)")
    args = p.parse_args()
    if args.names and len(args.names) != len(args.checkpoints):
        p.error(f"--names: {len(args.names)} names for {len(args.checkpoints)} checkpoints")
    cfg = config_from_args(TrainConfig, args)
    metas = [read_checkpoint(c)[1] for c in args.checkpoints]  # every file checked before any work
    bases = {m.get("base_model", m["model"]) for m in metas}
    if len(bases) > 1:
        p.error(f"the checkpoints come from different base models ({', '.join(sorted(bases))}): one sample, one tokenizer")
    device = resolve_device(cfg.device)
    tokenizer, data = prepare_data(metas[0]["model"], cfg.data_dir, cfg.max_length)
    sample = data["train"].shuffle(seed=args.seed).select(range(min(args.examples, len(data["train"]))))
    args.examples = len(sample)
    batches = [to_device(b, device) for b in make_loader(sample, tokenizer, args.batch_size)]
    started, results, version = time.time(), [], code_version()  # the code that runs, not the code at the end
    for j, path in enumerate(args.checkpoints):
        note(f"{path}:")
        res = curvature(path, batches, device, args)
        res["name"] = args.names[j] if args.names else res["label"][:30]
        results.append(res)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = plot(results, f"{args.results_dir}/analysis/hessian-{stamp}.png")
    out = {"command": command_line(), "code_version": version, "machine": machine(device), "examples": args.examples,
           "loss": "cross-entropy, eval mode", "wall_seconds": round(time.time() - started, 1),
           "peak_memory_gb": round((torch.cuda.max_memory_allocated() if device.type == "cuda" else
                                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 2), "results": results, "plot": repo_relative(png)}
    for r in results:
        print(f"{r['name']}: top eigenvalue {r['top_eigenvalues'][0]:.3f}, trace {r['trace']:.1f} +/- {r['trace_stderr']:.1f}, "
              f"{r['hvps']} products, {r['seconds'] / 60:.1f} min")
    print(f"plot: {png}\nsaved {write_json(Path(args.results_dir) / 'analysis' / f'hessian-{stamp}.json', out)}")


if __name__ == "__main__":
    run_main(main)
