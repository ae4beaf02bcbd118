"""Inputs that fell outside a polynomial's interval, counted per call (never clipped)."""

from __future__ import annotations

import torch


class OutsideCounter:
    """Counts, over the entries a caller marks valid, how many lie outside an interval.

    One counter per evaluation (``model.bert.counting``), nothing global. The counts stay on
    the inputs' device as tensors, so counting costs no host sync until ``result`` is read; a
    training forward passes no counter and counts nothing.
    """

    def __init__(self):
        self.outside: torch.Tensor | None = None
        self.total: torch.Tensor | None = None

    def add(self, x: torch.Tensor, lo: float, hi: float, valid: torch.Tensor | None = None) -> None:
        """Count the entries of ``x`` (where ``valid``, broadcastable to it) outside [lo, hi]."""
        out = (x < lo) | (x > hi)
        valid = torch.ones_like(out) if valid is None else valid.expand_as(out)
        outside, total = (out & valid).sum(), valid.sum()
        self.outside = outside if self.outside is None else self.outside + outside
        self.total = total if self.total is None else self.total + total

    def result(self) -> dict[str, int] | None:
        """{'outside': N, 'entries': M}, or None when nothing was counted."""
        if self.total is None:
            return None
        return {"outside": int(self.outside), "entries": int(self.total)}
