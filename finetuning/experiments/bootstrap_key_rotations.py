"""Which rotation steps a desilofhe bootstrap key rotates by, and what a rotation by one of them costs.

desilofhe rotates with a bootstrap key (``engine.rotate(ct, bootstrap_key, step)``; THOR does so for most of
its rotations), and a step it rotates by needs no key made or kept beside it: the circuit's 15 fixed keys
(``fhe/keys.py``) are 3.9 GB beside the medium key. The library does not say which steps it takes, so this
tries 313 candidates on a ciphertext, keeps those that rotate correctly (checked against ``np.roll``; one
accepted but wrong is reported apart) and times each at ``--level``, beside one fixed rotation key's rotation
at the same level. (The medium key rotated by all 313: summary.md finding 102.)

With ``--circuit RECORD`` (a partial record of ``experiments.encrypted_inference --state``) it times instead the
steps the record's first ciphertext rotates by, ``--repeat`` times each, both ways: by the bootstrap key, and as
the run does, through the fixed keys ``--fixed`` (the run's printed "rotation keys"; ``keys.FixedKeys.path``),
and prices the ciphertext's rotations both ways at ``--level``.

    cd finetuning
    python -m experiments.bootstrap_key_rotations --key medium
    python -m experiments.bootstrap_key_rotations --circuit ../results/fhe/encrypted_inference_partial-20261208-022505.json \
        --fixed=-6656,-512,-224,-32,-4,-2,1,2,7,8,16,32,128,512,10752 --repeat 3
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
from cgf_bert.cli import ArgumentParser, note, number, run_main
from cgf_bert import CgfBertError
from cgf_bert.fhe.context import desilofhe
from cgf_bert.fhe.keys import FixedKeys, merged
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, machine
from cgf_bert.store.records import write_json
from experiments.ckks_costs import timed


def candidates(slots: int) -> list[int]:
    """Steps to try, each in [1, slots): +-1..16, +-multiples of 8 to 1,024, +-multiples of 1,024, and
    every power of two and its negative."""
    steps = set(range(1, 17)) | set(range(8, 1025, 8)) | set(range(1024, slots, 1024)) | {2**i for i in range(slots.bit_length() - 1)}
    return sorted({s % slots for s in steps} | {-s % slots for s in steps} - {0})


def probe(engine, key, ct, values: np.ndarray, secret, steps: list[int]) -> dict:
    """{"held": [{step, seconds, max_error}] for the steps ``key`` rotates by correctly, "refused": the steps the
    library refuses with it, "wrong": those it accepts but rotates wrongly (a circuit would be silently wrong there)}."""
    out: dict = {"held": [], "refused": [], "wrong": []}
    for step in steps:
        t = time.perf_counter()
        try:
            rotated = engine.rotate(ct, key, step)
        except (RuntimeError, ValueError):  # desilofhe refuses a step the key does not hold
            out["refused"].append(step)
            continue
        seconds = time.perf_counter() - t
        error = float(np.abs(engine.decrypt(rotated, secret).real - np.roll(values, -step)).max())
        if error > 1e-3:  # a left rotation by ``step`` errs by the encoding noise, about 1e-7
            out["wrong"].append({"step": step, "max_error": error})
        else:
            out["held"].append({"step": step, "seconds": round(seconds, 4), "max_error": error})
    return out


def circuit_steps(record: str, slots: int) -> dict[int, float]:
    """{step mod the slots: rotations} of the first ciphertext of a partial ``encrypted_inference`` record."""
    try:
        progress = json.loads(Path(record).read_text())["progress"]
        first = progress[sorted(progress)[0]]["log"]["steps"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise CgfBertError(f"{record}: not a partial encrypted_inference record with a ciphertext's rotation steps ({e})") from None
    return merged(first.values(), slots)


def compare(engine, boot_key, fixed: dict, keys: FixedKeys, ct, counts: dict[int, float], repeat: int) -> dict:
    """Per step of ``counts``: the median seconds of a rotation by the bootstrap key and through the fixed keys'
    path; and the ciphertext's rotations priced both ways."""
    def by_fixed(k):
        out = ct
        for step in keys.path(k):
            out = engine.rotate(out, fixed[step % keys.slots])
        return out

    rows = [{"step": k, "rotations": n, "bootstrap_key": timed(lambda: engine.rotate(ct, boot_key, k), repeat),
             "fixed_keys": timed(lambda: by_fixed(k), repeat), "fixed_key_switches": keys.switches(k)}
            for k, n in sorted(counts.items())]
    return {"steps": rows, "seconds_bootstrap_key": sum(r["rotations"] * r["bootstrap_key"] for r in rows),
            "seconds_fixed_keys": sum(r["rotations"] * r["fixed_keys"] for r in rows)}


def steps_list(text: str) -> tuple[int, ...]:
    """``--fixed``: comma-separated integer steps."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integer steps, e.g. =-4,1,2,512; got {text!r}") from None


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key", choices=("small", "medium"), default="medium", help="bootstrap key (default: %(default)s)")
    p.add_argument("--level", type=number(int, "level", min=0, max=17), default=7,
                   help="the level the rotations run at (default: %(default)s, about the circuit's mean)")
    p.add_argument("--circuit", metavar="RECORD", help="time the steps this partial encrypted_inference record's first ciphertext rotates by")
    p.add_argument("--fixed", type=steps_list, default=(),
                   help="with --circuit: the run's fixed rotation-key steps, comma-separated (as its record prints them)")
    p.add_argument("--repeat", type=number(int, "repeat", min=1), default=1, help="with --circuit: runs per rotation, the median kept")
    p.add_argument("--threads", type=number(int, "threads", min=1), default=None, help="desilofhe threads (default: the library's)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record goes to RESULTS_DIR/fhe/ (default: %(default)s)")
    args = p.parse_args()
    counts = circuit_steps(args.circuit, 2**15) if args.circuit else None  # refused before any key
    if args.circuit and not args.fixed:
        raise CgfBertError("--circuit compares with the run's fixed rotation keys: give their steps with --fixed")
    lib = desilofhe()
    import torch

    e = lib.Engine(bootstrap=True, mode="cpu", thread_count=args.threads)
    sk = e.create_secret_key()
    t = time.perf_counter()
    key = e.create_small_bootstrap_key(sk) if args.key == "small" else e.create_bootstrap_key(sk, size="medium")
    keygen = time.perf_counter() - t
    note(f"{args.key} bootstrap key: {keygen:.0f} s")
    values = np.random.default_rng(0).uniform(-1, 1, e.slot_count)
    ct = e.encrypt(values, sk, level=args.level)
    if counts is not None:
        fixed = {k % e.slot_count: e.create_fixed_rotation_key(sk, k % e.slot_count) for k in args.fixed}
        result = compare(e, key, fixed, FixedKeys(int(e.slot_count), tuple(args.fixed)), ct, counts, args.repeat)
        out = {"command": command_line(), "code_version": code_version(), "machine": machine(torch.device("cpu")),
               "bootstrap_key": args.key, "keygen_seconds": round(keygen, 1), "level": args.level, "repeat": args.repeat,
               "circuit": args.circuit, "fixed_steps": list(args.fixed), **result}
        print(f"{sum(counts.values()):.0f} rotations by {len(counts)} steps at level {args.level}: "
              f"{result['seconds_bootstrap_key']:.0f} s by the bootstrap key, {result['seconds_fixed_keys']:.0f} s through the fixed keys")
        saved = write_json(Path(args.results_dir) / "fhe" / f"bootstrap_key_rotations-{time.strftime('%Y%m%d-%H%M%S')}.json", out)
        print(f"saved {saved}")
        return
    steps = candidates(int(e.slot_count))
    found = probe(e, key, ct, values, sk, steps)
    fixed = e.create_fixed_rotation_key(sk, 3)  # the price of one key switch by a key made for the step
    t = time.perf_counter()
    e.rotate(ct, fixed)
    fixed_seconds = time.perf_counter() - t
    held = found["held"]
    out = {"command": command_line(), "code_version": code_version(), "machine": machine(torch.device("cpu")),
           "slots": int(e.slot_count), "bootstrap_key": args.key, "keygen_seconds": round(keygen, 1), "level": args.level,
           "tried": len(steps), "held_steps": [h["step"] for h in held], "held": held, "refused": len(found["refused"]),
           "wrong": found["wrong"], "fixed_key_rotation_seconds": round(fixed_seconds, 4)}
    mean = np.mean([h["seconds"] for h in held]) if held else float("nan")
    print(f"{args.key} bootstrap key: rotates by {len(held)} of {len(steps)} steps tried: {out['held_steps']}\n"
          f"a rotation by one of them at level {args.level}: {mean:.3f} s on average; by a fixed rotation key: {fixed_seconds:.3f} s"
          + (f"\nWRONG: {len(found['wrong'])} steps accepted but rotated wrongly: {[w['step'] for w in found['wrong']]}" if found["wrong"] else ""))
    saved = write_json(Path(args.results_dir) / "fhe" / f"bootstrap_key_rotations-{time.strftime('%Y%m%d-%H%M%S')}.json", out)
    print(f"saved {saved}")


if __name__ == "__main__":
    run_main(main)
