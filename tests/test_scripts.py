"""Each step script end to end on a tiny random BERT and a tiny MRPC folder (seconds), and
bad input: one line on stderr, non-zero exit, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_mrpc

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"


def run(script, *args, check=True, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run([sys.executable, script, *map(str, args)], cwd=FINETUNING, capture_output=True, text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def trained(tiny_bert, tiny_mrpc, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    ckpt = out / "tiny.pt"
    p = run("finetune.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 2, "--batch-size", 8,
            "--softmax", "cgf", "--coeff", 0.65, "--seed", 5, "-o", ckpt, "--results-dir", out / "results")
    return ckpt, out / "results", p.stdout


def test_finetune_writes_checkpoint_and_record(trained, tiny_mrpc):
    ckpt, results, stdout = trained
    assert ckpt.is_file() and "best epoch" in stdout
    (record_path,) = results.glob("*.json")
    rec = json.loads(record_path.read_text())
    assert rec["config"]["approx"]["softmax"] == {"name": "cgf", "coeff": 0.65} and rec["seed"] == 5 and "-finetune-cgf0.65-s5" in rec["name"]
    assert [e["epoch"] for e in rec["epochs"]] == [1, 2]
    assert rec["best"] == max((e["dev"] for e in rec["epochs"]), key=lambda d: d["accuracy"])
    assert sorted(map(int, rec["test_predictions"])) == list(range(10))
    assert set(rec["test_predictions"].values()) <= {0, 1}
    assert rec["command"].startswith("finetune.py") and rec["wall_seconds"] > 0 and rec["code_version"]
    # where it ran, down to what changes float results: the CPU's vector ISA and the thread count
    assert rec["device"].startswith("cpu: ") and f"({torch.backends.cpu.get_cpu_capability()})" in rec["device"]
    assert rec["device"].endswith(f"{torch.get_num_threads()} threads")
    assert len((results / f"{rec['name']}.metrics.jsonl").read_text().splitlines()) == 2


def test_validate_reproduces_training_accuracy_exactly(trained, tiny_mrpc):
    ckpt, results, _ = trained
    rec = json.loads(next(results.glob("*.json")).read_text())
    r = json.loads(run("validate.py", ckpt, "--data-dir", tiny_mrpc, "--json", "--results-dir", results).stdout)
    assert r["approx"]["softmax"] == {"name": "cgf", "coeff": 0.65} and r["label"] == "cgf c=0.65"
    (vrec,) = (results / "validate").glob("*.json")
    assert json.loads(vrec.read_text())["dev"] == r["dev"]
    assert r["dev"]["accuracy"] == rec["best"]["accuracy"]
    assert r["dev"]["f1"] == rec["best"]["f1"]


def test_validate_softmax_override(trained, tiny_mrpc, tmp_path):
    ckpt, _, _ = trained
    r = json.loads(run("validate.py", ckpt, "--data-dir", tiny_mrpc, "--softmax", "exact", "--json", "--results-dir", tmp_path).stdout)
    assert r["approx"]["softmax"] == {"name": "exact"} and r["trained"]["approx"]["softmax"] == {"name": "cgf", "coeff": 0.65}


def test_validate_per_layer_override_and_spec_errors(trained, tiny_mrpc, tmp_path):
    ckpt, _, _ = trained
    r = json.loads(run("validate.py", ckpt, "--data-dir", tiny_mrpc, "--softmax", "cgf", "--coeff", 0.65, "--softmax-layers", "1=exact",
                       "--json", "--results-dir", tmp_path).stdout)
    assert r["label"] == "cgf c=0.65, layer 1 exact" and r["approx"]["softmax"]["layers"] == {"1": {"name": "exact"}}
    p = run("validate.py", ckpt, "--data-dir", tiny_mrpc, "--softmax", "exact", "--coeff", 0.5, "--results-dir", tmp_path, check=False)
    # refused as the arguments are parsed: one line in the parser's form, nothing run
    assert p.returncode == 2 and p.stderr.strip() == "validate.py: error: --softmax exact: softmax 'exact' takes no parameter coeff (its parameters: none)"
    p = run("validate.py", ckpt, "--data-dir", tiny_mrpc, "--softmax", "cgf", "--softmax-layers", "7=exact", "--results-dir", tmp_path, check=False)
    assert_clean_error(p, "model has 2 layers")


def test_per_layer_student_roundtrips_through_checkpoint_and_validate(tiny_bert, tiny_mrpc, tmp_path):
    """Trained with CGF in layer 0 and exact in layer 1: the checkpoint says so, and validate.py
    scores it with that placement and reproduces the training figure."""
    ckpt = tmp_path / "mixed.pt"
    p = run("finetune.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--batch-size", 8, "--softmax", "cgf",
            "--softmax-layers", "1=exact", "-o", ckpt, "--results-dir", tmp_path / "r")
    (rec_path,) = (tmp_path / "r").glob("*.json")
    rec = json.loads(rec_path.read_text())
    assert rec["config"]["approx"]["softmax"] == {"name": "cgf", "coeff": 0.5, "layers": {"1": {"name": "exact"}}}
    assert "-finetune-cgf0.5-L1exact-s42" in rec["name"]
    r = json.loads(run("validate.py", ckpt, "--data-dir", tiny_mrpc, "--json", "--results-dir", tmp_path).stdout)
    assert r["label"] == "cgf c=0.5, layer 1 exact" and r["dev"]["accuracy"] == rec["best"]["accuracy"]


def assert_clean_error(p, *needles):
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_checkpoint(tmp_path, tiny_mrpc):
    assert_clean_error(run("validate.py", tmp_path / "none.pt", "--data-dir", tiny_mrpc, "--results-dir", tmp_path, check=False), "not found")


def test_random_bytes_checkpoint(tmp_path, tiny_mrpc):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(10_000))
    assert_clean_error(run("validate.py", junk, "--data-dir", tiny_mrpc, "--results-dir", tmp_path, check=False), "not a readable")


def test_malformed_tsv(tmp_path, tiny_bert):
    folder = write_mrpc(tmp_path / "mrpc")
    lines = (folder / "dev.tsv").read_text(encoding="utf-8").splitlines()
    lines[4] = lines[4].replace("\t", " ", 1)
    (folder / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    p = run("finetune.py", "--model", tiny_bert, "--data-dir", folder, "--epochs", 1, "-o", tmp_path / "x.pt",
            "--results-dir", tmp_path / "r", check=False)
    assert_clean_error(p, "dev.tsv:5:")
    assert not (tmp_path / "x.pt").exists()


def test_empty_data_folder(tmp_path, tiny_bert):
    (tmp_path / "empty").mkdir()
    p = run("finetune.py", "--model", tiny_bert, "--data-dir", tmp_path / "empty", "-o", tmp_path / "x.pt",
            "--results-dir", tmp_path / "r", check=False)
    assert_clean_error(p, "lacks train.tsv")


def test_unknown_model(tmp_path, tiny_mrpc):
    p = run("finetune.py", "--model", tmp_path / "no-bert", "--data-dir", tiny_mrpc, "--results-dir", tmp_path / "r", check=False)
    assert_clean_error(p, "cannot load")


def test_distill_trains_teacher_once_then_students_per_seed(tiny_bert, tiny_mrpc, tmp_path):
    teacher = tmp_path / "teacher.pt"
    common = ["--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--batch-size", 8,
              "--teacher", teacher, "--results-dir", tmp_path / "r"]
    p = run("distill.py", *common, "--seeds", 1, 2, "--beta", 10, "--init", "teacher")
    assert teacher.is_file()  # trained and cached on first use
    assert "seed 1:" in p.stdout and "seed 2:" in p.stdout and "over 2 seed(s)" in p.stdout
    recs = [json.loads(x.read_text()) for x in (tmp_path / "r").glob("*.json")]
    students = [r for r in recs if r["script"] == "distill"]
    assert len(recs) == 3 and sorted(r["seed"] for r in students) == [1, 2]
    for r in students:
        assert r["config"]["approx"]["softmax"] == {"name": "cgf", "coeff": 0.5} and r["distill"]["init"] == "teacher"
        assert {"loss": "hidden_mse", "weight": 10.0} in r["distill"]["terms"] and "-distill-cgf0.5-b10-teacher-s" in r["name"]
        assert set(r["epochs"][0]["train"]) == {"loss", "ce", "kd", "hidden_mse"}
        assert r["distill"]["teacher_cached"] and Path(r["checkpoint"]).parent == Path(os.environ["CGF_BERT_CHECKPOINT_DIR"])
    mtime = teacher.stat().st_mtime
    p = run("distill.py", *common, "--seeds", 3, "--beta", 0, "--no-cache-teacher")  # default init: pretrained
    assert teacher.stat().st_mtime == mtime  # reused, not retrained
    rec = max((json.loads(x.read_text()) for x in (tmp_path / "r").glob("*distill*.json")), key=lambda r: r["name"])
    assert set(rec["epochs"][0]["train"]) == {"loss", "ce", "kd"} and not rec["distill"]["teacher_cached"]
    assert rec["distill"]["init"] == "pretrained"


def test_distill_rejects_a_cgf_teacher(trained, tiny_bert, tiny_mrpc, tmp_path):
    ckpt, _, _ = trained  # a CGF checkpoint
    p = run("distill.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--teacher", ckpt, "--results-dir", tmp_path, check=False)
    assert_clean_error(p, "a teacher must be exact")


def test_distill_rejects_a_teacher_of_another_model(tiny_bert, tiny_mrpc, tmp_path):
    from cgf_bert.model.bert import build_model
    from cgf_bert.store.checkpoint import save_checkpoint

    t = save_checkpoint(tmp_path / "t.pt", build_model(str(tiny_bert)), {"model": "bert-base-uncased"})
    p = run("distill.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--teacher", t, "--results-dir", tmp_path, check=False)
    assert_clean_error(p, "fine-tuned from 'bert-base-uncased'")
