"""The kernel view of fine-tuning, after Malladi et al., "A Kernel-Based View of Language Model
Fine-Tuning" (ICML 2023): the empirical neural tangent kernel (eNTK) of a checkpoint, kernel
solvers on k-shot subsets, and a real fine-tune on the same subsets beside them.

- **output**: the logit difference ``f(x) = z_1(x) - z_0(x)`` of the eval-mode model (no dropout),
  so one kernel serves the two classes (Malladi et al.'s binary form);
- **parameters**: those that train (``requires_grad``): with the embeddings frozen, as in the
  recipe, the encoder layers, the pooler and the classifier (10.8 M for MiniLM-L6);
- **kernels**: SGD ``K(x, x') = <∇f(x), ∇f(x')>`` and SignGD ``K(x, x') = <∇f(x), sign ∇f(x')>`` with
  ``x'`` the training example (asymmetric), from per-example gradients by
  ``torch.func.vmap(grad(f))`` over ``functional_call``;
- **memory**: one gradient is 43 MB (float32), so ``ntk`` never holds more than ``row_chunk`` of
  them: it computes the gradients of a chunk of training rows and keeps them, then streams the
  columns (every other example) in batches, recomputing each column's gradient once per row
  chunk; products are taken over parameter slabs and summed in float64, so the sign of a slab is
  all that is ever materialised besides the kept rows. Exact: every entry is a full inner product.
- **solvers** on a kernel normalised by its train block's operator norm (so one ridge fits every
  model): kernel least squares on ±1 labels, kernel logistic regression (kernel rows as features,
  L2 ridge, intercept), and the linearised model (logistic with the checkpoint's own ``f0`` as an
  offset: what fine-tuning from these weights predicts in the kernel regime).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap
from tqdm.auto import tqdm

from cgf_bert.config import flag_field as _f  # a config field with its flag's help
from cgf_bert.data.loader import to_device
from cgf_bert.model.steps import encoder_mask

log = logging.getLogger(__name__)

SLAB = 1 << 19  # parameters per product slab: a (rows, SLAB) float32 sign block is 256 MB at 128 rows

GradFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (batch, out=None) -> per-example gradients (B, P) and f (B,)


# ---------------------------------------------------------------- per-example gradients


def logit_difference(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """``z_1 - z_0`` (B,) of a batch."""
    logits = model(**batch)["logits"]
    return logits[:, 1] - logits[:, 0]


def trainable(model: torch.nn.Module) -> list[str]:
    """Names of the parameters the kernel differentiates (those with ``requires_grad``)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def gradient_fn(model: torch.nn.Module, device: torch.device) -> tuple[GradFn, int]:
    """A function from a batch to its per-example gradients of ``f = z_1 - z_0`` w.r.t. the
    trainable parameters, flattened (B, P) in ``trainable`` order, and ``f`` itself (B,); and P.

    The model runs in eval mode (dropout off). Each example is a batch of one inside ``vmap``,
    with its own padding mask made 4-D beforehand (transformers' mask builder branches on the
    mask's values, which ``vmap`` cannot trace); padding is excluded from attention, so a padded
    example's gradient is its unpadded one.
    """
    model.eval().to(device)
    names = trainable(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad} | dict(model.named_buffers())

    def f(p, input_ids, attention_mask, token_type_ids):
        one = {"input_ids": input_ids[None], "attention_mask": encoder_mask(attention_mask[None]),
               "token_type_ids": token_type_ids[None]}
        logits = functional_call(model, (p, frozen), (), one)["logits"][0]  # (2,)
        return logits[1] - logits[0]

    per_example = vmap(grad_and_value(f), in_dims=(None, 0, 0, 0))

    def grads(batch: dict, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = to_device(batch, device)
        g, value = per_example(params, b["input_ids"], b["attention_mask"], b["token_type_ids"])
        flat = [g.pop(n).reshape(len(b["input_ids"]), -1) for n in names]
        return torch.cat(flat, dim=1, out=out), value  # (B, P) (written into ``out`` when given), (B,)

    return grads, sum(p.numel() for p in params.values())


# ---------------------------------------------------------------- the kernel, in chunks


def gram(cols: torch.Tensor, rows: torch.Tensor, slab: int = SLAB) -> tuple[torch.Tensor, torch.Tensor]:
    """``<c, r>`` and ``<c, sign r>`` (C, R) for gradients ``cols`` (C, P) and ``rows`` (R, P), over
    parameter slabs, summed in float64."""
    sgd = torch.zeros(len(cols), len(rows), dtype=torch.float64)
    sign = torch.zeros_like(sgd)
    for s in range(0, cols.shape[1], slab):
        c, r = cols[:, s : s + slab], rows[:, s : s + slab]
        sgd += (c @ r.T).double()
        sign += (c @ torch.sign(r).T).double()
    return sgd, sign


@dataclass
class Kernel:
    """SGD and SignGD kernels (float64) of ``n_rows`` training rows then the other examples (rows of
    the matrices) against the training rows (columns)."""

    sgd: torch.Tensor  # (n_rows + n_cols, n_rows)
    sign: torch.Tensor  # (n_rows + n_cols, n_rows): <grad of the row example, sign grad of the column>
    f: torch.Tensor  # (n_rows + n_cols,) the output z1 - z0 at these weights, from the same passes
    n_rows: int
    gradients: int = 0  # per-example gradients computed, recomputations included


def _place(batches: list[dict], start: int) -> list[tuple[dict, int]]:
    """Each batch with the kernel row its first example goes to."""
    out = []
    for b in batches:
        out.append((b, start))
        start += len(b["input_ids"])
    return out


def _chunks(placed: list[tuple[dict, int]], size: int) -> list[list[tuple[dict, int]]]:
    """Consecutive batches grouped so that a group holds at most ``size`` examples (at least one batch)."""
    out, n = [[]], 0
    for b, at in placed:
        m = len(b["input_ids"])
        if out[-1] and n + m > size:
            out.append([])
            n = 0
        out[-1].append((b, at))
        n += m
    return out


def ntk(grads: GradFn, n_params: int, rows: list[dict], cols: list[dict], row_chunk: int, desc: str = "eNTK") -> Kernel:
    """The SGD and SignGD kernels of every example of ``rows`` then ``cols`` against ``rows``.

    The gradients of at most ``row_chunk`` rows are held at a time (``row_chunk`` >= the rows: each
    gradient is computed once); every other example's gradient is recomputed once per row chunk.
    """
    placed_rows = _place(rows, 0)
    n_rows = sum(len(b["input_ids"]) for b in rows)
    placed_cols = _place(cols, n_rows)
    n_all = n_rows + sum(len(b["input_ids"]) for b in cols)
    sgd, sign = torch.zeros(n_all, n_rows, dtype=torch.float64), torch.zeros(n_all, n_rows, dtype=torch.float64)
    f = torch.zeros(n_all, dtype=torch.float64)
    groups = _chunks(placed_rows, row_chunk)
    bar = tqdm(total=len(groups) * (len(rows) + len(cols)), desc=desc, leave=False, dynamic_ncols=True)
    count = 0
    for group in groups:
        lo = group[0][1]
        hi = group[-1][1] + len(group[-1][0]["input_ids"])
        held = torch.empty(hi - lo, n_params)  # (R, P): the kept rows, filled in place (no second copy)
        for b, at in group:
            m = len(b["input_ids"])
            _, values = grads(b, out=held[at - lo : at - lo + m])
            f[at : at + m] = values.double()
        count += len(held)
        bar.update(len(group))
        sgd[lo:hi, lo:hi], sign[lo:hi, lo:hi] = gram(held, held)
        for b, at in [p for g in groups if g is not group for p in g] + placed_cols:
            g, values = grads(b)  # (m, P), (m,)
            f[at : at + len(g)] = values.double()
            count += len(g)
            sgd[at : at + len(g), lo:hi], sign[at : at + len(g), lo:hi] = gram(g, held)
            bar.update(1)
        del held
    bar.close()
    return Kernel(sgd, sign, f, n_rows, count)


# ---------------------------------------------------------------- solvers


def normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Both blocks divided by the train block's operator norm (its largest singular value)."""
    scale = float(torch.linalg.matrix_norm(train, ord=2))
    return train / scale, test / scale, scale


def lstsq(train: torch.Tensor, y: torch.Tensor, test: torch.Tensor, ridge: float) -> torch.Tensor:
    """Kernel least squares on ±1 targets: ``test (K + ridge I)^-1 y`` (K normalised, so ridge is
    relative to its operator norm); returns the test scores (N,)."""
    k, t, _ = normalise(train, test)
    alpha = torch.linalg.solve(k + ridge * torch.eye(len(k), dtype=k.dtype), y.double())
    return t @ alpha


def logistic(train: torch.Tensor, y: torch.Tensor, test: torch.Tensor, ridge: float,
             f0_train: torch.Tensor | None = None, f0_test: torch.Tensor | None = None, steps: int = 50) -> torch.Tensor:
    """Kernel logistic regression: ``f(x) = f0(x) + K(x, X) alpha + b`` minimising the mean logistic
    loss on the train labels ``y`` (±1) plus ``ridge/2 |alpha|²`` (K normalised); Newton's method
    (the objective is convex in (alpha, b)). ``f0`` None means 0. Returns the test scores (N,)."""
    k, t, _ = normalise(train, test)
    n = len(k)
    x = torch.cat([k, torch.ones(n, 1, dtype=k.dtype)], 1)  # (n, n + 1): kernel rows and the intercept
    off = torch.zeros(n, dtype=k.dtype) if f0_train is None else f0_train.double()
    y = y.double()
    reg = torch.full((n + 1,), ridge, dtype=k.dtype)
    reg[-1] = 0.0  # the intercept is not penalised
    w = torch.zeros(n + 1, dtype=k.dtype)
    for _ in range(steps):
        m = y * (x @ w + off)  # margins
        p = torch.sigmoid(-m)  # d loss / d margin, negated
        g = -(x.T @ (y * p)) / n + reg * w
        h = (x.T * (p * (1 - p))) @ x / n + torch.diag(reg) + 1e-12 * torch.eye(n + 1, dtype=k.dtype)
        step = torch.linalg.solve(h, g)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    base = torch.zeros(len(t), dtype=k.dtype) if f0_test is None else f0_test.double()
    return base + torch.cat([t, torch.ones(len(t), 1, dtype=k.dtype)], 1) @ w


def solve_all(train: torch.Tensor, y01: torch.Tensor, test: torch.Tensor, ridge: float,
              f0_train: torch.Tensor, f0_test: torch.Tensor) -> dict[str, torch.Tensor]:
    """Test scores of the three solvers for one kernel: least squares, logistic, and the linearised model."""
    y = y01.double() * 2 - 1  # ±1
    return {
        "lstsq": lstsq(train, y, test, ridge),
        "logistic": logistic(train, y, test, ridge),
        "linearised": logistic(train, y, test, ridge, f0_train, f0_test),
    }


# ---------------------------------------------------------------- comparing kernels


def _centre(k: torch.Tensor) -> torch.Tensor:
    """H K H with H the centring matrix (rows and columns centred)."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Centred kernel alignment ``<HAH, HBH>_F / (|HAH|_F |HBH|_F)`` of two square Gram matrices on
    the same examples (Cortes et al. 2012; Kornblith et al. 2019's CKA)."""
    a, b = _centre(a.double()), _centre(b.double())
    return float((a * b).sum() / (a.norm() * b.norm()))


def alignment(a: torch.Tensor, b: torch.Tensor) -> float:
    """Uncentred alignment (cosine) of two kernel blocks of the same shape."""
    a, b = a.double(), b.double()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------- k-shot subsets


def k_shot(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """``k`` row indices per class (0 then 1), drawn without replacement with ``seed``; the first
    ``k' < k`` of each class are the ``k'``-shot subset of the same seed (nested subsets)."""
    rng = random.Random(seed)
    out = []
    for c in (0, 1):
        pool = [i for i, y in enumerate(labels) if y == c]
        out.append(rng.sample(pool, k))
    return out[0] + out[1]


def nested(idx: list[int], k_big: int, k: int) -> list[int]:
    """The positions in ``idx`` (a ``k_big``-shot draw, class 0 first) of its ``k``-shot subset."""
    return list(range(k)) + list(range(k_big, k_big + k))


# ---------------------------------------------------------------- logits captured by fit


@dataclass
class EvalLogits:
    """A forward hook on the classifier that keeps the logits of the latest evaluation pass (the
    model in eval mode); a training forward clears them. ``fit`` evaluates after its last epoch, so
    after ``fit`` this holds the final weights' logits on the eval loader, in loader order."""

    logits: list[torch.Tensor] = field(default_factory=list)
    _training: bool = True

    def __call__(self, module, inputs, output):
        if module.training:
            self._training = True
            return
        if self._training:  # the first eval batch after training: a new pass
            self.logits, self._training = [], False
        self.logits.append(output.detach().float().cpu())

    def result(self) -> torch.Tensor:
        return torch.cat(self.logits)


def batches(ds, tokenizer, batch_size: int) -> list[dict]:
    """``ds`` as a list of padded batches in its order (for ``ntk``, which indexes them)."""
    from cgf_bert.data.loader import make_loader

    return list(make_loader(ds, tokenizer, batch_size))


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((scores > 0).long() == labels).double().mean())


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------- settings




@dataclass(frozen=True)
class KernelConfig:
    """The kernel study's settings; ``experiments.kernel_view`` maps one flag onto each field."""

    k_small: int = _f(16, "examples per class of the small subsets (the first of the large subset's, same seed)", min=1)
    k_large: int = _f(64, "examples per class of the large subsets", min=1)
    subsets: int = _f(5, "seeded subsets per k (seeds seed, seed+1, ...)", min=1)
    seed: int = _f(0, "first subset seed; also the dev subset's", min=0)
    limit_dev: int | None = _f(None, "score on this many dev examples (a seeded random subset); none = all 408", min=1)
    ridge: float = _f(1e-3, "solver ridge, relative to the train kernel's operator norm", min=0.0)
    row_chunk: int = _f(128, "training rows whose gradients are held at once (43 MB each for MiniLM-L6)", min=1)
    grad_batch: int = _f(8, "examples per vmap(grad) call", min=1)
    ft_epochs: int = _f(1, "fine-tuning epochs over a subset (fit scores dev after each)", min=1)
    ft_batch_size: int = _f(4, "fine-tuning batch size", min=1)
    lr: float = _f(5e-5, "fine-tuning AdamW peak learning rate (the recipe's), linear decay, no warmup", above=0.0)
    max_length: int = _f(128, "maximum tokens per sentence pair, as in training", min=8)
    device: str | None = _f(None, "torch device; default cuda when available, else cpu")
    data_dir: str | None = _f(None, "folder of GLUE MRPC TSVs; default $CGF_BERT_DATA_DIR, ../shared/data/mrpc, then the hub")


# ---------------------------------------------------------------- one checkpoint


def by_length(ds) -> list[int]:
    """Row order of ``ds`` by token count (batches of similar length carry little padding)."""
    lengths = ds["length"]
    return sorted(range(len(ds)), key=lambda i: (lengths[i], i))


def fine_tune(model, state: dict, train_ds, dev_loader, tokenizer, cfg: KernelConfig, seed: int, device, workdir) -> tuple[torch.Tensor, dict]:
    """Fine-tune from ``state`` on ``train_ds`` with the recipe's optimiser for ``cfg.ft_epochs``;
    returns the final weights' dev logit differences (N,) and the fit's history."""
    from cgf_bert.data.loader import make_loader
    from cgf_bert.train.engine import build_optimizer, ce_step, fit, freeze_embeddings, set_seed

    model.load_state_dict(state)
    freeze_embeddings(model)
    set_seed(seed)
    loader = make_loader(train_ds, tokenizer, cfg.ft_batch_size, shuffle=True, seed=seed)
    opt, sched = build_optimizer(model, cfg.lr, cfg.ft_epochs * len(loader))
    hook = EvalLogits()
    handle = model.classifier.register_forward_hook(hook)
    try:
        result = fit(model, ce_step, loader, dev_loader, opt, sched, epochs=cfg.ft_epochs, device=device,
                     checkpoint=f"{workdir}/fine-tune.pt", meta={})
    finally:
        handle.remove()
    logits = hook.result()
    return logits[:, 1] - logits[:, 0], {"steps": cfg.ft_epochs * len(loader), "history": result.history}


def _scores(kernel: Kernel, order: list[int], pos: list[int]) -> tuple[dict, dict]:
    """Train and test blocks of both kernels for the training rows at positions ``pos`` of the draw.
    Kernel rows were computed in length order (``order``: draw position of each kernel row)."""
    where = {p: r for r, p in enumerate(order)}  # draw position -> kernel row
    rows = [where[p] for p in pos]
    n = kernel.n_rows
    train = {k: getattr(kernel, k)[rows][:, rows] for k in ("sgd", "sign")}
    test = {k: getattr(kernel, k)[n:][:, rows] for k in ("sgd", "sign")}
    return train, test


def study(path: str, cfg: KernelConfig, data, tokenizer, dev, device, workdir) -> tuple[dict, dict]:
    """One checkpoint: f0, the kernels of each subset, the three solvers per kernel, and a fine-tune
    per subset and k. Returns the record entry and the kernel blocks kept for comparing models."""
    from cgf_bert.data.loader import make_loader
    from cgf_bert.store.checkpoint import load_model
    from cgf_bert.train.engine import freeze_embeddings

    model, meta = load_model(path)
    freeze_embeddings(model)
    model.to(device).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dev_loader = make_loader(dev, tokenizer, 32)
    y_dev = torch.tensor(dev["labels"])
    dev_batches = batches(dev, tokenizer, cfg.grad_batch)
    grads, n_params = gradient_fn(model, device)
    labels = data["train"]["labels"]
    rows, kept, gradients = [], [], 0
    for s in range(cfg.subsets):
        seed = cfg.seed + s
        draw = k_shot(labels, cfg.k_large, seed)  # class 0 then class 1
        train_ds = data["train"].select(draw)
        order = by_length(train_ds)  # kernel row r is draw position order[r]
        model.load_state_dict(state)
        model.eval()
        kernel = ntk(grads, n_params, batches(train_ds.select(order), tokenizer, cfg.grad_batch), dev_batches, cfg.row_chunk,
                     desc=f"eNTK seed {seed}")
        gradients += kernel.gradients
        f0_dev = kernel.f[kernel.n_rows:]  # (N,) the checkpoint's own output on dev, from the kernel's passes
        f0_train = torch.zeros(len(order), dtype=torch.float64)
        f0_train[order] = kernel.f[: kernel.n_rows]  # back to draw order
        y_train = torch.tensor(train_ds["labels"])
        for k in (cfg.k_small, cfg.k_large):
            pos = nested(draw, cfg.k_large, k)
            train, test = _scores(kernel, order, pos)
            kept.append({"seed": seed, "k": k, "train": train, "test": test})
            ft, info = fine_tune(model, state, train_ds.select(pos), dev_loader, tokenizer, cfg, seed, device, workdir)
            row = {"seed": seed, "k": k, "train_examples": len(pos), "f0_accuracy": accuracy(f0_dev, y_dev),
                   "fine_tune": {"accuracy": accuracy(ft, y_dev), "steps": info["steps"],
                                 "train_loss": [h["train"]["loss"] for h in info["history"]]},
                   "kernels": {}}
            for name in ("sgd", "sign"):
                solved = solve_all(train[name], y_train[pos], test[name], cfg.ridge, f0_train[pos], f0_dev)
                row["kernels"][name] = {
                    solver: {"accuracy": accuracy(sc, y_dev), "agreement_with_fine_tune": float(((sc > 0) == (ft > 0)).double().mean())}
                    for solver, sc in solved.items()
                }
                # in the kernel regime the fine-tune's logit change is the linearised model's
                row["kernels"][name]["linearised"]["delta_correlation"] = correlation(ft - f0_dev, solved["linearised"] - f0_dev)
            rows.append(row)
        del kernel
    entry = {"checkpoint": path, "softmax": meta["approx"].label(), "name": None, "parameters": n_params,
             "f0_dev_accuracy": rows[0]["f0_accuracy"], "gradients_computed": gradients, "runs": rows}
    return entry, {"kept": kept}


def compare(a: dict, b: dict) -> list[dict]:
    """Per subset and k: CKA of the two models' train Gram blocks (SGD and SignGD) and the alignment
    of their dev x train blocks."""
    out = []
    for x, y in zip(a["kept"], b["kept"]):
        assert (x["seed"], x["k"]) == (y["seed"], y["k"])
        out.append({"seed": x["seed"], "k": x["k"],
                    **{f"cka_{n}": cka(x["train"][n], y["train"][n]) for n in ("sgd", "sign")},
                    **{f"dev_alignment_{n}": alignment(x["test"][n], y["test"][n]) for n in ("sgd", "sign")}})
    return out


# ---------------------------------------------------------------- plot


def plot_kernel_vs_finetune(entries: list[dict], path, solver: str = "logistic") -> "Path":
    """Kernel-solver dev accuracy against the fine-tune's, per subset: one panel per kernel, one
    colour per checkpoint, circles k small and squares k large; hollow markers the linearised model;
    dotted, each checkpoint's own (unchanged) accuracy; dashed, y = x. One legend below both panels."""
    from cgf_bert.report.plots import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharex=True, sharey=True, layout="constrained")
    ks = sorted({r["k"] for e in entries for r in e["runs"]})
    marks = dict(zip(ks, "os^D"))
    for ax, kern in zip(axes, ("sgd", "sign")):
        for c, e in enumerate(entries):
            for k in ks:
                runs = [r for r in e["runs"] if r["k"] == k]
                ft = [r["fine_tune"]["accuracy"] * 100 for r in runs]
                ax.scatter(ft, [r["kernels"][kern][solver]["accuracy"] * 100 for r in runs], color=f"C{c}", marker=marks[k],
                           label=f"{e['name']} k={k}: {solver}")
                ax.scatter(ft, [r["kernels"][kern]["linearised"]["accuracy"] * 100 for r in runs], facecolors="none",
                           edgecolors=f"C{c}", marker=marks[k], label=f"{e['name']} k={k}: linearised (f0 + kernel)")
            ax.axhline(e["f0_dev_accuracy"] * 100, color=f"C{c}", ls=":", lw=0.8, label=f"{e['name']}: unchanged checkpoint (f0)")
        lo, hi = ax.get_xlim()
        lo, hi = min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--", label="y = x: kernel as good as the fine-tune")
        ax.set(title={"sgd": "SGD kernel", "sign": "SignGD kernel"}[kern], xlabel="fine-tune dev accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("kernel solver dev accuracy (%)")
    # outside the panels, so no point hides behind it; both panels carry the same marks
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    return save(fig, path)


# ---------------------------------------------------------------- kernel blocks on disk


def save_blocks(path, kept: list[dict]) -> "Path":
    """The train and dev x train blocks of every subset and k (float32; CKA needs no more) as one .npz."""
    from pathlib import Path

    arrays = {f"s{b['seed']}_k{b['k']}_{part}_{name}": b[part][name].float().numpy()
              for b in kept for part in ("train", "test") for name in ("sgd", "sign")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_blocks(path, runs: list[dict]) -> dict:
    """``save_blocks``'s file back, in the order of ``runs`` (a record entry's runs)."""
    z = np.load(path)
    return {"kept": [{"seed": r["seed"], "k": r["k"],
                      **{part: {name: torch.from_numpy(z[f"s{r['seed']}_k{r['k']}_{part}_{name}"]).double() for name in ("sgd", "sign")}
                         for part in ("train", "test")}} for r in runs]}
