"""The committed evidence: every record is strict JSON without machine paths, every run record
(written by every version of the code so far) reads back into today's configs and names the
same run, and summary.md's generated tables are what summarize.py builds from the committed
records (never stale)."""

import json
from pathlib import Path

import pytest

from cgf_bert.approx.approximations import Approximations
from cgf_bert.config import TASK, DistillConfig, TrainConfig
from cgf_bert.report.summary import render
from cgf_bert.store.names import Variant, run_name
from cgf_bert.store.records import config_json, distill_config, load_records, migrate, train_config

REPO = Path(__file__).resolve().parents[1]
RECORDS = sorted((REPO / "results").rglob("*.json"))


def _no_constant(name):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.relative_to(REPO)))
def test_record_is_strict_json_without_absolute_paths(path):
    text = path.read_text()
    json.loads(text, parse_constant=_no_constant)
    for prefix in ('"/work/', '"/home/', '"/root/', '"/tmp/', " /work/", " /home/", " /tmp/"):
        assert prefix not in text, f"{path.name} names a path of the machine that made it ({prefix.strip()})"


def test_summary_tables_are_fresh():
    summary = (REPO / "summary.md").read_text()
    records = load_records(REPO / "results")
    for r in records:  # render from repository-relative names, as summarize.py does from the repository
        r["_path"] = str(Path(r["_path"]).relative_to(REPO))
    assert render(summary, records) == summary, "summary.md is stale: cd finetuning && python summarize.py"


RUNS = [r for r in load_records(REPO / "results") if r.get("script") in ("finetune", "distill")]


def test_every_committed_record_loads():
    records = load_records(REPO / "results")
    assert len(records) == len(RECORDS)  # each file, once
    assert len(RUNS) > 100 and {r["script"] for r in RUNS} == {"finetune", "distill"}


@pytest.mark.parametrize("rec", RUNS, ids=lambda r: r["name"])
def test_a_committed_run_reads_as_todays_configs_and_names_itself(rec):
    """The record's configs under today's classes (``migrate``'s rule for the fields it predates):
    the run name rendered from them is the name the run was given when it ran (the time apart),
    and the migrated config holds every field, once, in today's JSON form."""
    cfg, dcfg = train_config(rec), distill_config(rec)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.approx, Approximations)
    assert (dcfg is None) == (rec["script"] == "finetune") and (dcfg is None or isinstance(dcfg, DistillConfig))
    assert cfg.seed == rec["seed"] and cfg.task == TASK
    stamp = len("20261123-114551-")
    assert run_name(rec["script"], cfg, dcfg)[stamp:] == rec["name"][stamp:]
    assert Variant.of_record(rec) == Variant.of(cfg, dcfg)
    today = migrate(rec)["config"]
    assert "softmax" not in today and "coeff" not in today
    assert {k: v for k, v in config_json(cfg).items() if k in today} == today  # nothing read differently from what is stored
    assert migrate(migrate(rec)) == migrate(rec)  # idempotent: a record read twice reads the same
