"""Real-data checks: the embedded MiniLM BERT on the real MRPC files (minutes on a CPU).

Selected on purpose: ``pytest -m real``.
"""

import json

import pytest
from test_scripts import run

pytestmark = pytest.mark.real


def test_one_epoch_of_the_embedded_model_learns_mrpc(tmp_path):
    ckpt = tmp_path / "real.pt"
    # About 5 minutes on an idle 2-core CPU; the limit leaves room for a busy machine.
    run("finetune.py", "--epochs", 1, "--seed", 42, "-o", ckpt, "--results-dir", tmp_path, timeout=3600)
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert rec["best"]["accuracy"] >= 0.70  # majority class is 0.684; one epoch reached 0.7475 here
    assert len(rec["test_predictions"]) == 1725
    r = json.loads(run("validate.py", ckpt, "--json", "--results-dir", tmp_path).stdout)
    assert r["dev"]["accuracy"] == rec["best"]["accuracy"] and r["dev"]["f1"] == rec["best"]["f1"]
    cgf = json.loads(run("validate.py", ckpt, "--softmax", "cgf", "--coeff", "0.6", "--json", "--results-dir", tmp_path).stdout)
    # Swapped at eval, CGF costs accuracy but keeps most of it (the 5-epoch teacher: 81.86 -> 75.00 at c=0.6);
    # a broken swap (nan scores, an all-one-class model) lands at or below the majority rate 0.684.
    assert cgf["label"] == "cgf c=0.6" and cgf["dev"]["accuracy"] >= 0.69


def test_compile_flag_trains_a_tiny_model_with_unchanged_checkpoint_keys(tiny_bert, tiny_mrpc, tmp_path):
    """``--compile`` (torch.compile, dynamic shapes). In the real set because inductor compiles
    C++ kernels: on a 2-core CPU the first compile took about 10 minutes."""
    ckpt = tmp_path / "c.pt"
    run("finetune.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--batch-size", 8, "--softmax", "cgf",
        "--compile", "-o", ckpt, "--results-dir", tmp_path, timeout=3600)
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert rec["config"]["compile"] is True
    # The checkpoint loads into an uncompiled model and scores the same.
    r = json.loads(run("validate.py", ckpt, "--data-dir", tiny_mrpc, "--json", "--results-dir", tmp_path).stdout)
    assert r["dev"]["accuracy"] == rec["best"]["accuracy"]
