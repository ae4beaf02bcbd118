"""Packing rows of scores, masks and values into ciphertext slots (pure numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cgf_bert.model.layer_io import Block


@dataclass(frozen=True)
class Placement:
    """Rows ``q0:q1`` of block ``block`` sit in ciphertext rows ``row:row + q1 - q0``."""

    block: int
    q0: int
    q1: int
    row: int


def plan_packing(block_rows: Sequence[int], rows_per_ct: int) -> list[list[Placement]]:
    """Assign blocks' rows to ciphertexts in order, each ciphertext filled to capacity.

    A block may be split between ciphertexts: every row carries its own mask, 1/n and V
    diagonals (``pack``), so nothing ties a block's rows together, and keeping blocks whole
    would leave rows empty (two 70-row blocks do not fit 128 rows; at W=128 on MRPC that
    wasted 40 % of the ciphertexts). Returns one list of placements per ciphertext.
    """
    cts: list[list[Placement]] = [[]]
    used = 0  # rows filled in the last ciphertext
    for b, q in enumerate(block_rows):
        q0 = 0
        while q0 < q:
            if used == rows_per_ct:
                cts.append([])
                used = 0
            take = min(q - q0, rows_per_ct - used)
            cts[-1].append(Placement(b, q0, q0 + take, used))
            q0, used = q0 + take, used + take
    return cts if cts[0] else []


@dataclass
class PackedCt:
    """One ciphertext's rows as (rows, W) arrays, and the public slot vectors the circuits use."""

    placements: list[Placement]
    scores: np.ndarray  # (R, W) float64, 0 in padding
    mask: np.ndarray  # (R, W) float64, 1 for a valid key
    values: np.ndarray  # (R, W, D) float64: V of each row's block, 0 in padding

    @property
    def width(self) -> int:
        return self.scores.shape[1]

    @property
    def inv_n(self) -> np.ndarray:
        """(R, W): 1/n of each row broadcast over its slots; 0 for empty rows."""
        n = self.mask.sum(axis=1, keepdims=True)
        return np.broadcast_to(np.divide(1.0, n, out=np.zeros_like(n), where=n > 0), self.mask.shape)

    @property
    def first(self) -> np.ndarray:
        """(R, W): 1 on the first slot of each non-empty row (where a row total is gathered)."""
        e0 = np.zeros_like(self.mask)
        e0[:, 0] = self.mask.any(axis=1)
        return e0

    @staticmethod
    def slots(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float64).ravel()  # (R, W) -> (R*W,)


def pack(blocks: Sequence[Block], placements: list[Placement], rows: int, width: int, dim: int) -> PackedCt:
    """Lay the placed rows of ``blocks`` into one ciphertext's (rows, W) arrays."""
    scores, mask = np.zeros((rows, width)), np.zeros((rows, width))
    values = np.zeros((rows, width, dim))
    for p in placements:
        s, valid, v = blocks[p.block]
        k, rs = s.shape[1], slice(p.row, p.row + p.q1 - p.q0)
        scores[rs, :k] = np.where(valid, s[p.q0 : p.q1], 0.0)  # masked scores never enter the circuit
        mask[rs, :k] = valid
        values[rs, :k, : v.shape[1]] = v
    return PackedCt(placements, scores, mask, values)


def unpack(rows: np.ndarray, placements: list[Placement], blocks: Sequence[Block], out: list[np.ndarray], ncols) -> None:
    """Copy decrypted (R, W) rows back into the per-block arrays ``out`` (first ``ncols(b)`` columns)."""
    for p in placements:
        out[p.block][p.q0 : p.q1] = rows[p.row : p.row + p.q1 - p.q0, : ncols(p.block)]


