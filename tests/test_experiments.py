"""Experiment modules and the summary builder, end to end on the tiny model.

Each module's first run here is a process of its own (``module``); its reruns and refusals call
its ``main`` in this process (``in_process``: the same code, without the start-up)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.config import DistillConfig, TrainConfig
from cgf_bert.report.stats import fmt_pm, mean_std, t_interval
from cgf_bert.report.summary import plot_paired_deltas, render
from cgf_bert.report.tables import paired_deltas, reference_groups
from cgf_bert.store.records import config_json, free_stamp, write_json
from cgf_bert.train.sweeps import find_record

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"


def module(name, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", name, *map(str, args)], cwd=FINETUNING, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def in_process(monkeypatch, capsys, name, *args):
    """``name``'s stdout, its main run in this process; it must succeed."""
    code, out, err = run_script(monkeypatch, capsys, name, *args)
    assert code == 0, err[-3000:]
    return out


def test_coeff_sweep_trains_once_then_reuses_records(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    args = ["--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--batch-size", 8,
            "--coeffs", 0.5, 0.7, "--seeds", 1, "--results-dir", tmp_path]
    out = module("experiments.coeff_sweep", *args)
    assert "c=0.5" in out and "c=0.7" in out
    assert len(list(tmp_path.glob("*.json"))) == 2
    (png,) = tmp_path.glob("experiments/coeff_sweep-*.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "no exact run on every seed" in out
    # with an exact run of the same seed on record, the sweep draws it as the line to reach (and trains nothing)
    in_process(monkeypatch, capsys, "finetune.py", "--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--batch-size", 8,
               "--seed", 1, "--results-dir", tmp_path)
    (exact,) = [json.loads(p.read_text()) for p in tmp_path.glob("*-finetune-exact-s1.json")]
    out = in_process(monkeypatch, capsys, "experiments.coeff_sweep", *args)
    assert len(list(tmp_path.glob("*.json"))) == 3  # nothing retrained
    summary = json.loads(sorted(tmp_path.glob("experiments/coeff_sweep-*.json"))[-1].read_text())
    assert summary["exact_accuracy"] == [exact["best"]["accuracy"]] and summary["exact_records"] == [exact["name"]]
    assert f"exact {exact['best']['accuracy'] * 100:.2f}" in out
    # --recorded tabulates the records alone, paired by seed against --base; a missing run is refused first
    acc = {c: json.loads(next(tmp_path.glob(f"*-finetune-cgf{c}-s1.json")).read_text())["best"]["accuracy"] for c in ("0.5", "0.7")}
    in_process(monkeypatch, capsys, "experiments.coeff_sweep", *args, "--recorded")
    summary = json.loads(sorted(tmp_path.glob("experiments/coeff_sweep-*.json"))[-1].read_text())
    assert summary["base"] == 0.5 and summary["paired_vs_base"]["0.7"] == pytest.approx([(acc["0.7"] - acc["0.5"]) * 100])
    code, _, err = run_script(monkeypatch, capsys, "experiments.coeff_sweep", *args[:8], "--coeffs", 0.5, 0.9, "--seeds", 1,
                              "--results-dir", tmp_path, "--recorded")
    assert code != 0 and "no record for c=0.9 seed 1" in err
    assert len(list(tmp_path.glob("*.json"))) == 3  # nothing trained by either


def test_records_that_predate_a_setting_are_found_with_its_default(tmp_path):
    cfg, dcfg = TrainConfig(approx=Approximations(softmax=softmax_spec("cgf", coeff=0.5)), seed=42), DistillConfig()
    old = {k: v for k, v in config_json(cfg).items() if k != "compile"}  # made before --compile existed
    old_kd = {k: v for k, v in config_json(dcfg).items() if k != "cache_teacher"}
    write_json(tmp_path / "a-finetune.json", {"name": "a", "script": "finetune", "config": old, "best": {}})
    write_json(tmp_path / "b-distill.json", {"name": "b", "script": "distill", "config": old, "distill": old_kd, "best": {}})
    assert find_record(cfg, None, tmp_path)["name"] == "a"
    assert find_record(cfg, dcfg, tmp_path)["name"] == "b"
    assert find_record(dataclasses.replace(cfg, compile=True), None, tmp_path) is None  # a default is not a wildcard
    assert find_record(cfg, dataclasses.replace(dcfg, cache_teacher=False), tmp_path) is None


def test_records_made_before_specs_are_found(tmp_path):
    """A record that held the softmax as a name with the coefficient apart, and the KD
    temperature apart from its term, matches the same run described with specs and terms."""
    cfg, dcfg = TrainConfig(approx=Approximations(softmax=softmax_spec("cgf", coeff=0.65)), seed=7), DistillConfig()
    old = {**config_json(cfg), "softmax": "cgf", "coeff": 0.65}
    old_kd = {"alpha": 0.5, "temperature": 2.0, "beta": 10.0, "init": "pretrained", "cache_teacher": True,
              "terms": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5}, {"loss": "hidden_mse", "weight": 10.0}]}
    write_json(tmp_path / "a-distill.json", {"name": "a", "script": "distill", "config": old, "distill": old_kd, "best": {}})
    assert find_record(cfg, dcfg, tmp_path)["name"] == "a"
    assert find_record(dataclasses.replace(cfg, approx=Approximations(softmax=softmax_spec("cgf", coeff=0.5))), dcfg, tmp_path) is None


def test_exact_vs_cgf_swap_and_paired(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    common = ["--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--batch-size", 8, "--results-dir", tmp_path]
    module("experiments.exact_vs_cgf", *common, "--swap-coeffs", "--paired", "--coeff", 0.65, "--seeds", 1, 2)
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert sorted((r["config"]["approx"]["softmax"]["name"], r["seed"]) for r in recs) == [("cgf", 1), ("cgf", 2), ("exact", 1), ("exact", 2)]
    assert {r["config"]["approx"]["softmax"].get("coeff") for r in recs} == {None, 0.65}
    exact = next(r for r in recs if r["config"]["approx"]["softmax"]["name"] == "exact")
    out = in_process(monkeypatch, capsys, "experiments.exact_vs_cgf", *common, "--checkpoint", Path(exact["checkpoint"]).resolve(),
                     "--swap-coeffs", 0.5, 1.0)
    summary = sorted(tmp_path.glob("experiments/exact_vs_cgf-*.json"))[-1]
    rows = json.loads(summary.read_text())["swap"]["rows"]
    assert [r["label"] for r in rows] == ["exact", "cgf c=0.5", "cgf c=1"]
    assert rows[0]["accuracy"] == exact["best"]["accuracy"]  # exact swap reproduces training
    assert "cgf c=0.5" in out


def fake(name, script, softmax, coeff, seed, acc, beta=None, epochs=5, grouped=True, init="teacher"):
    rec = {
        "name": name, "_path": f"/r/{name}.json", "script": script, "command": f"{script}.py --seed {seed}", "seed": seed,
        "config": {"model": "minilm-l6", "softmax": softmax, "coeff": coeff, "epochs": epochs, "lr": 5e-5, "batch_size": 16,
                   "weight_decay": 0.0, "max_grad_norm": 1.0, "freeze_embeddings": True, "max_length": 128, "group_by_length": grouped, "limit": None},
        "best": {"accuracy": acc, "f1": acc}, "best_epoch": 3, "wall_seconds": 600, "device": "cpu", "code_version": "abc",
    }
    if beta is not None:  # the legacy layout: the preset's settings beside the terms, the temperature apart
        terms = [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5}] + ([{"loss": "hidden_mse", "weight": beta}] if beta else [])
        rec["distill"] = {"beta": beta, "init": init, "temperature": 2.0, "terms": terms}
    return rec


def test_summary_tables_are_built_from_records():
    recs = [
        fake("a", "finetune", "exact", 0.5, 1, 0.80), fake("b", "finetune", "exact", 0.5, 2, 0.82),
        fake("c", "distill", "cgf", 0.5, 1, 0.79, beta=10), fake("d", "distill", "cgf", 0.5, 2, 0.80, beta=10),
        fake("e", "finetune", "cgf", 0.65, 1, 0.70, epochs=1),  # not the reference recipe: not in the results table
        fake("f", "finetune", "cgf", 0.65, 2, 0.71, grouped=False),  # random batches: an older recipe, not in it either
    ]
    text = render("intro\n<!-- table:results -->\nold\n<!-- /table -->\nmid\n<!-- table:runs -->\n<!-- /table -->\nend", recs)
    assert text.startswith("intro\n") and "\nmid\n" in text and text.endswith("end") and "old" not in text
    results = text.split("<!-- table:results -->")[1].split("<!-- /table -->")[0]
    assert "| exact | 1 2 | 81.00 ± 1.41 |" in results
    assert "| cgf c=0.5 KD beta=10 (teacher init) | 1 2 | 79.50 ± 0.71 |" in results
    assert "-1.50 ± 0.71 (2) | [-7.85, +4.85] |" in results  # paired: (-1, -2) points; t(1 df) = 12.706
    assert "c=0.65" not in results
    assert text.count("`finetune.py --seed") == 4  # every run, reference recipe or not, in the runs table


def test_paired_deltas_and_their_plot(tmp_path):
    recs = [
        fake("a", "finetune", "exact", 0.5, 1, 0.80), fake("b", "finetune", "exact", 0.5, 2, 0.82),
        fake("c", "distill", "cgf", 0.5, 1, 0.79, beta=10), fake("d", "distill", "cgf", 0.5, 2, 0.80, beta=10),
        fake("e", "distill", "cgf", 0.5, 2, 0.83, beta=10),  # newer run of seed 2 replaces "d"
        fake("f", "finetune", "cgf", 0.5, 3, 0.75),  # seed 3 has no exact run: no pair
    ]
    deltas = {key.label(): d for key, d in paired_deltas(reference_groups(recs)).items()}  # rows keyed by value, shown by label
    assert set(deltas) == {"cgf c=0.5 KD beta=10 (teacher init)", "cgf c=0.5 CE"}
    kd = deltas["cgf c=0.5 KD beta=10 (teacher init)"]
    assert kd.keys() == {1, 2} and abs(kd[1] + 0.01) < 1e-12 and abs(kd[2] - 0.01) < 1e-12
    assert deltas["cgf c=0.5 CE"] == {}
    png = plot_paired_deltas(recs, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    assert (border > 0.99).all()  # nothing touches the canvas's edge: no title, label or tick is clipped
    assert plot_paired_deltas(recs[2:], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_contrasts_pair_rows_by_seed():
    recs = [
        fake("a", "finetune", "cgf", 0.5, 1, 0.78), fake("b", "finetune", "cgf", 0.5, 2, 0.79),
        fake("c", "distill", "cgf", 0.5, 1, 0.80, beta=10, init="pretrained"),
        fake("d", "distill", "cgf", 0.5, 2, 0.78, beta=10, init="pretrained"),
        fake("e", "distill", "cgf", 0.5, 3, 0.81, beta=10, init="pretrained"),  # no CE run of seed 3: no pair
    ]
    text = render("<!-- table:contrasts -->\n<!-- /table -->", recs)
    row = next(line for line in text.splitlines() if line.startswith("| KD over plain CE, c=0.5 |"))
    # per seed +2 and -1 points: mean 0.50, std 2.12; t(1 df) 12.706 * 2.1213 / sqrt(2) = 19.06
    assert row.endswith("| 1 2 | 0.50 ± 2.12 | [-18.56, +19.56] | 1 of 2 |"), row
    assert "| c=0.65 over c=0.5, CE | cgf c=0.65 CE − cgf c=0.5 CE | — | — | — | — |" in text  # no c=0.65 runs yet


def test_benchmark_tables_show_the_newest_record():
    old = {"_path": "/r/benchmarks/bench-20260101-000000.json", "device": "cpu", "code_version": "a", "command": "x",
           "steps": [{"mode": "ce", "ms_per_step": 100.0}], "columns": {"steps": ["mode", "ms_per_step"]}}
    new = {**old, "_path": "/r/benchmarks/bench-20260102-000000.json", "steps": [{"mode": "ce", "ms_per_step": 50.0}]}
    text = render("<!-- table:bench_steps -->\n<!-- /table -->\n<!-- table:bench_attention -->\n<!-- /table -->", [new, old])
    assert "bench-20260102-000000.json" in text and "| ce | 50 |" in text and "| ce | 100 |" not in text
    assert "no benchmark record with an attention table" in text


def test_seed_statistics():
    assert mean_std([0.8]) == (0.8, 0.0)
    m, s = mean_std([1, 2, 3, 4, 5])
    assert m == 3 and abs(s - 1.5811388) < 1e-6
    lo, hi = t_interval([1, 2, 3, 4, 5])  # 3 ± t(0.975, 4 df) * s / sqrt(5) = 3 ± 2.776 * 0.7071
    assert abs(lo - 1.0368) < 1e-3 and abs(hi - 4.9632) < 1e-3
    assert t_interval([0.5]) is None
    assert fmt_pm([0.8, 0.82]) == "81.00 ± 1.41" and fmt_pm([]) == "—" and fmt_pm([0.8]) == "80.00"


def test_poly_swap_scores_a_cgf_checkpoint_with_polynomial_exps(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    from cgf_bert.model.bert import build_model
    from cgf_bert.store.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "cgf.pt", build_model(str(tiny_bert), softmax_spec("cgf", coeff=0.5)), {"model": str(tiny_bert)})
    out = module("experiments.poly_swap", ckpt, "--data-dir", tiny_mrpc, "--settings", "10,-40,20,5", "2,0.5,1,0", "--results-dir", tmp_path)
    (rec_path,) = tmp_path.glob("experiments/poly_swap-*.json")
    rows = json.loads(rec_path.read_text())["rows"]
    assert [r["label"] for r in rows] == ["cgf c=0.5", "cgf_poly c=0.5 d=10 [-40,20] k=5", "cgf_poly c=0.5 d=2 [0.5,1] k=0"]
    assert rows[0]["agreement"] == 1.0 and rows[0]["depth"] is None and "out_of_range" not in rows[0]
    # a wide, accurate polynomial is plain CGF; a fit on [0.5, 1] sees arguments outside it (counted, not clipped)
    assert rows[1]["accuracy"] == rows[0]["accuracy"] and rows[1]["agreement"] == 1.0 and rows[1]["depth"] == 3 + (4 + 1 + 5)
    assert rows[1]["out_of_range"]["outside"] == 0 and rows[2]["out_of_range"]["outside"] > 0
    assert "cgf_poly c=0.5 d=10" in out and len(list(tmp_path.glob("experiments/poly_swap-*.png"))) == 1
    code, _, err = run_script(monkeypatch, capsys, "experiments.poly_swap", ckpt, "--settings", "8,-32,32")
    assert code == 2 and err.strip().splitlines() == [
        "poly_swap.py: error: argument --settings: takes DEGREE,LO,HI,SQUARINGS (e.g. 8,-32,32,5), got '8,-32,32'"]


def test_a_benchmark_fine_tune_is_neither_reused_nor_tabulated(tmp_path):
    # The precision benchmark's 5-epoch runs write ordinary run records under results/benchmarks/;
    # a plan or sweep must still train that run for the tables, which leave benchmark runs out.
    rec = {"name": "20261130-231106-finetune-exact-bf16-s42", "script": "finetune", "seed": 42,
           "config": config_json(dataclasses.replace(TrainConfig(), precision="bf16")), "best": {"accuracy": 0.8}}
    cfg = dataclasses.replace(TrainConfig(), precision="bf16")
    write_json(tmp_path / "benchmarks" / f"{rec['name']}.json", rec)
    assert find_record(cfg, None, tmp_path) is None
    write_json(tmp_path / f"{rec['name']}.json", rec)
    assert find_record(cfg, None, tmp_path)["name"] == rec["name"]


def test_an_experiment_marker_renders_that_record_s_settings_table(tmp_path):
    from cgf_bert.report.compare import compare_settings, settings_table
    from cgf_bert.store.records import load_records

    def rec(seed, acc):
        return {"name": f"r{seed}-{acc}", "seed": seed, "best": {"accuracy": acc}}

    groups = {"KD beta=10 (pretrained init)": [rec(42, 0.80), rec(7, 0.82)], "+ attn_kl=1": [rec(42, 0.81), rec(7, 0.80)]}
    rows = compare_settings(groups, [rec(42, 0.81), rec(7, 0.81)], "KD beta=10 (pretrained init)")
    write_json(tmp_path / "experiments" / "loss_ablation-20261201-010000.json",
               {"command": "-m experiments.loss_ablation --no-train", "base_label": "KD beta=10 (pretrained init)", "rows": rows})
    text = "a\n<!-- table:experiment:loss_ablation-20261201-010000 -->\nold\n<!-- /table -->\nb\n<!-- table:experiment:nope -->\n<!-- /table -->\n"
    out = render(text, load_records(tmp_path))
    assert settings_table(rows, "KD beta=10 (pretrained init)") in out and "old" not in out
    assert "| + attn_kl=1 | 42 7 | 80.50 ± 0.71 |" in out and "(no experiment record nope.json)" in out
    assert "input-dependent" not in out  # only variant rows carry the division column


def test_the_single_replacement_contrasts_are_the_rows_their_plan_trains():
    """summary.md's issue-22 contrasts read the runs of experiments/plans/fp32_single_replacements.toml:
    each run's configs, parsed by distill.py's own parser, are a row a contrast names."""
    from experiments.run_plan import load_plan

    from cgf_bert.report.tables import CONTRASTS, POLY, recipe_with
    from cgf_bert.store.names import Variant

    trained = {Variant.of(r.cfg, r.dcfg) for r in load_plan(FINETUNING / "experiments/plans/fp32_single_replacements.toml")}
    singles = {recipe_with(**{op: spec}) for op, spec in POLY.items()}
    assert trained == singles
    assert singles | {recipe_with(), recipe_with(**POLY)} <= {row for _, a, b in CONTRASTS for row in (a, b)}


def test_two_runs_begun_in_the_same_second_keep_both_records(tmp_path):
    """The stamp of a run begun at ``start`` moves past a second whose record another run already wrote."""
    import time

    start = time.mktime((2026, 12, 3, 20, 27, 21, 0, 0, -1))
    first = free_stamp(tmp_path, "run-{}.json", "run-{}.png", start=start)
    assert first == "20261203-202721"
    (tmp_path / f"run-{first}.png").write_text("")  # either file takes the stamp
    assert free_stamp(tmp_path, "run-{}.json", "run-{}.png", start=start) == "20261203-202722"
