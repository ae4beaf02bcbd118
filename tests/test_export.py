"""export.py: a student as a transformers folder that plain transformers loads (after ``import
cgf_bert``) with the same logits, specs and tokenizer, a model card whose figures are the record's,
and a folder this toolkit reads as a checkpoint and as a base model."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from cgf_bert.data.loader import load_tokenizer
from cgf_bert.model.attention import self_attentions
from cgf_bert.store.checkpoint import load_model
from conftest import FINETUNING, run_script
from transformers import AutoModelForSequenceClassification, AutoTokenizer

STUDENT = ("--softmax", "cgf", "--coeff", "0.6", "--softmax-layers", "1=exact", "--gelu", "gelu_poly", "--pooler", "tanh_poly")


def _run(script, *args):
    p = subprocess.run([sys.executable, script, *map(str, args)], cwd=FINETUNING, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def exported(tiny_bert, tiny_mrpc, tmp_path_factory):
    """A per-layer student and the exact fine-tune of its seed, trained; the student exported (each a process)."""
    root = tmp_path_factory.mktemp("export")
    results = root / "results"
    common = ("--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--batch-size", 8, "--seed", 3, "--results-dir", results)
    _run("finetune.py", *common, "-o", root / "exact.pt")
    _run("finetune.py", *common, "-o", root / "student.pt", *STUDENT)
    out = _run("export.py", root / "student.pt", root / "hf", "--results-dir", results, "--verify", "--data-dir", tiny_mrpc)
    assert "exported" in out and "the same" in out, out  # plain transformers in a fresh process: the checkpoint's dev accuracy
    (check,) = (results / "export").glob("export-*.json")
    assert json.loads(check.read_text())["same_accuracy"] is True
    return root / "student.pt", root / "hf", results


def _batch(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    return tok(["the cat sat on the mat", "a big red car ran"], ["the dog sat under it", "the small blue house today quickly"],
               padding=True, return_tensors="pt")


def test_plain_transformers_gives_the_checkpoints_logits_and_specs(exported, tiny_bert):
    ckpt, folder, _ = exported
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ours, meta = load_model(ckpt)
    b = _batch(folder)
    with torch.no_grad():
        got = hf(**b).logits
        want = ours.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])["logits"]
    assert (got - want).abs().max() <= 1e-5
    assert [m.softmax_spec.label() for m in self_attentions(hf.bert)] == ["cgf c=0.6", "exact"]
    assert type(hf.bert.encoder.layer[0].intermediate.intermediate_act_fn).__name__ == "Activation"
    assert hf.bert.pooler.activation.spec.name == "tanh_poly"
    assert hf.config.cgf_bert["approx"] == meta["approx"].to_json()
    # the tokenizer travels: the same ids as the base model's own
    base = load_tokenizer(str(tiny_bert))("the cat sat on the mat", "the dog sat under it")["input_ids"]
    assert AutoTokenizer.from_pretrained(folder)("the cat sat on the mat", "the dog sat under it")["input_ids"] == base


def test_without_the_import_transformers_refuses_the_folder(exported):
    _, folder, _ = exported
    code = f"from transformers import AutoModelForSequenceClassification as A; A.from_pretrained({str(folder)!r})"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "cgf_bert" in p.stderr


def test_the_model_card_gives_the_records_figures(exported):
    ckpt, folder, results = exported
    recs = [json.loads(p.read_text()) for p in results.glob("*.json")]
    student = next(r for r in recs if r["checkpoint"].endswith("student.pt"))
    exact = next(r for r in recs if r["checkpoint"].endswith("exact.pt"))
    card = (folder / "README.md").read_text()
    acc, f1 = map(float, re.search(r"accuracy ([\d.]+), F1 ([\d.]+)", card).groups())
    assert (acc, f1) == (round(100 * student["best"]["accuracy"], 2), round(100 * student["best"]["f1"], 2))
    diff = float(re.search(r"paired difference ([+-][\d.]+) points", card).group(1))
    assert diff == round(100 * (student["best"]["accuracy"] - exact["best"]["accuracy"]), 2)
    assert "cgf c=0.6, layer 1 exact" in card and "tanh_poly" in card and student["code_version"] in card
    assert "seed 3" in card and student["command"] in card


def test_the_folder_is_a_checkpoint_and_a_base_model(exported, tiny_mrpc, tmp_path, monkeypatch, capsys):
    ckpt, folder, _ = exported
    scores = []
    for path in (ckpt, folder):
        code, out, err = run_script(monkeypatch, capsys, "validate.py", path, "--data-dir", tiny_mrpc, "--json", "--results-dir", tmp_path)
        assert code == 0, err
        scores.append(json.loads(out))
    assert scores[0]["dev"] == scores[1]["dev"] and scores[0]["label"] == scores[1]["label"]
    code, _, err = run_script(monkeypatch, capsys, "finetune.py", "--model", folder, "--data-dir", tiny_mrpc, "--epochs", 1,
                              "--batch-size", 8, "-o", tmp_path / "again.pt", "--results-dir", tmp_path / "r")
    assert code == 0, err


def test_bad_targets_are_refused_before_any_work(exported, tmp_path, monkeypatch, capsys):
    ckpt, folder, _ = exported
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [((ckpt, busy), "not empty"), ((ckpt, blocker / "out"), "cannot be created"),
             ((tmp_path / "missing.pt", tmp_path / "new"), "checkpoint not found")]
    for (src, out), needle in cases:
        code, _, err = run_script(monkeypatch, capsys, "export.py", src, out)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "file"]  # no temp folder left behind


def test_overwrite_replaces_only_an_earlier_export(exported, tmp_path, monkeypatch, capsys):
    ckpt, folder, results = exported
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("mine")
    code, _, err = run_script(monkeypatch, capsys, "export.py", ckpt, precious, "--overwrite")
    assert code == 2 and "only an earlier export" in err and (precious / "data.txt").read_text() == "mine"
    code, _, err = run_script(monkeypatch, capsys, "export.py", ckpt, ckpt.parent, "--overwrite")  # holds the checkpoint
    assert code == 2 and ckpt.is_file()
    again = tmp_path / "again"
    for _ in range(2):  # an export over an export
        code, _, err = run_script(monkeypatch, capsys, "export.py", ckpt, again, "--overwrite", "--results-dir", results)
        assert code == 0, err
    assert (again / "config.json").is_file()


def test_a_broken_folder_is_one_clear_error(exported, tmp_path):
    from cgf_bert import CgfBertError
    from cgf_bert.store.checkpoint import read_checkpoint

    _, folder, _ = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CgfBertError, match="model.safetensors is not readable"):
        read_checkpoint(broken)
    (broken / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CgfBertError, match="not an exported cgf-bert student"):
        read_checkpoint(broken)
    (broken / "config.json").write_text("[1, 2]")
    with pytest.raises(CgfBertError, match="not an exported"):
        read_checkpoint(broken)


def test_an_exported_teacher_teaches(exported, tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    """--teacher FOLDER: an exported exact model is accepted as the teacher of a student of its base model."""
    ckpt, _, results = exported
    exact = ckpt.parent / "exact.pt"
    code, _, err = run_script(monkeypatch, capsys, "export.py", exact, tmp_path / "teacher", "--results-dir", results)
    assert code == 0, err
    code, _, err = run_script(monkeypatch, capsys, "distill.py", "--model", tiny_bert, "--teacher", tmp_path / "teacher", "--data-dir", tiny_mrpc,
                              "--epochs", 1, "--batch-size", 8, "--seeds", 3, "--results-dir", tmp_path / "r", "-o", tmp_path / "s.pt")
    assert code == 0, err
