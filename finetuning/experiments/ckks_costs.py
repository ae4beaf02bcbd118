"""Seconds per CKKS operation with desilofhe's bootstrappable engine on this machine: the cost table
``experiments.encrypted_inference --costs`` prices its stage counts with.

Measured at the top level (17) on full 2^15-slot ciphertexts, each the median of --repeat runs:
a product of two ciphertexts with relinearization (``mul``), a square, a product with a
plaintext vector including its encoding (``mul_plain``, what the circuit does per diagonal: ``ops.plain_product``,
the vector as a light plaintext; ``mul_plain_array``, passed as an array, as the circuit did before) and
with one encoded beforehand, a rotation with a fixed-step key (one key switch: the price of each key
switch a rotation makes; the products and the rotation again at levels 12, 7 and 3, and 8 rotations one
by one against ``rotate_many``'s hoisted ones), rotations by several steps with the general rotation
key alone and with the roll key too (what the circuit's rotations are made of), and one bootstrap (``--key small``:
desilofhe's small bootstrap key with its roll key; ``medium``: the bootstrap key, about 16 GB).
Key generation times and sizes are recorded beside them.

    cd finetuning
    python -m experiments.ckks_costs --key small
"""

import statistics
import time
from pathlib import Path

import numpy as np
from cgf_bert.cli import ArgumentParser, note, number, run_main
from cgf_bert.fhe.context import desilofhe
from cgf_bert.fhe.ops import plain_product
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, machine
from cgf_bert.store.records import write_json


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


LOWER_LEVELS = (12, 7, 3)  # where the circuit's products run below the top: down to the next bootstrap
HOISTED = 8  # rotations of one ciphertext: about a baby-step count of the circuit's matrix products


def costs_by_level(e, c, x, rlk, rot, repeat: int, top: dict[str, float]) -> dict[str, dict[str, float]]:
    """Seconds of a product, a plaintext product and a rotation at ``c``'s level (``top``, timed already)
    and at each of ``LOWER_LEVELS``: the cost of an operation falls with the primes its ciphertext has
    left, and a circuit runs most of its operations below the top level (the stage table prices them
    all at the top)."""
    run = {"mul": lambda cl: e.multiply(cl, cl, rlk), "mul_plain": lambda cl: plain_product(e, cl, x), "rotate": lambda cl: e.rotate(cl, rot)}
    out = {str(c.level): {op: top[op] for op in run}}
    for level in LOWER_LEVELS:
        cl = e.level_down(c, level)
        out[str(level)] = {op: timed(lambda: fn(cl), repeat) for op, fn in run.items()}
    return out


def hoisting(e, sk, c, repeat: int) -> dict[str, float]:
    """``HOISTED`` rotations of one ciphertext one by one, and hoisted by ``rotate_many`` (one key
    decomposition shared): what the baby steps of a matrix product could save."""
    keys = [e.create_fixed_rotation_key(sk, k) for k in range(1, HOISTED + 1)]
    return {"rotations": HOISTED, "separate": timed(lambda: [e.rotate(c, k) for k in keys], repeat),
            "rotate_many": timed(lambda: e.rotate_many(c, keys), repeat)}


GENERAL_STEPS = (1, 3, 511, -1, -16, -512)  # left rotations by the general keys: one key switch per set bit, or per signed one


def general_rotations(e, sk, c, repeat: int) -> tuple[dict, object]:
    """Rotations by ``GENERAL_STEPS`` with desilofhe's general keys: the rotation key alone (what
    ``BootstrapOps`` had with the medium key before its fixed keys, ``keys.FixedKeys``) and with the roll key's right steps too (``ops.signed_steps``,
    the small key's set), each with the key switches ``ops.keyswitches`` counts for it, and the seconds
    per key switch. The roll key is returned: the small bootstrap key uses it."""
    from cgf_bert.fhe.ops import general_rotate, keyswitches

    t = time.perf_counter()
    rk, roll = e.create_rotation_key(sk), e.create_roll_key(sk)
    made = time.perf_counter() - t
    rows = []
    for k in GENERAL_STEPS:
        for keys, with_roll in (("rotation key", None), ("rotation and roll keys", roll)):
            sec = timed(lambda: general_rotate(e, c, k, rk, with_roll), repeat)  # noqa: B023 (timed here, in the loop)
            n = keyswitches(k, e.slot_count, with_roll is not None)
            rows.append({"step": k, "keys": keys, "keyswitches": n, "seconds": sec, "seconds_per_keyswitch": sec / n})
            note(f"rotation by {k} with the {keys}: {n} key switches, {sec:.2f} s")
    return {"keygen_seconds": made, "key_bytes": {"rotation": int(rk.nbytes), "roll": int(roll.nbytes)}, "rotations": rows}, roll


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--key", choices=("small", "medium"), default="small", help="bootstrap key (default: %(default)s)")
    p.add_argument("--repeat", type=number(int, "repeat", min=1), default=5, help="runs per operation (bootstrap: 1; default: %(default)s)")
    p.add_argument("--threads", type=number(int, "threads", min=1), default=None, help="desilofhe threads (default: the library's)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record goes to RESULTS_DIR/fhe/ (default: %(default)s)")
    args = p.parse_args()
    lib = desilofhe()
    import torch

    keygen = {}
    t = time.perf_counter()
    e = lib.Engine(bootstrap=True, mode="cpu", thread_count=args.threads)
    sk = e.create_secret_key()
    pk, rlk, ck = e.create_public_key(sk), e.create_relinearization_key(sk), e.create_conjugation_key(sk)
    keygen["engine, secret, public, relinearization and conjugation keys"] = time.perf_counter() - t
    t = time.perf_counter()
    rot = e.create_fixed_rotation_key(sk, 512)
    keygen["one fixed rotation key"] = time.perf_counter() - t
    x = np.random.default_rng(0).uniform(-1, 1, e.slot_count)
    c = e.encrypt(x, pk)
    plain = e.encode(x)
    seconds = {"mul": timed(lambda: e.multiply(c, c, rlk), args.repeat), "square": timed(lambda: e.square(c, rlk), args.repeat),
               "mul_plain": timed(lambda: plain_product(e, c, x), args.repeat),
               "mul_plain_array": timed(lambda: e.multiply(c, x), args.repeat),
               "mul_plain_encoded": timed(lambda: e.multiply(c, plain), args.repeat),
               "rotate": timed(lambda: e.rotate(c, rot), args.repeat)}
    note({k: round(v, 3) for k, v in seconds.items()})
    by_level = costs_by_level(e, c, x, rlk, rot, args.repeat, seconds)
    note(f"by level: {by_level}")
    hoisted = hoisting(e, sk, c, args.repeat)
    note(f"hoisted rotations: {hoisted}")
    general, roll = general_rotations(e, sk, c, args.repeat)
    if args.key != "small":
        del roll  # room for the medium key
    t = time.perf_counter()
    if args.key == "small":
        keys = (rlk, ck, roll, e.create_small_bootstrap_key(sk))
    else:
        keys = (rlk, ck, e.create_bootstrap_key(sk, size="medium"))
    keygen[f"{args.key} bootstrap key"] = time.perf_counter() - t
    low = e.level_down(c, 3)
    t = time.perf_counter()
    b = e.bootstrap(low, *keys)
    seconds["bootstraps"] = time.perf_counter() - t
    diff = e.decrypt(b, sk) - x
    error, rms = float(np.abs(diff).max()), float(np.sqrt(np.mean(diff**2)))
    out = {"command": command_line(), "code_version": code_version(), "machine": machine(torch.device("cpu")),
           "slots": int(e.slot_count), "max_level": int(e.max_level), "bootstrap_key": args.key, "bootstrap_from_level": 3,
           "bootstrap_level_after": int(b.level), "bootstrap_max_error": error,
           "bootstrap_rms_error": rms, "seconds": seconds, "seconds_by_level": by_level, "hoisted_rotations": hoisted,
           "general_key_rotations": general,
           "keygen_seconds": keygen, "key_bytes": {k: int(getattr(v, "nbytes", 0)) for k, v in
                                                   zip(("relinearization", "conjugation", "bootstrap"), (rlk, ck, keys[-1]))}}
    print(f"{seconds}\nbootstrap: level {b.level} after, max error {error:.1e}, rms error {rms:.1e}")
    name = f"ckks_costs-{time.strftime('%Y%m%d-%H%M%S')}"
    # every slot's input and error: the distribution a simulation of bootstraps resamples (backends.BootstrapNoise)
    out["bootstrap_errors"] = f"{name}.npz"
    saved = write_json(Path(args.results_dir) / "fhe" / f"{name}.json", out)
    np.savez_compressed(saved.with_suffix(".npz"), input=x.astype(np.float32), error=diff.astype(np.float32))
    print(f"saved {saved} (and its slots' errors, {saved.with_suffix('.npz').name})")


if __name__ == "__main__":
    run_main(main)
