"""The figure of an encrypted run (``experiments.encrypted_inference``): bootstraps and time per stage, and
the error after each encoder layer."""

from __future__ import annotations

import textwrap

import numpy as np

from cgf_bert.fhe.accounting import stage_seconds
from cgf_bert.report.plots import pyplot, save


def price(table: list[dict], costs: dict | None) -> float | None:
    """Seconds of a stage table at ``costs`` (an ``experiments.ckks_costs`` record's), None without them."""
    if costs is None:
        return None
    return sum(stage_seconds(row, costs) for row in table)


def plot(results: list[dict], path: str, measured: bool, noise: dict | None = None, costs: dict | None = None):
    """Bootstraps and time per stage (measured; in the simulation projected with ``costs``, else its ciphertext
    products); the error after each layer."""
    plt = pyplot()
    kinds = list(results[0]["per_example_mean_by_stage"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    width = 0.8 / len(results)
    for j, res in enumerate(results):
        st = res["per_example_mean_by_stage"]
        x = np.arange(len(kinds)) + j * width
        # the full label, wrapped: two students can differ only at its end
        axes[0].bar(x, [st.get(k, {}).get("bootstraps", 0) for k in kinds], width, color=f"C{j}", label=textwrap.fill(res["label"], 150))
        if measured:
            axes[1].bar(x, [(st.get(k, {}).get("seconds", 0) + st.get(k, {}).get("bootstrap_seconds", 0)) / 60 for k in kinds], width, color=f"C{j}")
        elif costs:
            axes[1].bar(x, [price([st.get(k, {})], costs) / 60 for k in kinds], width, color=f"C{j}")
        else:
            axes[1].bar(x, [st.get(k, {}).get("mul", 0) + st.get(k, {}).get("square", 0) for k in kinds], width, color=f"C{j}")
        _layer_errors(axes[2], res, f"C{j}")
    titles = ("bootstraps by stage", "time by stage (measured)" if measured else
              "time by stage (projected from measured op costs)" if costs else "ciphertext products by stage")
    ylabels = ("bootstraps per example", "minutes" if measured or costs else "ciphertext products")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.12)  # headroom: the tallest bar clear of the frame
        ax.grid(alpha=0.3, axis="y")
    n_layers = max(r["layers"] for r in results)
    axes[2].set_yscale("log")
    axes[2].set_xticks(range(n_layers))
    axes[2].set_xlim(-0.5, n_layers - 0.5)
    axes[2].set_xlabel("encoder layer")
    axes[2].set_ylabel("max |error| after layer")
    examples = sorted({len(r["examples"]) for r in results})
    faint = "; faint: each example" if examples[-1] > 1 else ""
    axes[2].set_title(f"layer output vs plaintext\nmean over {'/'.join(map(str, examples))} example(s){faint}", fontsize=10)
    axes[2].grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8)  # outside the panels: no bar behind it
    drawn = "" if not noise or not noise["rms"] else (
        f" with Gaussian bootstrap errors, sigma {noise['rms']:.1e}" if noise["from"] == "gaussian"
        else f" with bootstrap errors drawn from a real one's, {noise['rms']:.1e} rms")
    if noise and noise.get("bias"):
        drawn += f"{',' if drawn else ' with'} an offset {noise['bias']:g} m^3"
    kind = "CKKS with bootstraps, measured" if measured else "slot simulation" + (drawn or ", exact")
    layers = sorted({r["layers"] for r in results})
    fig.suptitle(f"The encoder as one CKKS circuit ({kind}): cost by stage over {'/'.join(map(str, layers))} encoder layer(s)"
                 " + pooler + classifier", fontsize=10)
    return save(fig, path)


def _layer_errors(ax, res: dict, colour: str) -> None:
    """One model's max error after each layer: its mean over the examples (one line, the legend's
    colour), each example faint beneath it; a lone layer is a marked point with its value written."""
    errs = np.array([[np.nan if e["max_abs_error"] is None else e["max_abs_error"]  # None: not finite in the record
                      for e in ex["per_layer"]] for ex in res["examples"]], dtype=float)
    errs[~np.isfinite(errs)] = np.nan  # inf or nan, as drawn before the record is written
    errs = np.maximum(errs, 1e-17)  # log scale: an exact 0 drawn at the floor
    layers = [e["layer"] for e in res["examples"][0]["per_layer"]]
    if len(errs) > 1:
        ax.plot(layers, errs.T, color=colour, alpha=0.2, lw=0.8)
    if np.isnan(errs).all():  # nothing to draw: said in the panel, not left blank
        ax.text(0.3, 0.03, "this model: not finite after any layer (see the record)", transform=ax.transAxes,
                color=colour, fontsize=8, va="bottom", bbox={"facecolor": "white", "edgecolor": colour, "pad": 2})
        return
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(errs, 0)  # over the examples with a finite error at that layer
    ax.plot(layers, mean, "o-", color=colour, ms=6)
    if len(layers) == 1:
        ax.annotate(f"{mean[0]:.1e}", (layers[0], mean[0]), xytext=(8, 0), textcoords="offset points", va="center", fontsize=9, color=colour)
