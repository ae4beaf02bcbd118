"""Price a recorded ``experiments.encrypted_inference`` run with another cost table: its operation
counts per stage (a slot simulation's counts are exact) times the seconds per operation of an
``experiments.ckks_costs`` record. No model is loaded and nothing runs again (seconds).

What it answers: the same circuit with another bootstrap key, thread count or machine. A projection
like the run's own ``projected_seconds``: priced at the top level (``encrypted_inference.cost_table``
says why), so a measured run is the check.

    cd finetuning
    python -m experiments.reprice ../results/fhe/encrypted_inference-20261202-165238.json \\
        --costs ../results/fhe/ckks_costs-RECORD.json
"""

import json
import time
from pathlib import Path

from cgf_bert import CgfBertError
from cgf_bert.cli import ArgumentParser, run_main
from cgf_bert.fhe.accounting import stage_seconds, summed
from cgf_bert.fhe.keys import FixedKeys, merged, rotation_keys
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, repo_relative
from cgf_bert.store.records import write_json
from experiments.encrypted_inference import cost_table


def reprice(record: dict, costs: dict, key: str | None = None) -> list[dict]:
    """Per model of ``record``: minutes per example (the mean over its examples, each example's share
    of its ciphertext) in all and by stage kind, bootstraps per example, and the record's own projection.
    With ``key``, rotations are priced by the key switches that bootstrap key's rotation keys make of each
    recorded step (``keys.rotation_keys``; ``rotation-key``, the rotation key alone), or one each (``fixed``);
    else as the record counted them. The medium key's 15 fixed keys are the record's own where it ran with
    them; else, as a run holds one key set for all its checkpoints, chosen once, for the first model's recorded
    rotations (its dev examples': the calibration rotations a run chooses them for are not recorded)."""
    out, keys = [], None
    if key == "medium" and (record.get("rotation_keys") or {}).get("kind") == "fixed":
        slots = record["results"][0].get("layout", {}).get("slots")
        keys = FixedKeys(slots, tuple(record["rotation_keys"]["steps"])) if slots else None
    for res in record["results"]:
        examples = res["examples"]
        if not examples or not all(ex.get("stages") for ex in examples):
            raise CgfBertError(f"{res.get('label', '?')}: the record keeps no stage table per example to price")
        slots = res.get("layout", {}).get("slots")
        if key not in (None, "fixed"):  # priced from the recorded steps
            if not all(ex.get("rotation_steps") for ex in examples):
                raise CgfBertError(f"{res.get('label', '?')}: the record keeps no rotation steps to price for the {key} key's rotations")
            if not slots:
                raise CgfBertError(f"{res.get('label', '?')}: the record names no slot count to read its rotation steps by")
            if keys is None or key != "medium":
                keys = rotation_keys(key, slots, merged(d for ex in examples for d in ex["rotation_steps"].values()))
        kinds: dict[str, float] = {}
        for ex in examples:
            for kind, d in summed(ex["stages"]).items():
                if key == "fixed":
                    d = {**d, "keyswitch": d.get("rotate", 0)}
                elif key is not None:
                    steps = ex["rotation_steps"].get(kind, {})
                    d = {**d, "keyswitch": keys.cost(steps)}
                kinds[kind] = kinds.get(kind, 0.0) + stage_seconds(d, costs) / 60 / len(examples)
        recorded = [ex.get("projected_seconds") for ex in examples]
        out.append({"checkpoint": res["checkpoint"], "label": res["label"],
                    "minutes_per_example": sum(kinds.values()),
                    "by_stage_minutes": kinds,
                    "bootstraps_per_example": sum(ex["bootstraps"] for ex in examples) / len(examples),
                    "rotation_keys": keys.to_json() if keys else key,
                    "recorded_minutes_per_example": None if None in recorded else sum(recorded) / 60 / len(recorded)})
    return out


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("record", help="an experiments.encrypted_inference record (results/fhe/encrypted_inference-*.json)")
    p.add_argument("--costs", type=cost_table, required=True, help="an experiments.ckks_costs record: the seconds per operation")
    p.add_argument("--key", choices=("small", "medium", "rotation-key", "fixed"),
                   help="price rotations by the key switches these rotation keys make of each recorded step (small: the "
                        "rotation and roll keys; medium: the run's 15 fixed keys, or 15 chosen for the first model's recorded "
                        "rotations; rotation-key: the "
                        "rotation key alone, what the medium key had before; fixed: a fixed key for every step, one key switch "
                        "a rotation, as projections before key switches were counted) (default: as the record counted them)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record goes to RESULTS_DIR/fhe/ (default: %(default)s)")
    args = p.parse_args()
    try:
        record = json.loads(Path(args.record).read_text())
        record["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CgfBertError(f"{args.record}: not an encrypted_inference record ({e})") from None
    rows = reprice(record, args.costs, args.key)
    for r in rows:
        was = r["recorded_minutes_per_example"]
        print(f"{r['label'][:60]}: {r['minutes_per_example']:.1f} min per example"
              + (f" (recorded projection {was:.1f})" if was is not None else "") + f", {r['bootstraps_per_example']:g} bootstraps")
        if isinstance(r["rotation_keys"], dict):
            print(f"    rotation keys: {r['rotation_keys']['describe']}")
        for kind, m in r["by_stage_minutes"].items():
            print(f"    {kind:<22} {m:7.1f} min")
    out = {"command": command_line(), "code_version": code_version(), "record": repo_relative(Path(args.record)),
           "record_command": record.get("command"), "costs": args.costs, "key": args.key, "results": rows}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"saved {write_json(Path(args.results_dir) / 'fhe' / f'reprice-{stamp}.json', out)}")


if __name__ == "__main__":
    run_main(main)
