"""``experiments.reprice``: a recorded run's operation counts priced with another cost table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cgf_bert import CgfBertError
from experiments import reprice as R

ROOT = Path(__file__).resolve().parents[1]
COSTS = {"mul": 0.5, "square": 0.25, "mul_plain": 0.1, "rotate": 0.2, "bootstraps": 60.0}


def _record():
    stages = [{"stage": "layer 0 / softmax", "mul": 2, "bootstraps": 1, "seconds": 9.0},
              {"stage": "layer 1 / softmax", "mul_plain": 30, "rotate": 5},
              {"stage": "layer 0 / feed-forward", "square": 4}]
    ex = {"stages": stages, "bootstraps": 1, "projected_seconds": 120.0}
    other = {"stages": [{"stage": "layer 0 / softmax", "bootstraps": 3}], "bootstraps": 3, "projected_seconds": 60.0}
    return {"command": "x", "results": [{"checkpoint": "c.pt", "label": "cgf", "examples": [ex, other]}]}


def test_prices_each_stage_kind_by_hand():
    (row,) = R.reprice(_record(), COSTS)
    # example 0: softmax 2*0.5 + 60 + 30*0.1 + 5*0.2 = 65 s, feed-forward 4*0.25 = 1 s; example 1: softmax 180 s
    assert row["by_stage_minutes"]["softmax"] == pytest.approx((65 + 180) / 2 / 60)
    assert row["by_stage_minutes"]["feed-forward"] == pytest.approx(1 / 2 / 60)
    assert row["minutes_per_example"] == pytest.approx((66 + 180) / 2 / 60)
    assert row["bootstraps_per_example"] == 2
    assert row["recorded_minutes_per_example"] == pytest.approx(1.5)


def test_refuses_a_record_without_stage_tables():
    rec = _record()
    del rec["results"][0]["examples"][1]["stages"]
    with pytest.raises(CgfBertError, match="no stage table"):
        R.reprice(rec, COSTS)


def test_committed_run_repriced_with_its_own_costs_gives_its_projection():
    """An independent check on a real record: its own cost table reproduces the projection the run wrote."""
    rec = json.loads((ROOT / "results/fhe/encrypted_inference-20261202-165238.json").read_text())
    for row in R.reprice(rec, rec["costs"]):
        assert row["minutes_per_example"] == pytest.approx(row["recorded_minutes_per_example"], rel=1e-9)


def test_cli_refuses_a_file_that_is_no_record(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    costs = ROOT / "results/fhe/ckks_costs-20261201-123225.json"
    r = subprocess.run([sys.executable, "-m", "experiments.reprice", str(bad), "--costs", str(costs), "--results-dir", str(tmp_path)],
                       cwd=ROOT / "finetuning", capture_output=True, text=True)
    assert r.returncode != 0 and "not an encrypted_inference record" in r.stderr
    assert not (tmp_path / "fhe").exists()


def test_prices_rotations_by_the_key_switches_each_keys_make_of_the_recorded_steps():
    """Step 1 is one key switch either way; step -1 (32767 mod 2^15) is 15 with the rotation key alone, 1 with the
    roll key too; a record without its steps is refused for --key."""
    rec = _record()
    for ex in rec["results"][0]["examples"]:
        ex["rotation_steps"] = {"softmax": {"1": 2, "32767": 3}} if ex["stages"][0].get("mul") else {"softmax": {}}
    rec["results"][0]["layout"] = {"slots": 32768}
    costs = {**COSTS, "mul_plain": 0.0, "mul": 0.0, "square": 0.0, "bootstraps": 0.0}
    small, alone, medium, fixed = (R.reprice(rec, costs, key)[0] for key in ("small", "rotation-key", "medium", "fixed"))
    assert small["by_stage_minutes"]["softmax"] == pytest.approx((2 + 3) * 0.2 / 2 / 60)
    assert alone["by_stage_minutes"]["softmax"] == pytest.approx((2 + 3 * 15) * 0.2 / 2 / 60)
    # the medium key's fixed keys are chosen for the recorded steps: 1 and -1 both get a key of their own
    assert medium["by_stage_minutes"]["softmax"] == pytest.approx((2 + 3) * 0.2 / 2 / 60)
    assert {1, 32767} <= set(medium["rotation_keys"]["steps"])
    assert fixed["by_stage_minutes"]["softmax"] == pytest.approx(5 * 0.2 / 2 / 60)  # the recorded rotations, one key switch each
    del rec["results"][0]["examples"][0]["rotation_steps"]
    with pytest.raises(CgfBertError, match="no rotation steps"):
        R.reprice(rec, costs, "small")


def test_a_record_without_its_slot_count_is_refused_for_key_pricing():
    rec = _record()
    for ex in rec["results"][0]["examples"]:
        ex["rotation_steps"] = {"softmax": {"1": 1}}
    with pytest.raises(CgfBertError, match="no slot count"):
        R.reprice(rec, COSTS, "medium")


def test_a_medium_key_record_repriced_for_the_medium_key_uses_the_runs_own_fixed_keys():
    """The run counted each rotation by the 15 fixed keys it chose and recorded: priced for ``--key medium``
    with its own costs, the record gives back its projection (keys chosen again from its dev steps would not)."""
    rec = json.loads((ROOT / "results/fhe/encrypted_inference-20261203-095844.json").read_text())
    assert rec["rotation_keys"]["kind"] == "fixed"
    for row in R.reprice(rec, rec["costs"], "medium"):
        assert row["rotation_keys"]["steps"] == rec["rotation_keys"]["steps"]
        assert row["minutes_per_example"] == pytest.approx(row["recorded_minutes_per_example"], rel=1e-9)
