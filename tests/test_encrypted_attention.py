"""The encrypted-attention experiment end to end on a tiny BERT: one layer under CKKS, put back
into the plaintext model, predictions compared; skipped without the optional desilofhe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("desilofhe", reason='the optional FHE library is not installed (pip install -e ".[fhe]")')

from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.bert import build_model
from cgf_bert.store.checkpoint import save_checkpoint

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"


def test_encrypted_layer_matches_plaintext_predictions(tiny_bert, tiny_mrpc, tmp_path):
    student = save_checkpoint(tmp_path / "s.pt", build_model(str(tiny_bert), softmax_spec("cgf", coeff=0.5)), {"model": str(tiny_bert)})
    teacher = save_checkpoint(tmp_path / "t.pt", build_model(str(tiny_bert)), {"model": str(tiny_bert)})
    cmd = [sys.executable, "-m", "experiments.encrypted_attention", str(student), "--teacher", str(teacher), "--layer", "1",
           "--examples", "6", "--exact-examples", "2", "--poly", "6,-8,8,2", "--exact-poly", "4,-4,4,1", "--sum-bound", "2", "32", "--sum-bound", "64", "128",
           "--data-dir", str(tiny_mrpc), "--results-dir", str(tmp_path)]
    p = subprocess.run(cmd, cwd=FINETUNING, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (path,) = tmp_path.glob("fhe/encrypted_attention-*.json")
    rec = json.loads(path.read_text())
    cgf = rec["cgf"]
    assert rec["examples"] == 6 and cgf["predictions_vs_plaintext_cgf"] == {"same": 6, "of": 6, "max_logit_diff": pytest.approx(0, abs=1e-3)}
    assert cgf["circuit"]["errors"]["cgf_poly"]["probs_max"] < 1e-4 and cgf["circuit"]["depth_used"] > 0
    side = rec["side_by_side"]
    inside, below = side["exact"]  # a bound that holds the tiny model's row sums, and one above them all
    assert side["examples"] == 2 and inside["predictions_vs_plaintext_teacher"]["of"] == 2
    assert side["row_sums"]["min"] >= 2 and side["row_sums"]["max"] <= 32
    assert inside["circuit"]["errors"]["exact_circuit"]["probs_max"] < 1e-3 and inside["circuit"]["flagged"]["rows"] == 0
    assert below["circuit"]["flagged"]["sums_below"] == below["circuit"]["flagged"]["rows"] == side["row_sums"]["rows"]
    assert inside["circuit"]["depth_used"] > side["cgf"]["circuit"]["depth_used"]
    assert "predictions equal on 6/6" in p.stdout
