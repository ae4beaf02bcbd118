"""The polynomial_student experiment end to end on a tiny BERT (swap at eval, no training)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from cgf_bert.approx.approximations import Approximations, layer_depth
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.approx.spec import Spec
from cgf_bert.model.bert import build_model
from cgf_bert.store.checkpoint import save_checkpoint


def test_layer_depth_adds_the_declared_depths():
    full = Approximations(softmax=softmax_spec("cgf_poly"), gelu=Spec.make("gelu", "quad"),
                          layernorm=Spec.make("layernorm", "ln_affine"), pooler=Spec.make("pooler", "tanh_poly"))
    d = layer_depth(full, 0)
    assert d == {"attention": 4 + 3 + 4 + 8, "layernorm": 2, "feed_forward": 2 + 1, "layer": 19 + 3 + 2 * 2}
    assert layer_depth(Approximations(), 0)["layer"] is None  # exact ops are not polynomial


def test_polynomial_student_swaps_every_op_and_records_it(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    from experiments import polynomial_student

    torch.manual_seed(0)
    paths = {}
    for name, approx in (("teacher", Approximations()), ("student", Approximations(softmax=softmax_spec("cgf")))):
        paths[name] = save_checkpoint(tmp_path / f"{name}.pt", build_model(str(tiny_bert), approx), {"model": str(tiny_bert), "seed": 0})
    monkeypatch.setattr(sys, "argv", ["polynomial_student.py", str(paths["teacher"]), str(paths["student"]), "--teacher", str(paths["teacher"]),
                                      "--data-dir", str(tiny_mrpc), "--calibrate-examples", "16", "--forms", "4:64", "16:128",
                                      "--results-dir", str(tmp_path)])
    polynomial_student.main()
    (record,) = tmp_path.glob("experiments/polynomial_student-*.json")
    rec = json.loads(record.read_text())
    student = next(v for k, v in rec["checkpoints"].items() if k.endswith("student.pt"))["rows"]
    labels = [r["label"] for r in student]
    assert labels[0] == "cgf c=0.5" and labels[1].startswith("cgf_poly c=0.5") and len(student) == 11
    assert student[0]["agreement"] == 1.0 and student[0]["layer_depth"] is None
    assert student[-4]["layer_depth"] is not None and student[-3]["layer_depth"] < student[-4]["layer_depth"]  # ln_affine is shallower
    forms = student[-2:]  # the circuit's form: every op polynomial, on intervals measured per layer
    assert [f["form"] for f in forms] == [{"calibrate_examples": 4, "max_tokens": 64}, {"calibrate_examples": 16, "max_tokens": 128}]
    for f in forms:
        assert f["layer_depth"] is not None and f["out_of_range"]["entries"] > 0
        assert {f["approx"][op]["name"] for op in ("softmax", "gelu", "layernorm", "pooler")} == {"cgf_poly", "gelu_poly", "ln_poly", "tanh_poly"}
    teacher = next(v for k, v in rec["checkpoints"].items() if k.endswith("teacher.pt"))["rows"]
    assert teacher[1]["label"].startswith("exact_poly")  # the exact softmax's polynomial form
    assert len(rec["ln_variances"]) == 2 and all(v["attention"] > 0 for v in rec["ln_variances"])
    assert "fully" not in capsys.readouterr().err


def test_forms_option_is_checked_before_any_work(tiny_mrpc, tmp_path, monkeypatch, capsys):
    from experiments import polynomial_student

    monkeypatch.setattr(sys, "argv", ["polynomial_student.py", str(tmp_path / "missing.pt"), "--forms", "8-32"])
    with pytest.raises(SystemExit):
        polynomial_student.main()
    assert "expected COUNT:TOKENS" in capsys.readouterr().err
