"""Matplotlib, imported lazily (only the plotting commands need it) with a file backend."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or a headless server
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders made as needed) and free it."""
    if fig.get_layout_engine() is None:  # a figure with its own (constrained) layout keeps it
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.15)  # every label inside the canvas
    pyplot().close(fig)
    return path
