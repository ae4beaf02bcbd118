"""The benchmark suite end to end on a tiny BERT and tiny MRPC (seconds): every table and its
record; and, in this process, what its figures rest on: the timed attention variants compute
the same layer, the step clock skips its warm-up, and each ratio is taken against the right row
(checked on timings set here, with the quotients worked out by hand)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from cgf_bert.report.summary import render

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"


def test_benchmarks_run_and_write_a_record(tiny_bert, tiny_mrpc, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "benchmarks", "--model", str(tiny_bert), "--data-dir", str(tiny_mrpc), "--lengths", "8", "16",
           "--examples", "96", "--min-run-time", "0.01", "--results-dir", str(tmp_path)]
    p = subprocess.run(cmd, cwd=FINETUNING, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for heading in ("## trainer", "## attention", "## steps", "## precision"):
        assert heading in p.stdout
    (path,) = tmp_path.glob("bench-*.json")
    rec = json.loads(path.read_text())
    assert rec["device"].startswith("cpu") and rec["code_version"]
    assert [r["runner"].split(" (")[0] for r in rec["trainer"]] == ["fit", "fit", "HF Trainer", "HF Trainer"]
    assert all(r["examples_per_s"] > 0 for r in rec["trainer"]) and rec["trainer"][0]["ours_vs_this"] == 1.0
    assert {(r["length"], r["variant"]) for r in rec["attention"]} == {
        (n, v) for n in (8, 16) for v in ("eager exact", "sdpa exact", "ours exact", "ours cgf")}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rec["attention"])
    assert {r["fwd_vs_sdpa"] for r in rec["attention"] if r["variant"] == "sdpa exact"} == {1.0}
    modes = {r["mode"]: r for r in rec["steps"]}
    assert set(modes) == {"ce", "kd", "kd-cached"} and modes["ce"]["step_vs_ce"] == modes["ce"]["memory_vs_ce"] == 1.0
    # summary.md's benchmark tables render from the record with the columns it names
    text = render("<!-- table:bench_steps -->\n<!-- /table -->", [{**rec, "_path": f"results/benchmarks/{path.name}"}])
    assert "| " + " | ".join(rec["columns"]["steps"]) + " |" in text
    assert modes["kd-cached"]["teacher_cache_seconds"] > 0 and modes["ce"]["teacher_cache_seconds"] is None
    assert all(r["peak_memory_mb"] > 0 for r in rec["steps"])
    prec = {r["precision"]: r for r in rec["precision"]}  # the same job at each precision
    assert set(prec) == {"fp32", "bf16"} and prec["fp32"]["native"] and prec["fp32"]["speedup_vs_fp32"] == 1.0
    assert all(r["ms_per_step"] > 0 and r["examples"] == 48 for r in rec["precision"])


# ---------------------------------------------------------------- in this process


def test_the_timed_attention_variants_compute_the_same_layer(tiny_bert):
    """eager, sdpa and our exact attention: one function on one set of weights; ours with CGF another."""
    from benchmarks.attention import VARIANTS, one_layer_berts, padded_batch

    berts = one_layer_berts(str(tiny_bert), torch.device("cpu"))
    assert list(berts) == [label for label, _, _ in VARIANTS]
    state = berts["sdpa exact"].state_dict()
    assert all(m.state_dict().keys() == state.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
               for m in berts.values())
    assert [m.config._attn_implementation for m in berts.values()] == ["eager", "sdpa", "cgf_bert", "cgf_bert"]
    ids, mask = padded_batch(4, 12, berts["sdpa exact"].config.vocab_size, torch.device("cpu"))
    assert mask.sum(1).tolist() == [6, 8, 10, 12] and (ids >= 5).all()  # half to all of the length; no special tokens
    with torch.no_grad():
        for m in berts.values():  # the same sharpening in each: scores far from uniform, where CGF and softmax part
            m.encoder.layer[0].attention.self.query.weight *= 20
            m.encoder.layer[0].attention.self.key.weight *= 20
        out = {label: m.eval()(input_ids=ids, attention_mask=mask).last_hidden_state for label, m in berts.items()}
    valid = mask.bool()  # (B, T): padded positions' outputs are never used
    for label in ("eager exact", "ours exact"):
        torch.testing.assert_close(out[label][valid], out["sdpa exact"][valid], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["ours cgf"][valid], out["sdpa exact"][valid], atol=1e-4)


def test_the_step_clock_skips_its_warm_up_steps():
    from benchmarks.trainer import WARMUP_STEPS, StepClock

    from cgf_bert import CgfBertError

    clock = StepClock()
    clock.times = [0.0, 5.0, 9.0, 10.0, 10.5, 12.0]  # step starts; the first WARMUP_STEPS (3) are slow
    assert WARMUP_STEPS == 3 and clock.examples_per_second(16) == pytest.approx(2 * 16 / 2.0)  # steps 4 to 6
    clock.times = [0.0, 4.0]  # a smoke run: one interval is kept
    assert clock.examples_per_second(8) == pytest.approx(8 / 4.0)
    clock.times = [1.0]
    with pytest.raises(CgfBertError, match="too few to time"):
        clock.examples_per_second(8)


def test_attention_ratios_are_over_the_sdpa_row_of_the_same_length(tiny_bert, monkeypatch):
    from benchmarks import attention

    calls = iter(range(1, 17))  # timings in call order: per length, per variant, forward then forward+backward
    monkeypatch.setattr(attention, "median_seconds", lambda fn, min_run_time: next(calls) / 1000)
    rows = attention.run(str(tiny_bert), torch.device("cpu"), lengths=(8, 16), batch=2)
    assert [(r["length"], r["variant"]) for r in rows] == [(n, label) for n in (8, 16) for label, _, _ in attention.VARIANTS]
    got = [(r["fwd_ms"], r["fwd_bwd_ms"], r["fwd_vs_sdpa"], r["fwd_bwd_vs_sdpa"]) for r in rows]
    expected = [  # eager, sdpa, ours exact, ours cgf at length 8, then at 16; sdpa's times are (3, 4), then (11, 12)
        (1, 2, 1 / 3, 2 / 4), (3, 4, 1, 1), (5, 6, 5 / 3, 6 / 4), (7, 8, 7 / 3, 8 / 4),
        (9, 10, 9 / 11, 10 / 12), (11, 12, 1, 1), (13, 14, 13 / 11, 14 / 12), (15, 16, 15 / 11, 16 / 12)]
    assert [pytest.approx(e) == g for e, g in zip(expected, got)] == [True] * 8, got


class Split(list):
    """Stands in for a datasets split: ``shuffle`` and ``select`` as the benchmarks call them."""

    def shuffle(self, seed):
        return self

    def select(self, indices):
        return Split(self[i] for i in indices)


def test_trainer_step_and_precision_ratios_against_the_right_row(monkeypatch):
    from benchmarks import precision, steps, trainer

    speed = {("ours", True): 100.0, ("ours", False): 80.0, ("hf", False): 50.0, ("hf", True): 40.0}  # examples/s
    monkeypatch.setattr(trainer, "ours", lambda m, t, tok, d, bs, grouped: speed["ours", grouped])
    monkeypatch.setattr(trainer, "hf_trainer", lambda m, t, tok, d, bs, grouped: speed["hf", grouped])
    data = {"train": Split(range(20))}
    rows = trainer.run("m", data, None, torch.device("cpu"), examples=16)
    assert [r["ours_vs_this"] for r in rows] == pytest.approx([1.0, 1.25, 2.0, 2.5])  # ours, default loop, over each
    assert [r["examples"] for r in rows] == [16] * 4

    per_mode = {"ce": (10.0, 100.0), "kd": (25.0, 300.0), "kd-cached": (12.0, 150.0)}  # ms per step, peak MB
    commands = []

    def fake_process(cmd, **kw):  # each mode in a process of its own, told its mode
        commands.append(cmd)
        ms, mb = per_mode[cmd[cmd.index("--mode") + 1]]
        return types.SimpleNamespace(returncode=0, stdout=json.dumps({"mode": cmd[cmd.index("--mode") + 1], "ms_per_step": ms, "peak_memory_mb": mb}))

    monkeypatch.setattr(steps.subprocess, "run", fake_process)
    rows = steps.run("m", torch.device("cpu"), examples=8)
    assert [c[2] for c in commands] == ["benchmarks.steps"] * 3 and [r["mode"] for r in rows] == ["ce", "kd", "kd-cached"]
    assert [r["step_vs_ce"] for r in rows] == pytest.approx([1, 2.5, 1.2]) and [r["memory_vs_ce"] for r in rows] == pytest.approx([1, 3, 1.5])

    monkeypatch.setattr(precision, "measure", lambda m, t, tok, d, p, bs: {"precision": p, "ms_per_step": {"fp32": 10.0, "bf16": 4.0}[p]})
    rows = precision.run("m", data, None, torch.device("cpu"), examples=16)
    assert [(r["precision"], r["speedup_vs_fp32"]) for r in rows] == [("fp32", 1.0), ("bf16", 2.5)]
