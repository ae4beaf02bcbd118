"""Each step script end to end on a tiny random BERT and a tiny MRPC folder (seconds), and
bad input: one line on stderr, exit code 2, no traceback.

One run of each script goes through a process of its own (``run``: the interpreter, the exit
status a shell sees, the recorded command); the other cases call the script's ``main`` in this
process (``conftest.run_script``), which tests the same code without the start-up. Scores are
checked against models built here directly, not against the labels the scripts print."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FINETUNING, run_script, write_mrpc
from transformers import BertForSequenceClassification

from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.data.loader import make_loader
from cgf_bert.model.bert import build_model
from cgf_bert.store.checkpoint import read_checkpoint, save_checkpoint
from cgf_bert.train.engine import evaluate
from cgf_bert.train.run import prepare_data

CPU = torch.device("cpu")


def run(script, *args, check=True, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, script, *map(str, args)], cwd=FINETUNING, capture_output=True, text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def in_process(monkeypatch, capsys, script, *args):
    """``script``'s JSON output, run in this process; it must succeed."""
    code, out, err = run_script(monkeypatch, capsys, script, *args)
    assert code == 0, err
    return json.loads(out) if "--json" in map(str, args) else out


@pytest.fixture(scope="module")
def trained(tiny_bert, tiny_mrpc, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    ckpt = out / "tiny.pt"
    p = run("finetune.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 2, "--batch-size", 8,
            "--softmax", "cgf", "--coeff", 0.65, "--seed", 5, "-o", ckpt, "--results-dir", out / "results")
    assert "Warning" not in p.stderr, p.stderr  # a quiet console: the libraries' warnings only with --verbose
    return ckpt, out / "results", p.stdout


@pytest.fixture(scope="module")
def dev(tiny_bert, tiny_mrpc):
    """The tiny dev split as one loader (24 examples, one batch)."""
    tokenizer, data = prepare_data(str(tiny_bert), str(tiny_mrpc), 128)
    return make_loader(data["validation"], tokenizer, 128)


@pytest.fixture(scope="module")
def sharp(tiny_bert, tmp_path_factory):
    """A CGF c=0.65 checkpoint whose attention is sharp and whose classifier is large, so that
    the softmax a model runs moves its dev loss well past rounding (a trained tiny model's
    logits sit near 0 whatever its softmax)."""
    torch.manual_seed(1)
    model = build_model(str(tiny_bert), softmax_spec("cgf", coeff=0.65))
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight *= 20
            layer.attention.self.key.weight *= 20
        model.classifier.weight.normal_(0.0, 3.0)
    return save_checkpoint(tmp_path_factory.mktemp("sharp") / "sharp.pt", model, {"model": str(tiny_bert)})


def reference_dev(tiny_bert, state_dict, approx, dev) -> dict:
    """Dev metrics of the checkpoint's weights in a model built here with ``approx``."""
    model = build_model(str(tiny_bert), approx)
    model.load_state_dict(state_dict)
    return evaluate(model, dev, CPU)


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
    assert r["dev"] == rec["best"]  # the saved best epoch, evaluated afresh: loss, accuracy and F1 to the bit


def test_validate_softmax_override_scores_the_stock_model(sharp, tiny_bert, tiny_mrpc, dev, tmp_path, monkeypatch, capsys):
    """``--softmax exact`` on a CGF checkpoint scores its weights in stock transformers BERT."""
    ckpt = sharp
    r = in_process(monkeypatch, capsys, "validate.py", ckpt, "--data-dir", tiny_mrpc, "--softmax", "exact", "--json", "--results-dir", tmp_path)
    assert r["approx"]["softmax"] == {"name": "exact"} and r["trained"]["approx"]["softmax"] == {"name": "cgf", "coeff": 0.65}
    state_dict, _ = read_checkpoint(ckpt)
    stock = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, attn_implementation="eager").eval()
    stock.load_state_dict(state_dict)
    (batch,) = dev
    with torch.no_grad():
        logits = stock(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits  # (24, 2)
    assert r["dev"]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel=1e-5)
    assert r["dev"]["accuracy"] == pytest.approx((logits.argmax(-1) == batch["labels"]).sum().item() / len(batch["labels"]))
    as_trained = reference_dev(tiny_bert, state_dict, softmax_spec("cgf", coeff=0.65), dev)
    assert abs(r["dev"]["loss"] - as_trained["loss"]) > 1e-3  # the override took effect: CGF scores these weights otherwise


def test_validate_per_layer_override_and_spec_errors(sharp, tiny_bert, tiny_mrpc, dev, tmp_path, monkeypatch, capsys):
    ckpt = sharp
    r = in_process(monkeypatch, capsys, "validate.py", ckpt, "--data-dir", tiny_mrpc, "--softmax", "cgf", "--coeff", 0.65,
                   "--softmax-layers", "1=exact", "--json", "--results-dir", tmp_path)
    mixed = softmax_spec("cgf", coeff=0.65, layers={1: softmax_spec("exact")})
    assert r["approx"]["softmax"] == mixed.to_json()
    state_dict, _ = read_checkpoint(ckpt)
    assert r["dev"] == reference_dev(tiny_bert, state_dict, mixed, dev)
    for other in (mixed.plain(), softmax_spec("exact")):  # each layer's softmax counts
        assert abs(r["dev"]["loss"] - reference_dev(tiny_bert, state_dict, other, dev)["loss"]) > 1e-4
    # refused as the arguments are parsed: one line in the parser's form, nothing run
    code, _, err = run_script(monkeypatch, capsys, "validate.py", ckpt, "--data-dir", tiny_mrpc, "--softmax", "exact", "--coeff", 0.5,
                              "--results-dir", tmp_path)
    assert code == 2 and err.strip() == "validate.py: error: --softmax exact: softmax 'exact' takes no parameter coeff (its parameters: none)"
    code, _, err = run_script(monkeypatch, capsys, "validate.py", ckpt, "--data-dir", tiny_mrpc, "--softmax", "cgf", "--softmax-layers", "7=exact",
                              "--results-dir", tmp_path)
    assert_clean_error(code, err, "--softmax-layers names layer(s) [7], but the model has 2 layers")
    assert len(list((tmp_path / "validate").glob("*.json"))) == 1  # the first run's; the refused ones wrote nothing


def test_per_layer_student_roundtrips_through_checkpoint_and_validate(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    """Trained with CGF in layer 0 and exact in layer 1: the checkpoint says so, and validate.py
    scores it with that placement and reproduces the training figure."""
    ckpt = tmp_path / "mixed.pt"
    in_process(monkeypatch, capsys, "finetune.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--batch-size", 8,
               "--softmax", "cgf", "--softmax-layers", "1=exact", "-o", ckpt, "--results-dir", tmp_path / "r")
    (rec_path,) = (tmp_path / "r").glob("*.json")
    rec = json.loads(rec_path.read_text())
    assert rec["config"]["approx"]["softmax"] == {"name": "cgf", "coeff": 0.5, "layers": {"1": {"name": "exact"}}}
    assert "-finetune-cgf0.5-L1exact-s42" in rec["name"]
    assert read_checkpoint(ckpt)[1]["approx"].softmax == softmax_spec("cgf", coeff=0.5, layers={1: softmax_spec("exact")})
    r = in_process(monkeypatch, capsys, "validate.py", ckpt, "--data-dir", tiny_mrpc, "--json", "--results-dir", tmp_path)
    assert r["label"] == "cgf c=0.5, layer 1 exact" and r["dev"] == rec["best"]


def assert_clean_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_checkpoint_end_to_end(tmp_path, tiny_mrpc):
    p = run("validate.py", tmp_path / "none.pt", "--data-dir", tiny_mrpc, "--results-dir", tmp_path, check=False)
    assert_clean_error(p.returncode, p.stderr, "not found")
    assert not (tmp_path / "validate").exists()


def test_random_bytes_checkpoint(tmp_path, tiny_mrpc, monkeypatch, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(10_000))
    code, _, err = run_script(monkeypatch, capsys, "validate.py", junk, "--data-dir", tiny_mrpc, "--results-dir", tmp_path)
    assert_clean_error(code, err, "not a readable")


def test_malformed_tsv(tmp_path, tiny_bert, monkeypatch, capsys):
    folder = write_mrpc(tmp_path / "mrpc")
    lines = (folder / "dev.tsv").read_text(encoding="utf-8").splitlines()
    lines[4] = lines[4].replace("\t", " ", 1)
    (folder / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = run_script(monkeypatch, capsys, "finetune.py", "--model", tiny_bert, "--data-dir", folder, "--epochs", 1,
                              "-o", tmp_path / "x.pt", "--results-dir", tmp_path / "r")
    assert_clean_error(code, err, "dev.tsv:5:")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "r").exists()


def test_empty_data_folder(tmp_path, tiny_bert, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_script(monkeypatch, capsys, "finetune.py", "--model", tiny_bert, "--data-dir", tmp_path / "empty",
                              "-o", tmp_path / "x.pt", "--results-dir", tmp_path / "r")
    assert_clean_error(code, err, "lacks train.tsv")


def test_unknown_model(tmp_path, tiny_mrpc, monkeypatch, capsys):
    code, _, err = run_script(monkeypatch, capsys, "finetune.py", "--model", tmp_path / "no-bert", "--data-dir", tiny_mrpc,
                              "--results-dir", tmp_path / "r")
    assert_clean_error(code, err, "cannot load")


def test_distill_trains_teacher_once_then_students_per_seed(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
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
        assert r["command"].startswith("distill.py ")
    mtime = teacher.stat().st_mtime
    in_process(monkeypatch, capsys, "distill.py", *common, "--seeds", 3, "--beta", 0, "--no-cache-teacher")  # default init: pretrained
    assert teacher.stat().st_mtime == mtime  # reused, not retrained
    rec = max((json.loads(x.read_text()) for x in (tmp_path / "r").glob("*distill*.json")), key=lambda r: r["name"])
    assert set(rec["epochs"][0]["train"]) == {"loss", "ce", "kd"} and not rec["distill"]["teacher_cached"]
    assert rec["distill"]["init"] == "pretrained" and rec["seed"] == 3


def test_distill_rejects_a_cgf_teacher_end_to_end(trained, tiny_bert, tiny_mrpc, tmp_path):
    ckpt, _, _ = trained  # a CGF checkpoint
    p = run("distill.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--teacher", ckpt, "--results-dir", tmp_path, check=False)
    assert_clean_error(p.returncode, p.stderr, "a teacher must be exact")
    assert not any(tmp_path.iterdir())


def test_distill_rejects_a_teacher_of_another_model(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    t = save_checkpoint(tmp_path / "t.pt", build_model(str(tiny_bert)), {"model": "bert-base-uncased"})
    code, _, err = run_script(monkeypatch, capsys, "distill.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--teacher", t,
                              "--results-dir", tmp_path / "r")
    assert_clean_error(code, err, "fine-tuned from 'bert-base-uncased'")


@pytest.mark.parametrize("script,where", [("finetune.py", "-o"), ("finetune.py", "--results-dir"), ("distill.py", "--results-dir")])
def test_an_output_path_that_cannot_be_created_is_refused_before_any_work(tiny_bert, tiny_mrpc, tmp_path, script, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--results-dir", tmp_path / "results"]
    args += ["-o", blocker / "x.pt"] if where == "-o" else []
    args = [a if a != tmp_path / "results" or where != "--results-dir" else blocker / "results" for a in args]
    if script == "distill.py":
        args += ["--teacher", tmp_path / "teacher.pt"]
    p = run(script, *args, check=False)
    assert p.returncode == 2 and "cannot be created" in p.stderr and where.split("/")[0] in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "epoch" not in p.stdout + p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a-file"]  # nothing written, no teacher trained


def test_examples_longer_than_the_models_positions_are_refused_before_the_first_step(tiny_bert):
    from datasets import Dataset

    from cgf_bert import CgfBertError
    from cgf_bert.config import TrainConfig
    from cgf_bert.train.run import check_model

    model = build_model(str(tiny_bert))  # 64 position embeddings
    fits = {"train": Dataset.from_dict({"input_ids": [[1] * 64, [1] * 10]})}
    check_model(TrainConfig(max_length=128), model, fits)  # the limit is the data's, not the flag's
    long = {"train": Dataset.from_dict({"input_ids": [[1] * 70]}), "validation": Dataset.from_dict({"input_ids": [[1] * 5]})}
    with pytest.raises(CgfBertError, match="--max-length 128: examples of up to 70 tokens, .* 64 position embeddings"):
        check_model(TrainConfig(max_length=128), model, long)


def test_quiet_prints_only_the_final_result(tiny_bert, tiny_mrpc, tmp_path):
    """-q: no progress bars, no epoch lines, no notes: the result line alone (a process: -q silences tqdm for good)."""
    p = run("finetune.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 2, "--batch-size", 8, "-q",
            "-o", tmp_path / "q.pt", "--results-dir", tmp_path / "r")
    assert p.stderr == "" and len(p.stdout.splitlines()) == 1 and p.stdout.startswith("best epoch"), (p.stdout, p.stderr)


def test_quiet_experiment_prints_its_result_lines_alone(tiny_bert, tiny_mrpc, tmp_path):
    """-q on an experiment module: its per-example progress lines go too (they are notes), the result stays."""
    from cgf_bert.approx.approximations import Approximations

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "cgf.pt", build_model(str(tiny_bert), Approximations(softmax=softmax_spec("cgf"))),
                           {"model": str(tiny_bert), "seed": 0})
    args = [ckpt, "--examples", 2, "--calibrate", 2, "--data-dir", tiny_mrpc, "--results-dir", tmp_path / "r"]
    loud = run("-m", "experiments.encrypted_inference", *args).stdout
    assert "example 1:" in loud, loud
    p = run("-m", "experiments.encrypted_inference", *args, "-q")
    lines = p.stdout.splitlines()
    assert p.stderr == "" and len(lines) == 3 and "predictions equal on 2/2" in lines[0], (p.stdout, p.stderr)
    assert lines[1].startswith("plot: ") and lines[2].startswith("saved "), lines


@pytest.mark.parametrize("target", ["experiments.encrypted_inference", "experiments.hessian", "experiments.attention_norms",
                                    "experiments.polynomial_student", "validate.py", "export.py"])
def test_a_results_folder_that_cannot_be_written_is_refused_when_parsed(target, tmp_path, monkeypatch, capsys):
    """Every module with --results-dir refuses one it could not write, before loading anything (the record
    would otherwise be lost at the end of the run): one line, exit 2, nothing written."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    positional = {"export.py": ["missing.pt", str(tmp_path / "out")], "validate.py": ["missing.pt"]}.get(target, ["missing.pt"])
    code, _, err = run_script(monkeypatch, capsys, target, *positional, "--results-dir", blocker / "results")
    assert code == 2 and "--results-dir" in err and "cannot be created" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
