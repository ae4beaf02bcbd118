"""The encrypted-attention experiment on a tiny BERT: checkpoints without a circuit and a missing
desilofhe refused in one line (numpy only), then one layer under CKKS end to end, put back into
the plaintext model, predictions compared (skipped without the optional desilofhe)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.cli import run_main
from cgf_bert.model.bert import build_model
from cgf_bert.store.checkpoint import save_checkpoint

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"
needs_fhe = pytest.mark.skipif(importlib.util.find_spec("desilofhe") is None,
                               reason="the FHE extra is not installed (pip install -e '.[fhe]')")


def checkpoint(tiny_bert, path: Path, spec=None) -> Path:
    """A checkpoint of the tiny BERT with softmax ``spec`` (exact by default)."""
    model = build_model(str(tiny_bert), spec) if spec is not None else build_model(str(tiny_bert))
    return save_checkpoint(path, model, {"model": str(tiny_bert)})


def run_in_process(monkeypatch, capsys, *argv):
    """The experiment's main under run_main, in this process: (exit code, stderr)."""
    from experiments import encrypted_attention

    monkeypatch.setattr(sys, "argv", ["encrypted_attention.py", *map(str, argv)])
    code = 0
    try:
        run_main(encrypted_attention.main)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("student,teacher,says", [
    (softmax_spec("quad2"), None, "s.pt: softmax 2quad c=5 has no polynomial form"),
    (softmax_spec("cgf", layers={1: softmax_spec("relu_n")}), None, "s.pt: softmax relu_n has no polynomial form"),
    (softmax_spec("cgf"), softmax_spec("cgf"), "t.pt runs cgf c=0.5, not the exact softmax"),
], ids=["no-polynomial-form", "layer-without-one", "teacher-not-exact"])
def test_a_checkpoint_without_a_circuit_is_refused_in_one_line(tiny_bert, tmp_path, monkeypatch, capsys, student, teacher, says):
    args = [checkpoint(tiny_bert, tmp_path / "s.pt", student), "--layer", "1", "--results-dir", tmp_path]
    if teacher is not None:
        args += ["--teacher", checkpoint(tiny_bert, tmp_path / "t.pt", teacher)]
    code, err = run_in_process(monkeypatch, capsys, *args)
    assert code == 2 and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "fhe").exists()


def test_without_desilofhe_the_experiment_says_how_to_install_it(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "desilofhe", None)  # import desilofhe raises ImportError
    student = checkpoint(tiny_bert, tmp_path / "s.pt", softmax_spec("cgf"))
    code, err = run_in_process(monkeypatch, capsys, student, "--results-dir", tmp_path)
    assert code == 2 and 'pip install -e ".[fhe]"' in err and err.count("\n") == 1, err


@needs_fhe
def test_encrypted_layer_matches_plaintext_predictions(tiny_bert, tiny_mrpc, tmp_path):
    student = checkpoint(tiny_bert, tmp_path / "s.pt", softmax_spec("cgf", coeff=0.5))
    teacher = checkpoint(tiny_bert, tmp_path / "t.pt")
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
    # The circuits come from the checkpoints' specs: the student's polynomial form, the teacher's with each sum bound.
    circuit_spec = softmax_spec("cgf", coeff=0.5).with_polynomial(PolyExp(6, -8.0, 8.0, 2))
    assert cgf["per_width"][0]["spec"] == circuit_spec.to_json()
    assert cgf["circuit"]["depth_used"] == circuit_spec.depth + 1  # + P @ V
    side = rec["side_by_side"]
    inside, below = side["exact"]  # a bound that holds the tiny model's row sums, and one above them all
    assert [e["per_width"][0]["spec"]["name"] for e in side["exact"]] == ["exact_poly", "exact_poly"]
    assert [(e["per_width"][0]["spec"]["sum_lo"], e["per_width"][0]["spec"]["sum_hi"]) for e in side["exact"]] == [(2, 32), (64, 128)]
    assert side["examples"] == 2 and inside["predictions_vs_plaintext_teacher"]["of"] == 2
    assert side["row_sums"]["min"] >= 2 and side["row_sums"]["max"] <= 32
    assert inside["circuit"]["errors"]["exact_circuit"]["probs_max"] < 1e-3 and inside["circuit"]["flagged"]["rows"] == 0
    assert below["circuit"]["flagged"]["sums_below"] == below["circuit"]["flagged"]["rows"] == side["row_sums"]["rows"]
    assert inside["circuit"]["depth_used"] > side["cgf"]["circuit"]["depth_used"]
    assert "predictions equal on 6/6" in p.stdout



def test_the_exp_interval_is_fitted_to_the_measured_arguments():
    from experiments.encrypted_attention import fitted_poly

    assert fitted_poly(np.array([-196.3, 0.0, 12.9])) == PolyExp(8, -256.0, 16.0, 8)  # layer 0's range: cgf_poly's default
    assert fitted_poly(np.array([-21.6, 7.7])) == PolyExp(8, -32.0, 16.0, 5)  # 5 % of margin: 7.7 -> 8.1 -> 16
    assert fitted_poly(np.array([-0.1, 0.1])) == PolyExp(8, -8.0, 2.0, 3)  # at least [-8, 2]


@needs_fhe
def test_a_given_interval_the_arguments_leave_is_refused_before_any_encryption(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    student = checkpoint(tiny_bert, tmp_path / "s.pt", softmax_spec("cgf"))
    code, err = run_in_process(monkeypatch, capsys, student, "--poly", "4,-0.001,0.001,0", "--examples", "4",
                               "--data-dir", tiny_mrpc, "--results-dir", tmp_path)
    assert code == 2 and "--poly 4,-0.001,0.001,0" in err and "fall outside" in err and err.count("\n") == 1, err
    assert not (tmp_path / "fhe").exists()
