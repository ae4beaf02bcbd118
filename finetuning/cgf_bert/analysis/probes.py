"""How linear is each layer of a BERT, and do its layers commute? After Zhao, Pascual, Brunner
and Wattenhofer, "Of Non-Linearity and Commutativity in BERT" (2021).

The encoder is run here as an explicit list of steps ``h -> h`` over the hidden states (B, T, d),
each step a BERT module's own forward (a whole layer, its attention block, its feed-forward
block) or a linear map, so that replacing, removing and reordering layers needs no BERT code:

- **blocks**: per layer ``i``, ``layer`` (h_i -> h_{i+1}), ``attention`` (h_i -> a_i: self-attention,
  output projection, residual and LayerNorm) and ``ffn`` (a_i -> h_{i+1}: intermediate, GELU,
  output projection, residual and LayerNorm);
- **linear approximator**: per block, ridge least squares ``Y ~ X W + b`` from its input to its
  output over valid (non-padding) tokens, fitted on train tokens from sums accumulated over
  batches (XᵀX, XᵀY, Σx, Σy in float64, centred at the end so the bias is not penalised), with
  ``λ = ridge * tr(C_xx) / d`` (``C_xx`` the centred input covariance, so ``ridge`` is relative
  to the mean input variance);
- **non-linearity** of a block on dev tokens: ``||Y - XW - b||² / ||Y - ȳ||²`` (1 - R², pooled over
  tokens and output dims, ȳ the dev mean of Y), beside the same ratio for the identity map
  ``||Y - X||² / ||Y - ȳ||²`` (how far the block is from its skip connection);
- **dev accuracy**, no training, with a block replaced by its linear map, a layer removed
  (identity), adjacent layers swapped, and all layers in a few seeded random orders.

The dev pass caches every block's input (h_0..h_L and a_0..a_{L-1}), so a variant runs only
from its first changed layer on.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cgf_bert.config import flag_field as _f  # a config field with its flag's help
from cgf_bert.data.loader import to_device
from cgf_bert.data.tasks import classification_metrics
from cgf_bert.model.bert import BertMRPC
from cgf_bert.model.steps import Step, attention_step, embed, encoder_mask, ffn_step, head, layer_step
from cgf_bert.report.plots import pyplot, save

log = logging.getLogger(__name__)

BLOCKS = ("layer", "attention", "ffn")  # the three maps fitted per layer


# ---------------------------------------------------------------- the encoder as steps














@dataclass(frozen=True)
class LinearMap:
    """``y = x W + b`` on the last dim; W (d_in, d_out), b (d_out,), float32."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x @ self.weight.to(x.dtype) + self.bias.to(x.dtype)


def run_steps(h: torch.Tensor, mask: torch.Tensor, steps: Sequence[Step]) -> torch.Tensor:
    for step in steps:
        h = step(h, mask)
    return h


def order_steps(model: BertMRPC, order: Sequence[int]) -> list[Step]:
    """The layers in ``order`` (a subset or permutation of 0..L-1)."""
    return [layer_step(model, i) for i in order]


# ---------------------------------------------------------------- fitting


@dataclass
class Moments:
    """Token sums of a block's input x and output y, float64: n, Σx, Σy, XᵀX, XᵀY."""

    d_in: int
    d_out: int
    n: int = 0
    sx: torch.Tensor = field(init=False)
    sy: torch.Tensor = field(init=False)
    xx: torch.Tensor = field(init=False)
    xy: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.sx, self.sy = torch.zeros(self.d_in, dtype=torch.float64), torch.zeros(self.d_out, dtype=torch.float64)
        self.xx = torch.zeros(self.d_in, self.d_in, dtype=torch.float64)
        self.xy = torch.zeros(self.d_in, self.d_out, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add tokens ``x`` (N, d_in) and ``y`` (N, d_out)."""
        x, y = x.double().cpu(), y.double().cpu()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y

    def solve(self, ridge: float) -> tuple[LinearMap, float]:
        """The ridge solution (bias unpenalised) and the absolute λ it used (per token, on C_xx)."""
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx / self.n - torch.outer(mx, mx)  # (d_in, d_in) centred input covariance
        cxy = self.xy / self.n - torch.outer(mx, my)  # (d_in, d_out)
        lam = ridge * float(torch.trace(cxx)) / self.d_in
        w = torch.linalg.solve(cxx + lam * torch.eye(self.d_in, dtype=torch.float64), cxy)
        return LinearMap(w.float(), (my - mx @ w).float()), lam


def _valid(t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (N, d): the real tokens only."""
    return t[attention_mask.bool()]


@torch.no_grad()
def block_io(model: BertMRPC, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every block's input on one batch: h_0..h_L (layer inputs, then the last output) and a_0..a_{L-1}
    (attention-block outputs), each (B, T, d). Each layer runs as its attention block, then its
    feed-forward block (``test_probes`` checks that this is the layer's own output)."""
    mask = encoder_mask(batch["attention_mask"])
    hs, attn = [embed(model, batch)], []
    for i in range(len(model.bert.encoder.layer)):
        attn.append(attention_step(model, i)(hs[-1], mask))
        hs.append(ffn_step(model, i)(attn[-1], mask))
    return hs, attn


def block_pairs(hs: list[torch.Tensor], attn: list[torch.Tensor], i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer ``i``'s blocks as (input, output)."""
    return {"layer": (hs[i], hs[i + 1]), "attention": (hs[i], attn[i]), "ffn": (attn[i], hs[i + 1])}


@torch.no_grad()
def fit_maps(model: BertMRPC, loader, device: torch.device, ridge: float, desc: str = "fit") -> tuple[list[dict[str, LinearMap]], list[dict[str, float]]]:
    """Per layer, each block's ridge map fitted on the loader's valid tokens, and the λ of each."""
    model.eval()
    d = model.bert.config.hidden_size
    num = len(model.bert.encoder.layer)
    moments = [{b: Moments(d, d) for b in BLOCKS} for _ in range(num)]
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        batch = to_device(batch, device)
        hs, attn = block_io(model, batch)
        for i in range(num):
            for name, (x, y) in block_pairs(hs, attn, i).items():
                moments[i][name].add(_valid(x, batch["attention_mask"]), _valid(y, batch["attention_mask"]))
    solved = [{b: m.solve(ridge) for b, m in layer.items()} for layer in moments]
    return [{b: s[0] for b, s in layer.items()} for layer in solved], [{b: s[1] for b, s in layer.items()} for layer in solved]


# ---------------------------------------------------------------- the dev cache and scores


@dataclass
class DevCache:
    """Per dev batch: the block inputs (CPU float32), the encoder mask, the 0/1 mask and labels."""

    hs: list[list[torch.Tensor]] = field(default_factory=list)
    attn: list[list[torch.Tensor]] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    attention_masks: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def cache_dev(model: BertMRPC, loader, device: torch.device, desc: str = "dev") -> DevCache:
    model.eval()
    cache = DevCache()
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        batch = to_device(batch, device)
        hs, attn = block_io(model, batch)
        cache.hs.append([h.cpu() for h in hs])
        cache.attn.append([a.cpu() for a in attn])
        cache.masks.append(encoder_mask(batch["attention_mask"]).cpu())
        cache.attention_masks.append(batch["attention_mask"].cpu())
        cache.labels.append(batch["labels"].cpu())
    return cache


def relative_residual(pred: torch.Tensor, y: torch.Tensor) -> float:
    """``||y - pred||² / ||y - ȳ||²`` over tokens (N, d), pooled over output dims, in float64."""
    y, pred = y.double(), pred.double()
    total = ((y - y.mean(0)) ** 2).sum()
    return float(((y - pred) ** 2).sum() / total)


def nonlinearity(maps: list[dict[str, LinearMap]], cache: DevCache) -> list[dict[str, dict[str, float]]]:
    """Per layer and block: the relative residual of its linear map and of the identity on dev tokens."""
    out = []
    for i, layer_maps in enumerate(maps):
        row = {}
        for name, lin in layer_maps.items():
            xs, ys = zip(*(block_pairs(hs, attn, i)[name] for hs, attn in zip(cache.hs, cache.attn)))
            x = torch.cat([_valid(t, m) for t, m in zip(xs, cache.attention_masks)])  # (N, d)
            y = torch.cat([_valid(t, m) for t, m in zip(ys, cache.attention_masks)])
            row[name] = {"linear": relative_residual(lin(x), y), "identity": relative_residual(x, y)}
        out.append(row)
    return out


@dataclass(frozen=True)
class Variant:
    """A changed encoder: start from the cached ``point`` ('h' or 'a') of layer ``start``, run ``steps``."""

    name: str
    start: int
    steps: tuple
    point: str = "h"


@torch.no_grad()
def variant_logits(model: BertMRPC, cache: DevCache, v: Variant, device: torch.device) -> torch.Tensor:
    """Dev logits (N, 2) of a variant, in cache order."""
    out = []
    for hs, attn, mask in zip(cache.hs, cache.attn, cache.masks):
        h = (hs if v.point == "h" else attn)[v.start].to(device)
        out.append(head(model, run_steps(h, mask.to(device), v.steps)).cpu())
    return torch.cat(out)


def swap_order(num: int, i: int, j: int) -> list[int]:
    """0..num-1 with positions ``i`` and ``j`` exchanged."""
    order = list(range(num))
    order[i], order[j] = order[j], order[i]
    return order


def variants(model: BertMRPC, maps: list[dict[str, LinearMap]], shuffles: int, seed: int) -> list[tuple[dict, Variant]]:
    """Every probe's description and variant: each block replaced, each layer removed, adjacent
    layers swapped, and ``shuffles`` seeded random orders of all layers."""
    num = len(maps)
    rest = lambda i: tuple(layer_step(model, j) for j in range(i, num))  # noqa: E731  layers i.. unchanged
    out = []
    for i in range(num):
        ffn = ffn_step(model, i)
        out.append(({"probe": "replace", "block": "layer", "layer": i}, Variant(f"layer {i} linear", i, (maps[i]["layer"],) + rest(i + 1))))
        att = lambda h, m, lin=maps[i]["attention"], ffn=ffn: ffn(lin(h), m)  # noqa: E731
        out.append(({"probe": "replace", "block": "attention", "layer": i}, Variant(f"attention {i} linear", i, (att,) + rest(i + 1))))
        out.append(({"probe": "replace", "block": "ffn", "layer": i}, Variant(f"ffn {i} linear", i, (maps[i]["ffn"],) + rest(i + 1), "a")))
        out.append(({"probe": "remove", "layer": i}, Variant(f"layer {i} removed", i, rest(i + 1))))
    for i in range(num - 1):
        order = swap_order(num, i, i + 1)[i:]  # from layer i on: i+1, i, i+2, ...
        out.append(({"probe": "swap", "layers": [i, i + 1]}, Variant(f"swap {i},{i + 1}", i, tuple(order_steps(model, order)))))
    for k in range(shuffles):
        order = list(range(num))
        random.Random(seed + k).shuffle(order)
        out.append(({"probe": "shuffle", "seed": seed + k, "order": order}, Variant(f"shuffle {order}", 0, tuple(order_steps(model, order)))))
    return out


def probe(model: BertMRPC, train_loader, dev_loader, device: torch.device, ridge: float, shuffles: int, seed: int,
          desc: str = "") -> dict:
    """Every measurement of the module docstring for one model: its record entry."""
    model.to(device).eval()
    maps, lams = fit_maps(model, train_loader, device, ridge, desc=f"{desc} fit")
    cache = cache_dev(model, dev_loader, device, desc=f"{desc} dev")
    labels = torch.cat(cache.labels).numpy()
    base = variant_logits(model, cache, Variant("baseline", 0, tuple(order_steps(model, range(len(maps))))), device).argmax(-1).numpy()
    rows = []
    for what, v in tqdm(variants(model, maps, shuffles, seed), desc=f"{desc} variants", leave=False, dynamic_ncols=True):
        preds = variant_logits(model, cache, v, device).argmax(-1).numpy()
        rows.append({**what, **classification_metrics(preds, labels), "agreement": float((preds == base).mean())})
    nl = nonlinearity(maps, cache)
    return {
        "baseline": classification_metrics(base, labels),
        "dev_tokens": int(sum(int(m.sum()) for m in cache.attention_masks)),
        "layers": [{"layer": i, "nonlinearity": nl[i], "ridge_lambda": lams[i]} for i in range(len(maps))],
        "variants": rows,
    }


# ---------------------------------------------------------------- plots


def _layers(entry: dict) -> list[int]:
    return [row["layer"] for row in entry["probes"]["layers"]]


def plot_nonlinearity(entries: list[dict], path: str | Path) -> Path:
    """Per block kind, per-layer non-linearity (linear-map residual, solid) and the identity's
    residual (hollow), each checkpoint side by side; log scale."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    width = 0.8 / max(1, len(entries))
    for ax, block in zip(axes, BLOCKS):
        for k, e in enumerate(entries):
            xs = np.array(_layers(e)) + (k - (len(entries) - 1) / 2) * width
            nl = [row["nonlinearity"][block] for row in e["probes"]["layers"]]
            ax.bar(xs, [r["linear"] for r in nl], width, color=f"C{k}", label=f"{e['name']}: linear map")
            ax.scatter(xs, [r["identity"] for r in nl], color=f"C{k}", marker="_", s=120, label=f"{e['name']}: identity (Y = X)")
        ax.set(yscale="log", xlabel="layer", title={"layer": "whole layer", "attention": "attention block (+res, LN)",
                                                   "ffn": "feed-forward block (+res, LN)"}[block])
        ax.set_xticks(_layers(entries[0]))
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("dev relative residual ||Y-XW-b||² / ||Y-ȳ||²")
    axes[0].legend(fontsize=7)
    return save(fig, path)


def plot_accuracy(entries: list[dict], path: str | Path) -> Path:
    """Dev accuracy per layer after replacement by the linear map (per block), removal and swap with
    the next layer; each checkpoint a colour, its unchanged accuracy dashed."""
    plt = pyplot()
    panels = [("replace", "layer", "layer -> linear map"), ("replace", "attention", "attention -> linear map"),
              ("replace", "ffn", "feed-forward -> linear map"), ("remove", None, "layer removed"), ("swap", None, "swapped with next")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6), sharey=True)
    for ax, (kind, block, title) in zip(axes, panels):
        for k, e in enumerate(entries):
            rows = [r for r in e["probes"]["variants"] if r["probe"] == kind and r.get("block") == block]
            xs = [r["layers"][0] if kind == "swap" else r["layer"] for r in rows]
            ax.plot(xs, [r["accuracy"] * 100 for r in rows], marker="o", color=f"C{k}", label=e["name"])
            ax.axhline(e["probes"]["baseline"]["accuracy"] * 100, color=f"C{k}", ls="--", lw=0.8,
                       label=f"{e['name']} unchanged" if ax is axes[0] else None)
        ax.set(title=title, xlabel="layer i and i+1" if kind == "swap" else "layer")
        ax.set_xticks(_layers(entries[0]))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MRPC dev accuracy (%)")
    axes[0].legend(fontsize=7)
    return save(fig, path)


# ---------------------------------------------------------------- settings and data




@dataclass(frozen=True)
class ProbeConfig:
    """The probes' settings; ``experiments.layer_probes`` maps one flag onto each field."""

    limit_train: int | None = _f(1000, "fit the linear maps on this many train examples (a seeded random subset); none = all 3668", min=1)
    limit_dev: int | None = _f(None, "score on this many dev examples (a seeded random subset); none = all 408", min=1)
    ridge: float = _f(1e-4, "ridge λ relative to the mean input variance: λ = ridge * tr(C_xx) / d", min=0.0)
    shuffles: int = _f(3, "seeded random orders of all layers scored", min=0)
    seed: int = _f(0, "seed of the train/dev subsets and of the shuffles", min=0)
    batch_size: int = _f(32, "batch size of the no-gradient passes", min=1)
    max_length: int = _f(128, "maximum tokens per sentence pair, as in training", min=8)
    device: str | None = _f(None, "torch device; default cuda when available, else cpu")
    data_dir: str | None = _f(None, "folder of GLUE MRPC TSVs; default $CGF_BERT_DATA_DIR, ../shared/data/mrpc, then the hub")


def random_subset(ds, n: int | None, seed: int):
    """``n`` rows of ``ds`` drawn without replacement (seeded), ordered by length so batches carry
    little padding; all of ``ds`` when ``n`` is None or not smaller."""
    if n is None or n >= len(ds):
        return ds
    rows = random.Random(seed).sample(range(len(ds)), n)
    lengths = ds["length"]
    return ds.select(sorted(rows, key=lambda r: (lengths[r], r)))
