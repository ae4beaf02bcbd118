"""The sweep queue (experiments.run_plan): skips runs that have a record, runs the rest N at a
time, fails a run with its log named, restarts cleanly after a kill, prints commands.

The runs are processes of their own in every test (that is the queue's job); the runner itself
is a process of its own where it is killed, and elsewhere runs in this process (``run_plan``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_script

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.config import TrainConfig
from cgf_bert.store.records import config_json, write_json

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"

# A stand-in for finetune.py: its flags (the plan runner reads them with this script's parser),
# a record written at once. FAKE_SLEEP holds it before writing; FAKE_FAIL_SEED makes that seed fail.
FAKE = '''
import os, time
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, run_main
from cgf_bert.config import TrainConfig
from cgf_bert.store.names import run_name
from cgf_bert.store.records import config_json, write_json


def main():
    p = ArgumentParser()
    add_config_args(p, TrainConfig)
    p.add_argument("--results-dir", required=True)
    cfg = config_from_args(TrainConfig, args := p.parse_args())
    print("threads", os.environ["OMP_NUM_THREADS"], "seed", cfg.seed, flush=True)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    if cfg.seed == int(os.environ.get("FAKE_FAIL_SEED", "-1")):
        raise SystemExit("fake failure")
    name = run_name("finetune", cfg)
    write_json(f"{args.results_dir}/{name}.json", {"name": name, "script": "finetune", "config": config_json(cfg), "best": {}})


if __name__ == "__main__":
    run_main(main)
'''


@pytest.fixture
def plan(tmp_path):
    """A TOML plan of three fake runs (seeds 1, 2, 3) into tmp_path/results; the seed-1 run recorded."""
    (tmp_path / "fake.py").write_text(FAKE)
    results = tmp_path / "results"
    runs = "".join(f'[[run]]\nscript = "{tmp_path / "fake.py"}"\nargs = ["--seed", "{s}", "--softmax", "cgf"]\n' for s in (1, 2, 3))
    path = tmp_path / "plan.toml"
    path.write_text(f'args = ["--results-dir", "{results}", "--epochs", "2"]\n{runs}')
    cfg = TrainConfig(epochs=2, seed=1, approx=Approximations(softmax=softmax_spec("cgf")))
    write_json(results / "old-s1.json", {"name": "old-s1", "script": "finetune", "config": config_json(cfg), "best": {}})
    return path


@pytest.fixture
def run_plan(monkeypatch, capsys):
    """``run_plan(*args, env={...})``: the runner's main in this process, the runs' environment
    extended with ``env``; its exit code, stdout and stderr as a finished process's."""

    def run(*args, env=None):
        for k, v in {"HF_HUB_OFFLINE": "1", **(env or {})}.items():
            monkeypatch.setenv(k, v)
        handler = signal.getsignal(signal.SIGTERM)  # the runner makes SIGTERM stop its runs; not pytest's
        try:
            code, out, err = run_script(monkeypatch, capsys, "experiments.run_plan", *args)
        finally:
            signal.signal(signal.SIGTERM, handler)
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def seeds_recorded(results: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["config"]["seed"] for p in results.glob("*.json"))


def test_print_commands_lists_the_runs_without_a_record(plan, tmp_path, run_plan):
    p = run_plan(plan, "--print-commands")
    assert p.returncode == 0, p.stderr
    fake, results = tmp_path / "fake.py", tmp_path / "results"
    assert p.stdout.splitlines() == [f"python {fake} --results-dir {results} --epochs 2 --seed {s} --softmax cgf" for s in (2, 3)]
    assert seeds_recorded(results) == [1]  # nothing ran


def test_runs_the_rest_two_at_a_time_then_skips_everything(plan, tmp_path, run_plan):
    p = run_plan(plan, "--workers", 2, "--cores", 4, "--log-dir", tmp_path / "logs")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "3 runs, 1 recorded, 2 to run, 2 at a time with 2 thread(s) each" in out
    assert "skip  [1]" in out and "recorded in" in out and "start [2]" in out and "done  [2]" in out and "done  [3]" in out
    assert seeds_recorded(tmp_path / "results") == [1, 2, 3]
    assert (tmp_path / "logs" / "002.log").read_text().startswith("threads 2 seed 2")  # cores // workers threads each
    again = run_plan(plan, "--workers", 2, "--log-dir", tmp_path / "logs")
    assert again.returncode == 0 and "0 to run" in again.stdout and "start" not in again.stdout, again.stdout
    assert seeds_recorded(tmp_path / "results") == [1, 2, 3]


def test_a_failed_run_is_named_with_its_log_and_the_others_finish(plan, tmp_path, run_plan):
    p = run_plan(plan, "--workers", 2, "--log-dir", tmp_path / "logs", env={"FAKE_FAIL_SEED": "2"})
    assert p.returncode == 1
    assert f"FAIL  [2] exit code 1 after" in p.stdout and f"log: {tmp_path / 'logs' / '002.log'}" in p.stdout
    assert "fake failure" in (tmp_path / "logs" / "002.log").read_text()
    assert p.stderr.strip() == "1 of 2 runs failed (2): their logs are named above; the same command runs them again"
    assert seeds_recorded(tmp_path / "results") == [1, 3]


def test_a_plan_killed_midway_restarts_cleanly(plan, tmp_path, run_plan):
    """Kill the runner and its runs (one process group, as Ctrl-C or a lost job would) while
    both runs are under way: no record appears; the same command then runs exactly those two.
    (The runner's end-to-end run: a process of its own, as a shell starts it.)"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FAKE_SLEEP": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run_plan", str(plan), "--workers", "2", "--log-dir", str(tmp_path / "logs")],
                            cwd=FINETUNING, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    started = []
    deadline = time.time() + 120
    while len(started) < 2 and time.time() < deadline:
        line = proc.stdout.readline()
        started += [line] if " start [" in line else []
    logs = [tmp_path / "logs" / f"00{i}.log" for i in (2, 3)]
    while not all(p.exists() and p.read_text() for p in logs) and time.time() < deadline:
        time.sleep(0.2)  # both fakes are asleep before their record
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(started) == 2
    assert seeds_recorded(tmp_path / "results") == [1]
    p = run_plan(plan, "--workers", 2, "--log-dir", tmp_path / "logs")
    assert p.returncode == 0 and "2 to run" in p.stdout and "done  [2]" in p.stdout and "done  [3]" in p.stdout, p.stdout + p.stderr
    assert seeds_recorded(tmp_path / "results") == [1, 2, 3]


def test_a_bad_flag_in_any_run_stops_the_plan_before_it_starts(plan, tmp_path, run_plan):
    plan.write_text(plan.read_text() + '[[run]]\nscript = "finetune.py"\nargs = ["--lr", "nan"]\n')
    p = run_plan(plan, "--log-dir", tmp_path / "logs")
    assert p.returncode == 2 and not (tmp_path / "logs").exists()
    assert p.stderr == f"error: {plan}: run 4: finetune.py: error: argument --lr: must be finite and > 0, got 'nan'\n"


def test_the_real_finetune_script_is_matched_to_its_record(tiny_bert, tiny_mrpc, tmp_path, run_plan):
    """finetune.py itself on the tiny model: run once, then found by its record (a JSON plan)."""
    results = tmp_path / "results"
    plan = tmp_path / "plan.json"
    args = ["--model", str(tiny_bert), "--data-dir", str(tiny_mrpc), "--epochs", "1", "--limit", "16", "--results-dir", str(results),
            "-o", str(tmp_path / "tiny.pt")]
    plan.write_text(json.dumps({"run": [{"script": "finetune.py", "args": args}]}))
    p = run_plan(plan, "--log-dir", tmp_path / "logs")
    assert p.returncode == 0 and "done  [1]" in p.stdout, p.stdout + p.stderr
    (record,) = results.glob("*-finetune-exact-s42.json")
    # another machine's data folder and device name the same run
    plan.write_text(json.dumps({"run": [{"script": "finetune.py", "args": [*args, "--device", "cpu"]}]}))
    again = run_plan(plan, "--print-commands")
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr
