"""The committed evidence: every record is strict JSON without machine paths, and summary.md's
generated tables are what summarize.py builds from the committed records (never stale)."""

import json
from pathlib import Path

import pytest

from cgf_bert.report.summary import render
from cgf_bert.store.records import load_records

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
