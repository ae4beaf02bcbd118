"""The benchmark suite end to end on a tiny BERT and tiny MRPC (seconds): every table, ratios consistent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    sdpa = {r["length"]: r for r in rec["attention"] if r["variant"] == "sdpa exact"}
    for r in rec["attention"]:  # each ratio is this row's time over the sdpa row's of the same length
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["fwd_vs_sdpa"] == pytest.approx(r["fwd_ms"] / sdpa[r["length"]]["fwd_ms"])
        assert r["fwd_bwd_vs_sdpa"] == pytest.approx(r["fwd_bwd_ms"] / sdpa[r["length"]]["fwd_bwd_ms"])
    modes = {r["mode"]: r for r in rec["steps"]}
    assert set(modes) == {"ce", "kd", "kd-cached"}
    for r in modes.values():
        assert r["step_vs_ce"] == pytest.approx(r["ms_per_step"] / modes["ce"]["ms_per_step"])
        assert r["memory_vs_ce"] == pytest.approx(r["peak_memory_mb"] / modes["ce"]["peak_memory_mb"])
    for r in rec["trainer"]:  # our default loop's throughput over each runner's
        assert r["ours_vs_this"] == pytest.approx(rec["trainer"][0]["examples_per_s"] / r["examples_per_s"])
    # summary.md's benchmark tables render from the record with the columns it names
    text = render("<!-- table:bench_steps -->\n<!-- /table -->", [{**rec, "_path": f"results/benchmarks/{path.name}"}])
    assert "| " + " | ".join(rec["columns"]["steps"]) + " |" in text
    assert modes["kd-cached"]["teacher_cache_seconds"] > 0 and modes["ce"]["teacher_cache_seconds"] is None
    assert all(r["peak_memory_mb"] > 0 for r in rec["steps"])
    prec = {r["precision"]: r for r in rec["precision"]}  # the same job at each precision
    assert set(prec) == {"fp32", "bf16"} and prec["fp32"]["native"] and prec["fp32"]["speedup_vs_fp32"] == 1.0
    assert prec["bf16"]["speedup_vs_fp32"] == pytest.approx(prec["fp32"]["ms_per_step"] / prec["bf16"]["ms_per_step"])
    assert all(r["ms_per_step"] > 0 and r["examples"] == 48 for r in rec["precision"])
