"""A sweep queue: run the runs of a plan file that have no run record yet, N at a time.

A plan (TOML or JSON) lists runs, each a step script and its flags; ``args`` at the top, if
any, go before every run's own:

    # experiments/plans/kd_seeds.toml
    args = ["--epochs", "5"]
    [[run]]
    script = "distill.py"
    args = ["--seeds", "7", "--coeff", "0.5", "--beta", "10"]

A run is done when the results folder it names (``--results-dir``, default results/) holds
a record of the same recipe, variant and seed (``sweeps.find_record``, as coeff_sweep reuses
runs; where a run ran and read data from aside); a distill.py run with several --seeds when
every seed has one. Runs are read with the script's own parser before anything starts, so a
bad flag in run 12 stops the plan at once. Records are written whole or not at all, so a
plan stopped midway (Ctrl-C, a kill of its process group, a lost machine) is restarted by
running the same command: the runs that finished are skipped, the one cut off is run again.

    cd finetuning
    python -m experiments.run_plan experiments/plans/kd_seeds.toml --workers 2
    python -m experiments.run_plan experiments/plans/kd_seeds.toml --print-commands   # for a cluster scheduler

Each run writes its output to a log (``--log-dir``); N workers share the cores, each run
getting ``cores // N`` threads (OMP_NUM_THREADS, which torch reads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tomllib

from cgf_bert import CgfBertError
from cgf_bert.cli import ArgumentParser, ObjectiveFlags, config_from_args, number, parse_for, run_main, script_parser
from cgf_bert.config import DistillConfig, TrainConfig
from cgf_bert.store.provenance import REPO_ROOT, repo_relative
from cgf_bert.train.sweeps import find_record

FINETUNING = Path(__file__).resolve().parents[1]  # scripts' paths and commands are relative to it
LOG_DIR = REPO_ROOT / "logs" / "run_plan"  # one folder per plan, one log per run


@dataclass(frozen=True)
class Run:
    """One run of a plan: its position (from 1), script and full flags, and the configs they build."""

    index: int
    script: str
    args: tuple[str, ...]
    cfg: TrainConfig
    dcfg: DistillConfig | None
    seeds: tuple[int, ...]
    results_dir: str

    def command(self) -> list[str]:
        return ["python", self.script, *self.args]

    def record(self) -> str | None:
        """The record that makes this run done (the first seed's), or None while a seed lacks one."""
        found = [find_record(dataclasses.replace(self.cfg, seed=s), self.dcfg, self.results_dir) for s in self.seeds]
        return repo_relative(found[0]["_path"]) if all(found) else None


def load_plan(path: str | Path) -> list[Run]:
    """The runs of a plan file, each read with its script's parser (a bad flag fails here)."""
    path = Path(path)
    try:
        text = path.read_text()
        plan = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except OSError as e:
        raise CgfBertError(f"cannot read plan {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise CgfBertError(f"{path}: not a {'TOML' if path.suffix == '.toml' else 'JSON'} plan ({e})") from None
    entries, common = plan.get("run"), plan.get("args", [])
    if not isinstance(entries, list) or not entries or not _strings(common):
        raise CgfBertError(f"{path}: a plan is a list 'run' of {{script, args}} tables, and optional top-level 'args'")
    parsers: dict[str, object] = {}
    runs = []
    for i, entry in enumerate(entries, start=1):
        where = f"{path}: run {i}"
        if not isinstance(entry, dict) or set(entry) - {"script", "args"} or not isinstance(entry.get("script"), str) \
                or not _strings(entry.get("args", [])):
            raise CgfBertError(f"{where}: takes script = 'NAME.py' and args = ['--flag', 'value', ...], got {entry!r}")
        script = entry["script"]
        if not (FINETUNING / script).is_file():
            raise CgfBertError(f"{where}: no script {script} in {repo_relative(FINETUNING)}/")
        if script not in parsers:
            parsers[script] = script_parser(FINETUNING / script)
        args = (*common, *entry.get("args", []))
        runs.append(_run(i, script, args, parse_for(parsers[script], list(args), where), where))
    return runs


def _strings(x) -> bool:
    return isinstance(x, list) and all(isinstance(a, str) for a in x)


def _run(index: int, script: str, args: tuple[str, ...], ns, where: str) -> Run:
    if "results_dir" not in vars(ns) or "epochs" not in vars(ns):
        raise CgfBertError(f"{where}: {script} leaves no run record to match (plans run finetune.py and distill.py)")
    seeds = tuple(ns.seeds) if "seeds" in vars(ns) else (ns.seed,)
    dcfg = config_from_args(DistillConfig, ns) if ObjectiveFlags.present(ns) else None
    cfg = config_from_args(TrainConfig, ns, seed=seeds[0])
    results_dir = ns.results_dir if os.path.isabs(ns.results_dir) else str(FINETUNING / ns.results_dir)
    return Run(index, script, args, cfg, dcfg, seeds, results_dir)


class Queue:
    """Runs pending runs on ``workers`` threads, each a subprocess with its share of the cores."""

    def __init__(self, runs: list[Run], workers: int, log_dir: Path, threads: int):
        self.runs, self.workers, self.log_dir, self.threads = runs, workers, log_dir, threads
        self.lock = threading.Lock()
        self.children: set[subprocess.Popen] = set()
        self.failed: list[Run] = []

    def say(self, text: str) -> None:
        with self.lock:
            print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    def run(self, run: Run) -> None:
        log = self.log_dir / f"{run.index:03d}.log"
        self.say(f"start [{run.index}] {shlex.join(run.command())} (log: {repo_relative(log)})")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        start = time.perf_counter()
        with open(log, "w") as out:
            child = subprocess.Popen([sys.executable, run.script, *run.args], cwd=FINETUNING, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
            with self.lock:
                self.children.add(child)
            code = child.wait()
            with self.lock:
                self.children.discard(child)
        minutes = (time.perf_counter() - start) / 60
        record = run.record() if code == 0 else None
        if record:
            self.say(f"done  [{run.index}] in {minutes:.1f} min: {record}")
            return
        why = f"exit code {code}" if code else "exited 0 but left no matching record"
        self.failed.append(run)
        self.say(f"FAIL  [{run.index}] {why} after {minutes:.1f} min; log: {repo_relative(log)}")

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(self.workers) as pool:
            try:
                list(pool.map(self.run, self.runs))
            except BaseException:  # Ctrl-C or SIGTERM: stop the runs under way, queue nothing more
                pool.shutdown(wait=False, cancel_futures=True)
                with self.lock:
                    for child in self.children:
                        child.terminate()
                raise


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("plan", help="a plan file, .toml or .json")
    p.add_argument("--workers", type=number(int, "workers", min=1), default=1, help="runs at a time (default: %(default)s)")
    p.add_argument("--cores", type=number(int, "cores", min=1), default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                   help="cores the workers share, cores // workers threads each (default: this process's, %(default)s)")
    p.add_argument("--print-commands", action="store_true",
                   help="print one shell command per pending run (run from finetuning/) instead of running them")
    p.add_argument("--log-dir", help="where the runs' logs go (default: logs/run_plan/<plan name>/)")
    args = p.parse_args()
    runs = load_plan(args.plan)
    recorded = {r.index: r.record() for r in runs}
    pending = [r for r in runs if not recorded[r.index]]
    if args.print_commands:
        for r in pending:
            print(shlex.join(r.command()))
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop ends the runs under way too
    threads = max(1, args.cores // args.workers)
    print(f"{args.plan}: {len(runs)} runs, {len(runs) - len(pending)} recorded, {len(pending)} to run, "
          f"{args.workers} at a time with {threads} thread(s) each", flush=True)
    for r in runs:
        if recorded[r.index]:
            print(f"skip  [{r.index}] {shlex.join(r.command())}: recorded in {recorded[r.index]}", flush=True)
    queue = Queue(pending, args.workers, Path(args.log_dir) if args.log_dir else LOG_DIR / Path(args.plan).stem, threads)
    queue.start()
    if queue.failed:
        failed = ", ".join(str(r.index) for r in sorted(queue.failed, key=lambda r: r.index))
        print(f"{len(queue.failed)} of {len(pending)} runs failed ({failed}): their logs are named above; "
              "the same command runs them again", file=sys.stderr)
        sys.exit(1)
    print(f"all {len(runs)} runs recorded", flush=True)


if __name__ == "__main__":
    run_main(main)
