"""The range analysis' figures (``analysis.ranges``): the CGF exp argument's distribution against the
polynomial's interval, the KL heatmap per layer and head, and the attention maps of one example."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

from cgf_bert.analysis.ranges import kl_matrix
from cgf_bert.report.plots import pyplot, save


def plot_ranges(teacher: dict, student: dict, interval: tuple[float, float], path: str | Path, title: str,
                names: tuple[str, str] = ("teacher", "checkpoint")) -> Path:
    """Per-layer exp-argument bars, teacher and checkpoint side by side: min..max thin, p1..p99
    thick; the interval the polynomial exp is fitted on drawn as dashed lines. ``names`` say which
    model each series is (the teacher's figure compares the teacher with itself: its legend says so)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, result, colour, who in ((-0.15, teacher, "tab:blue", names[0]), (0.15, student, "tab:orange", names[1])):
        xs = [layer["layer"] + offset for layer in result["layers"]]
        stats = [layer["exp_arg"] for layer in result["layers"]]
        ax.vlines(xs, [s["min"] for s in stats], [s["max"] for s in stats], colors=colour, lw=1)
        ax.vlines(xs, [s["p1"] for s in stats], [s["p99"] for s in stats], colors=colour, lw=7,
                  label=f"{who}: {result['label']}, scored as CGF c={_coeffs(result)}")
    for k, y in enumerate(interval):
        ax.axhline(y, color="tab:red", ls="--", lw=0.8, label=f"interval [{interval[0]:g}, {interval[1]:g}]" if k == 0 else None)
    ax.set_xticks(range(len(teacher["layers"])))
    ax.set(xlabel="layer", ylabel="CGF exp argument  x - c var", title=title)
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path)


def _coeffs(result: dict) -> str:
    return ",".join(sorted({f"{layer['coeff']:g}" for layer in result["layers"]}))


def plot_kl(result: dict, path: str | Path, title: str) -> Path:
    """Heatmap of the mean KL(teacher || student, renormalised) per (layer, head), values written in."""
    plt = pyplot()
    kl = kl_matrix(result)  # (L, H)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * kl.shape[1], 1.2 + 0.5 * kl.shape[0]))
    # A KL is never negative: below 0 is float noise (the teacher scored against itself), and a
    # scale of noise alone (+-1e-9) would read as a difference, so it starts at 0 and spans 1e-4 at least.
    kl = np.where(np.isnan(kl), kl, np.maximum(kl, 0.0))
    finite = kl[np.isfinite(kl)]
    im = ax.imshow(np.ma.masked_invalid(kl), cmap="viridis", aspect="auto", vmin=0.0, vmax=max(finite.max(initial=0.0), 1e-4))
    for (i, j), v in np.ndenumerate(kl):
        ax.text(j, i, f"{v:.2g}" if not np.isfinite(v) or abs(v) >= 1e-4 else "0", ha="center", va="center", fontsize=6,
                color="white")  # no float noise; a nan or inf says so, not "0"
    ax.set(xlabel="head", ylabel="layer", xticks=range(kl.shape[1]), yticks=range(kl.shape[0]))
    ax.set_title(textwrap.fill(title, int(8 * fig.get_figwidth())), fontsize=10)  # a student's label can be longer than the figure
    fig.colorbar(im, ax=ax, label="mean KL per row (nats)")
    return save(fig, path)


def plot_maps(teacher: torch.Tensor, student: torch.Tensor, tokens: list[str], path: str | Path, titles: tuple[str, str]) -> Path:
    """Two (T, T) attention maps side by side on one colour scale (queries down, keys across)."""
    plt = pyplot()
    vmax = float(max(teacher.max(), student.max()))
    fig, axes = plt.subplots(1, 2, figsize=(16, 8.4), layout="constrained")  # 64 tokens at 6 pt need ~7 in per map
    for ax, m, title in zip(axes, (teacher, student), titles):
        im = ax.imshow(m.numpy(), cmap="magma", vmin=0.0, vmax=vmax)
        ax.set_title(textwrap.fill(title, 100), fontsize=9)  # a student's label can be longer than its map
        if len(tokens) <= 64:  # beyond that the labels overlap into noise
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention probability")
    return save(fig, path)
