"""--resume: a run interrupted after any epoch and resumed ends exactly where the uninterrupted
run ends (per-epoch metrics, best epoch, test predictions and weights, bit for bit on CPU); a
SIGKILL mid-epoch or mid-write leaves only whole files; a state file never runs pickled code."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_script

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.config import DistillConfig, TrainConfig
from cgf_bert.objective import kd_preset
from cgf_bert.store.checkpoint import read_checkpoint
from cgf_bert.train import recipes
from cgf_bert.train.distributed import Dist
from cgf_bert.train.resume import SUFFIX, load_state, restore

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"
STEPS = 6  # steps per epoch: 48 tiny-MRPC training examples in batches of 8


class Interrupted(Exception):
    """Stands in for a kill: raised from inside a training step."""


def interrupt_at(step_fn, call: int):
    """``step_fn`` that raises ``Interrupted`` at its ``call``-th call."""
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise Interrupted
        return step_fn(model, batch)

    return step


def config(tiny_bert, tiny_mrpc, **kw) -> TrainConfig:
    # lr high enough that a tiny random BERT's dev metrics move between epochs
    return TrainConfig(**{"model": str(tiny_bert), "data_dir": str(tiny_mrpc), "epochs": 3, "batch_size": 8, "lr": 2e-3,
                          "approx": Approximations(softmax=softmax_spec("cgf", coeff=0.5)), **kw})


def without_time(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in epochs]


def assert_same_run(resumed: dict, reference: dict) -> None:
    """Everything but wall time, start time and name: equal, floats bit for bit."""
    assert without_time(resumed["epochs"]) == without_time(reference["epochs"])
    for key in ("best_epoch", "best", "test_predictions", "config", "seed"):
        assert resumed[key] == reference[key], key
    a, b = read_checkpoint(FINETUNING.parent / resumed["checkpoint"])[0], read_checkpoint(FINETUNING.parent / reference["checkpoint"])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def the_state(folder: Path) -> Path:
    (path,) = folder.glob(f"*{SUFFIX}")
    return path


@pytest.mark.parametrize("grouped", [True, False], ids=["length-grouped", "shuffled"])
def test_finetune_interrupted_twice_and_resumed_equals_uninterrupted(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, grouped):
    cfg = config(tiny_bert, tiny_mrpc, group_by_length=grouped)
    reference = recipes.finetune(cfg, out=tmp_path / "ref" / "m.pt", results_dir=tmp_path / "ref")
    out, results = tmp_path / "run" / "m.pt", tmp_path / "run" / "results"
    real = recipes.ce_step
    monkeypatch.setattr(recipes, "ce_step", interrupt_at(real, STEPS + 1))  # epoch 2, step 1
    with pytest.raises(Interrupted):
        recipes.finetune(cfg, out=out, results_dir=results)
    state = load_state(the_state(out.parent))
    assert state["epoch"] == 1 and not list(results.glob("*.json"))  # no record before the end
    (metrics,) = results.glob("*.metrics.jsonl")
    assert len(metrics.read_text().splitlines()) == 1 and metrics.name == f"{state['info']['name']}.metrics.jsonl"
    monkeypatch.setattr(recipes, "ce_step", interrupt_at(real, STEPS + 1))  # resumed at epoch 2: stops in epoch 3
    with pytest.raises(Interrupted):
        recipes.finetune(cfg, out=out, results_dir=results, resume=True)
    assert load_state(the_state(out.parent))["epoch"] == 2
    monkeypatch.setattr(recipes, "ce_step", real)
    rec = recipes.finetune(cfg, out=out, results_dir=results, resume=True)

    assert_same_run(rec, reference)
    assert rec["name"] == state["info"]["name"]  # the run keeps its name, hence its record and metrics paths
    assert [r["after_epoch"] for r in rec["resumed"]] == [1, 2] and "resumed" not in reference
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    assert rec["wall_seconds"] >= rec["epochs"][-1]["seconds"] - 0.1  # time before the interruptions counted
    # The state is now a marker of the finished run: --resume again trains nothing and gives the record.
    assert "finished" in load_state(the_state(out.parent))
    monkeypatch.setattr(recipes, "ce_step", interrupt_at(real, 1))
    assert recipes.finetune(cfg, out=out, results_dir=results, resume=True) == json.loads((results / f"{rec['name']}.json").read_text())


def test_distill_with_teacher_cache_resumed_equals_uninterrupted(tiny_bert, tiny_mrpc, tmp_path, monkeypatch):
    cfg = config(tiny_bert, tiny_mrpc, epochs=2)
    teacher = tmp_path / "teacher.pt"
    recipes.finetune(config(tiny_bert, tiny_mrpc, epochs=1, approx=Approximations(softmax=softmax_spec("exact"))), out=teacher, results_dir=tmp_path / "t")
    dcfg = DistillConfig(terms=kd_preset(0.5, 2.0, 10.0), cache_teacher=True)
    reference = recipes.distill(cfg, dcfg, teacher, out=tmp_path / "ref" / "s.pt", results_dir=tmp_path / "ref")
    out, results = tmp_path / "run" / "s.pt", tmp_path / "run" / "results"
    real = recipes.make_kd_step
    monkeypatch.setattr(recipes, "make_kd_step", lambda *a: interrupt_at(real(*a), STEPS + 3))  # epoch 2, step 3
    with pytest.raises(Interrupted):
        recipes.distill(cfg, dcfg, teacher, out=out, results_dir=results)
    monkeypatch.setattr(recipes, "make_kd_step", real)
    rec = recipes.distill(cfg, dcfg, teacher, out=out, results_dir=results, resume=True)  # the cache is computed again
    assert_same_run(rec, reference)
    assert rec["distill"]["teacher_cached"] and set(rec["epochs"][0]["train"]) == {"loss", "ce", "kd", "hidden_mse"}
    assert [r["after_epoch"] for r in rec["resumed"]] == [1]


def test_resume_refuses_another_runs_state_and_starts_afresh_without_one(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, caplog):
    cfg = config(tiny_bert, tiny_mrpc, epochs=2)
    out = tmp_path / "m.pt"
    monkeypatch.setattr(recipes, "ce_step", interrupt_at(recipes.ce_step, STEPS + 1))
    with pytest.raises(Interrupted):
        recipes.finetune(cfg, out=out, results_dir=tmp_path / "r")
    state = the_state(tmp_path)
    with pytest.raises(CgfBertError, match=r"state of another run \(it differs in config\.lr, config\.seed\)"):
        recipes.finetune(config(tiny_bert, tiny_mrpc, epochs=2, lr=1e-3, seed=3), out=out, results_dir=tmp_path / "r", resume=state)
    with pytest.raises(CgfBertError, match="training state not found"):
        recipes.finetune(cfg, out=out, results_dir=tmp_path / "r", resume=tmp_path / "none.state.pt")
    with pytest.raises(CgfBertError, match="saved by 1 process"):
        loaded = load_state(state)
        restore(loaded, None, None, None, None, torch.device("cpu"), Dist(rank=0, world=2))
    # --resume where this run saved nothing (killed in its first epoch): a fresh start, said so
    monkeypatch.undo()
    with caplog.at_level("WARNING"):
        rec = recipes.finetune(config(tiny_bert, tiny_mrpc, epochs=1), out=tmp_path / "other.pt", results_dir=tmp_path / "r", resume=True)
    assert "nothing to resume" in caplog.text and "resumed" not in rec


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_state_file_never_runs_pickled_code(tmp_path):
    bad = tmp_path / "bad.state.pt"
    torch.save({"format": "cgf-bert-state/1", "info": "{}", "x": _Exploit()}, bad)
    with pytest.raises(CgfBertError, match="not a readable cgf-bert training state"):
        load_state(bad)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    bad.write_bytes(os.urandom(4000))
    with pytest.raises(CgfBertError, match="not a readable"):
        load_state(bad)


# A run that stops where the test says, so that the test can SIGKILL it there: mid-epoch (in a
# training step) or mid-write (half of the epoch-2 state written to its temp file).
DRIVER = """
import sys, time
from pathlib import Path
import torch
from cgf_bert.train import recipes
from cgf_bert.config import TrainConfig
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec

marker, where, model, data, out, results = sys.argv[1:7]
if where == "step":
    real, calls = recipes.ce_step, [0]
    def step(m, b):
        calls[0] += 1
        if calls[0] == %(steps)d + 2:  # epoch 2, step 2
            Path(marker).write_text(where)
            time.sleep(600)
        return real(m, b)
    recipes.ce_step = step
else:
    real_save = torch.save
    def save(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("epoch") == 2 and "rng" in obj:
            f.write(b"PK half a state")
            f.flush()
            Path(marker).write_text(where)
            time.sleep(600)
        return real_save(obj, f, *a, **kw)
    torch.save = save
cfg = TrainConfig(model=model, data_dir=data, epochs=3, batch_size=8, lr=2e-3, approx=Approximations(softmax=softmax_spec("cgf", coeff=0.5)))
recipes.finetune(cfg, out=out, results_dir=results, resume=True)
""" % {"steps": STEPS}


def _run_until_killed(where: str, args: list[str], tmp_path: Path) -> None:
    marker = tmp_path / f"{where}.marker"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(marker), where, *args], cwd=FINETUNING, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise AssertionError(f"the run ended before reaching {where}:\n{p.communicate()[1][-3000:]}")
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert p.returncode == -signal.SIGKILL


def test_sigkill_mid_epoch_and_mid_write_leaves_whole_files_and_resumes(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    cfg = config(tiny_bert, tiny_mrpc)
    reference = recipes.finetune(cfg, out=tmp_path / "ref" / "m.pt", results_dir=tmp_path / "ref")
    out, results = tmp_path / "run" / "m.pt", tmp_path / "run" / "results"
    args = [str(tiny_bert), str(tiny_mrpc), str(out), str(results)]

    _run_until_killed("step", args, tmp_path)  # killed in epoch 2
    state = the_state(out.parent)
    assert load_state(state)["epoch"] == 1 and read_checkpoint(out)[1]["epoch"] >= 1
    assert not list(results.glob("*.json")) and not list(tmp_path.rglob("*.tmp"))

    _run_until_killed("write", args, tmp_path)  # resumed, then killed while writing the epoch-2 state
    assert load_state(state)["epoch"] == 1  # the old state, whole: the new one never replaced it
    (leftover,) = out.parent.glob(f".{state.name}.*.tmp")  # the half-written temp file beside it
    assert leftover.read_bytes() == b"PK half a state"
    assert not list(results.glob("*.json"))

    # the script resumes what the killed processes left (in this process: the kills were the point above)
    code, _, err = run_script(monkeypatch, capsys, "finetune.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 3,
                              "--batch-size", 8, "--lr", 2e-3, "--softmax", "cgf", "--coeff", 0.5, "-o", out, "--results-dir", results, "--resume")
    assert code == 0, err[-3000:]
    (rec_path,) = results.glob("*.json")
    rec = json.loads(rec_path.read_text())
    assert_same_run(rec, reference)
    assert [r["after_epoch"] for r in rec["resumed"]] == [1] and rec["resumed"][0]["command"].endswith("--resume")
    assert not list(tmp_path.rglob("*.tmp"))  # the killed writer's temp file is cleaned up on resume
