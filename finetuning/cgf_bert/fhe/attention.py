"""One attention layer's softmax and P @ V evaluated encrypted (or simulated): outputs, levels, times and errors."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from cgf_bert import CgfBertError
from cgf_bert.fhe.context import FheContext
from cgf_bert.fhe.ops import PV_DEPTH, FheOps, LevelledNumpyOps, times_values
from cgf_bert.fhe.packing import PackedCt, pack, plan_packing, unpack
from cgf_bert.model.layer_io import Block


@dataclass(frozen=True)
class Levels:
    """The levels of one ciphertext's scores, probabilities and outputs (every ciphertext of a run alike)."""

    scores: int
    probs: int
    out: int

    @property
    def softmax(self) -> int:
        """Levels the softmax circuit consumed (its kind declares ``spec.depth``)."""
        return self.scores - self.probs

    @property
    def pv(self) -> int:
        """Levels P @ V consumed (``PV_DEPTH``)."""
        return self.probs - self.out


@dataclass
class FheReport:
    """One encrypted evaluation: sizes, levels, times and errors against the references."""

    circuit: str  # the spec's label
    spec: dict  # the softmax spec the circuit evaluates (``Spec.to_json``)
    ring_size: int
    slots: int
    width: int
    blocks: int
    rows: int
    ciphertexts: int
    level_in: int
    level_probs: int
    level_out: int
    depth_declared: int  # the softmax kind's declared depth (spec.depth)
    depth_planned: int  # depth_declared + PV_DEPTH: the levels the layer needs
    keygen_s: float  # secret/public/relinearization keys (when the context was made)
    rotation_keygen_s: float  # rotation keys made during this evaluation (not in eval_s)
    rotation_keys: int  # held by the context
    key_bytes: int
    encrypt_s: float
    eval_s: float
    decrypt_s: float
    errors: dict = field(default_factory=dict)
    flagged: dict = field(default_factory=dict)

    @property
    def depth_used(self) -> int:
        return self.level_in - self.level_out

    @property
    def softmax_depth_used(self) -> int:
        return self.level_in - self.level_probs

    @property
    def total_s(self) -> float:
        return self.encrypt_s + self.eval_s + self.decrypt_s

    def as_dict(self) -> dict:
        return {**asdict(self), "depth_used": self.depth_used, "softmax_depth_used": self.softmax_depth_used,
                "total_s": self.total_s, "per_ct_s": self.eval_s / max(self.ciphertexts, 1), "per_row_s": self.eval_s / max(self.rows, 1)}

    def summary(self) -> str:
        d = self.as_dict()
        lines = [
            f"{self.circuit}: ring 2^{int(math.log2(self.ring_size))} ({self.slots} slots), W={self.width}, "
            f"{self.rows} rows in {self.blocks} blocks -> {self.ciphertexts} ciphertexts",
            f"  depth used {self.depth_used} (planned {self.depth_planned}: softmax {self.depth_declared} + P @ V "
            f"{PV_DEPTH}; levels {self.level_in} -> probs {self.level_probs} -> out {self.level_out})",
            f"  keygen {self.keygen_s:.1f} s + rotation keys {self.rotation_keygen_s:.1f} s ({self.rotation_keys} keys, "
            f"{self.key_bytes / 2**30:.2f} GiB of keys)",
            f"  time {self.total_s:.1f} s (encrypt {self.encrypt_s:.1f}, eval {self.eval_s:.1f}, decrypt {self.decrypt_s:.1f}); "
            f"eval {d['per_ct_s']:.2f} s/ciphertext, {1e3 * d['per_row_s']:.1f} ms/row",
        ]
        for ref, e in self.errors.items():
            lines.append(f"  vs {ref}: probs max {e['probs_max']:.2e} mean {e['probs_mean']:.2e} | "
                         f"outputs max {e['out_max']:.2e} mean {e['out_mean']:.2e} | masked max {e['masked_max']:.1e}")
        if self.flagged:
            lines.append(f"  out of bounds: {self.flagged}")
        return "\n".join(lines)


def check_blocks(blocks: Sequence[Block], width: int) -> list[Block]:
    """Validate shapes and cast to float64 / bool; every row needs a valid key and K <= W."""
    if width & (width - 1) or width < 2:
        raise CgfBertError(f"the row width must be a power of two >= 2, got {width}")
    out = []
    for i, (s, valid, v) in enumerate(blocks):
        s, valid, v = np.asarray(s, np.float64), np.asarray(valid, bool), np.asarray(v, np.float64)
        if s.ndim != 2 or valid.shape != (s.shape[1],) or v.ndim != 2 or v.shape[0] != s.shape[1]:
            raise CgfBertError(f"block {i}: need scores (Q, K), valid (K,), V (K, D); got {s.shape}, {valid.shape}, {v.shape}")
        if s.shape[1] > width or v.shape[1] > width or not valid.any():
            raise CgfBertError(f"block {i}: needs 1 <= valid keys, K <= W and D <= W (K={s.shape[1]}, D={v.shape[1]}, W={width})")
        out.append((s, valid, v))
    return out


def _run(ops, encrypt, decrypt, blocks, circuit, width, slots, progress):
    """Pack, encrypt, evaluate and decrypt every ciphertext: per-block outputs and probabilities,
    the number of ciphertexts, the (encrypt, eval, decrypt) times and the levels."""
    dim = max(v.shape[1] for _, _, v in blocks)
    plan = plan_packing([s.shape[0] for s, _, _ in blocks], slots // width)
    probs = [np.zeros(s.shape) for s, _, _ in blocks]  # (Q, K) each
    outs = [np.zeros((s.shape[0], v.shape[1])) for s, _, v in blocks]  # (Q, D) each
    times = np.zeros(3)  # encrypt, eval, decrypt
    levels = None
    for placements in tqdm(plan, desc=f"encrypted {circuit.name}", unit="ct", disable=not progress):
        pc = pack(blocks, placements, slots // width, width, dim)
        t0 = time.perf_counter()
        s = encrypt(PackedCt.slots(pc.scores))
        t1 = time.perf_counter()
        p = circuit.probs(ops, s, pc)  # holds prob_scale * p
        o = times_values(ops, p, pc.values / circuit.prob_scale)
        t2 = time.perf_counter()
        p_rows, o_rows = decrypt(p).reshape(-1, width) / circuit.prob_scale, decrypt(o).reshape(-1, width)  # (R, W)
        times += (t1 - t0, t2 - t1, time.perf_counter() - t2)
        levels = Levels(ops.level(s), ops.level(p), ops.level(o))
        unpack(p_rows, placements, blocks, probs, lambda b: blocks[b][0].shape[1])
        unpack(o_rows, placements, blocks, outs, lambda b: blocks[b][2].shape[1])
    return outs, probs, len(plan), times, levels


def simulate_attention(blocks: Sequence[Block], circuit, *, width: int = 128, slots: int = 16384, top: int | None = None):
    """The circuit on numpy slot vectors (no encryption) that count levels as CKKS does:
    ``(outputs, probabilities, levels)``, one array per block.

    Scores start at level ``top``, by default the levels a context made for the circuit has
    (``circuit.depth + PV_DEPTH``); a circuit deeper than that fails as it would under CKKS.
    """
    blocks = check_blocks(blocks, width)
    ops, top = LevelledNumpyOps(), circuit.depth + PV_DEPTH if top is None else top
    outs, probs, _, _, levels = _run(ops, lambda x: ops.encrypt(x, top), ops.decrypt, blocks, circuit, width, slots,
                                     progress=False)
    return outs, probs, levels


def encrypted_attention(blocks: Sequence[Block], circuit, *, ctx: FheContext | None = None, width: int = 128,
                        progress: bool = True, thread_count: int | None = None):
    """Encrypted softmax and P @ V of one layer: ``(outputs, probabilities, report)``.

    ``blocks``: one ``(scores (Q, K), valid (K,), V (K, D))`` per (example, head); rows of a
    block share its V. Returns decrypted outputs (Q, D) and probabilities (Q, K) per block,
    and an ``FheReport`` with levels, times, and errors against the plaintext references.
    ``circuit`` comes from ``circuits.circuit_for(spec)``; ``ctx`` defaults to the smallest context that holds it.
    """
    blocks = check_blocks(blocks, width)
    ctx = ctx or FheContext.for_circuits(circuit, thread_count=thread_count)
    if ctx.max_level < circuit.depth + PV_DEPTH:
        raise CgfBertError(f"softmax depth {circuit.depth} + P @ V {PV_DEPTH} > context max level {ctx.max_level} "
                           "(no bootstrapping)")
    if ctx.slots < width:
        raise CgfBertError(f"row width {width} > {ctx.slots} slots")
    keygen0 = ctx.rotation_keygen_s
    outs, probs, n_ct, times, levels = _run(FheOps(ctx), ctx.encrypt, ctx.decrypt, blocks, circuit, width, ctx.slots,
                                            progress)
    report = FheReport(
        circuit=circuit.spec.label(), spec=circuit.spec.to_json(), ring_size=ctx.ring_size, slots=ctx.slots,
        width=width, blocks=len(blocks), rows=sum(s.shape[0] for s, _, _ in blocks), ciphertexts=n_ct,
        level_in=levels.scores, level_probs=levels.probs, level_out=levels.out, depth_declared=circuit.depth,
        depth_planned=circuit.depth + PV_DEPTH,
        keygen_s=ctx.keygen_s, rotation_keygen_s=ctx.rotation_keygen_s - keygen0,
        rotation_keys=ctx.rotation_key_count, key_bytes=ctx.key_bytes,
        encrypt_s=times[0], eval_s=times[1] - (ctx.rotation_keygen_s - keygen0), decrypt_s=times[2],
    )
    report.errors, report.flagged = attention_errors(blocks, outs, probs, circuit)
    return outs, probs, report


def _stats(dp: list[np.ndarray], do: list[np.ndarray], valid: list[np.ndarray]) -> dict:
    """Max and mean |error| of probabilities (valid keys), outputs, and max |p| on masked keys."""
    pv = np.concatenate([d[:, m].ravel() for d, m in zip(dp, valid)] or [np.zeros(0)])
    pm = np.concatenate([d[:, ~m].ravel() for d, m in zip(dp, valid)] or [np.zeros(0)])
    ov = np.concatenate([d.ravel() for d in do] or [np.zeros(0)])
    f = lambda a, op: float(op(a)) if a.size else 0.0  # noqa: E731
    return {"probs_max": f(pv, np.max), "probs_mean": f(pv, np.mean), "out_max": f(ov, np.max),
            "out_mean": f(ov, np.mean), "masked_max": f(pm, np.max)}


def attention_errors(blocks: Sequence[Block], outs, probs, circuit) -> tuple[dict, dict]:
    """Errors of (outputs, probabilities) per reference, and on the rows outside the circuit's bounds.

    ``errors[ref]`` has ``probs_max/probs_mean`` (valid keys), ``out_max/out_mean`` and
    ``masked_max`` (largest |p| on a masked key). ``flagged`` counts the rows the plaintext
    reference puts outside the bounds (polynomial interval; for the exact circuit also the
    row-sum bound) and the error on them against ``exact``: of the decrypted result and of the
    plaintext circuit (the error the bound violation itself causes), so it is never hidden.
    """
    refs = [circuit.references(s, m) for s, m, _ in blocks]  # per block {name: (Q, K)}
    valid = [m for _, m, _ in blocks]
    errors = {}
    for name in refs[0]:
        dp = [np.abs(p - r[name]) for p, r in zip(probs, refs)]
        do = [np.abs(o - r[name] @ v) for o, r, (_, _, v) in zip(outs, refs, blocks)]
        errors[name] = _stats(dp, do, valid)
    flags = [circuit.flagged_rows(s, m) for s, m, _ in blocks]
    rows = [f for f, _ in flags]
    flagged = {"rows": int(sum(r.sum() for r in rows))}
    for _, counts in flags:
        for k, c in counts.items():
            flagged[k] = flagged.get(k, 0) + c
    if flagged["rows"]:
        own = [r[next(iter(r))] for r in refs]  # references() lists the plaintext circuit first
        others = [~f for f in rows]  # an overflow in a flagged row would spoil its whole ciphertext
        for label, got, sel in (("encrypted", probs, rows), ("plaintext_circuit", own, rows),
                                ("encrypted_other_rows", probs, others)):
            err = [np.abs(g - r["exact"])[f][:, m] for g, r, f, m in zip(got, refs, sel, valid)]
            flagged[f"{label}_vs_exact_max"] = float(max((e.max() for e in err if e.size), default=0.0))
    return errors, flagged


