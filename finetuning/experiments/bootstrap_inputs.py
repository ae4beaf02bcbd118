"""A bootstrap's error by the shape of its input: the same key on slot vectors of one range that differ
in their mean.

Why: inside the encoder circuit every bootstrap site but one erred as much as a bootstrap of uniform
values on [-1, 1] does (``experiments.ckks_costs``, about 2-3e-5 at most over 32,768 slots with the
medium key), while LayerNorm's variance, mapped onto the rsqrt fit's [-1, 1], erred about eight times
more (summary, finding 87). That input sits near one end of its range in nearly every slot: its slots'
mean, the message polynomial's constant coefficient, is as large as the values themselves, where
uniform values spread over all coefficients and leave each one about 1/sqrt(N) of that. A bootstrap's
modular reduction is approximated on the coefficients, not on the slots. Each shape here is bootstrapped
once from level ``FROM_LEVEL``, as ``ckks_costs`` does, on values of its own seed (its index here), and its
slot errors are recorded with the shape's mean.

    cd finetuning
    python -m experiments.bootstrap_inputs --key medium   # fhe extra; ~20 GB and ~15 min with the medium key
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from cgf_bert.cli import ArgumentParser, note, number, run_main
from cgf_bert.fhe.context import desilofhe
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, machine
from cgf_bert.store.records import write_json


@dataclass(frozen=True)
class Shape:
    """Slot values on [-1, 1]: ``make(rng, slots)``."""

    label: str
    make: Callable[[np.random.Generator, int], np.ndarray]


FROM_LEVEL = 3  # as experiments.ckks_costs bootstraps
SHAPES = {
    "uniform": Shape("uniform on [-1, 1], mean 0 (the ckks_costs probe)", lambda r, n: r.uniform(-1, 1, n)),
    "small": Shape("uniform on [-0.05, 0.05], mean 0", lambda r, n: r.uniform(-0.05, 0.05, n)),
    "positive": Shape("uniform on [0, 1], mean 0.5", lambda r, n: r.uniform(0, 1, n)),
    "variance": Shape("-0.495 + uniform on [-0.05, 0.05]: the rsqrt input's shape, as scaled by its bound 2",
                      lambda r, n: -0.495 + r.uniform(-0.05, 0.05, n)),
    "constant": Shape("0.5 in every slot", lambda r, n: np.full(n, 0.5)),
    "near_one": Shape("0.9 + uniform on [-0.05, 0.05]", lambda r, n: 0.9 + r.uniform(-0.05, 0.05, n)),
    "negative": Shape("uniform on [-1, 0], mean -0.5: is the offset odd in the mean?", lambda r, n: r.uniform(-1, 0, n)),
}


def bootstrap_errors(e, sk, pk, keys, x: np.ndarray, level: int = FROM_LEVEL) -> dict:
    """One bootstrap of ``x`` encrypted and taken down to ``level``: its slot errors against ``x``."""
    c = e.level_down(e.encrypt(x, pk), level)
    start = time.perf_counter()
    b = e.bootstrap(c, *keys)
    seconds = time.perf_counter() - start
    err = e.decrypt(b, sk) - x
    return {"mean": float(np.mean(x)), "max_abs_value": float(np.abs(x).max()), "max_error": float(np.abs(err).max()),
            "rms_error": float(np.sqrt(np.mean(err**2))), "mean_error": float(np.mean(err)), "seconds": seconds,
            "level_after": int(b.level)}


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--key", choices=("small", "medium"), default="medium", help="bootstrap key (default: %(default)s, the encrypted run's)")
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=tuple(SHAPES), help="input shapes (default: all)")
    p.add_argument("--threads", type=number(int, "threads", min=1), default=None, help="desilofhe threads (default: the library's)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record goes to RESULTS_DIR/fhe/ (default: %(default)s)")
    args = p.parse_args()
    lib = desilofhe()
    import torch

    out_dir = Path(args.results_dir) / "fhe"
    start = time.perf_counter()
    e = lib.Engine(bootstrap=True, mode="cpu", thread_count=args.threads)
    sk = e.create_secret_key()
    pk, rlk, ck = e.create_public_key(sk), e.create_relinearization_key(sk), e.create_conjugation_key(sk)
    if args.key == "small":
        keys = (rlk, ck, e.create_roll_key(sk), e.create_small_bootstrap_key(sk))
    else:
        keys = (rlk, ck, e.create_bootstrap_key(sk, size="medium"))
    keygen = time.perf_counter() - start
    note(f"keys: {keygen:.0f} s")
    rows = {}
    for name in dict.fromkeys(args.shapes):  # each once, on its own seed whichever come before it
        x = SHAPES[name].make(np.random.default_rng(list(SHAPES).index(name)), e.slot_count)
        rows[name] = {"shape": SHAPES[name].label, "seed": list(SHAPES).index(name), **bootstrap_errors(e, sk, pk, keys, x)}
        r = rows[name]
        print(f"{name:>9}: mean {r['mean']:+.3f}, max error {r['max_error']:.1e}, rms {r['rms_error']:.1e}, "
              f"mean error {r['mean_error']:+.1e} ({r['seconds']:.0f} s)", flush=True)
    record = {"command": command_line(), "code_version": code_version(), "machine": machine(torch.device("cpu")),
              "bootstrap_key": args.key, "slots": int(e.slot_count), "max_level": int(e.max_level), "bootstrap_from_level": FROM_LEVEL,
              "keygen_seconds": keygen, "key_bytes": int(sum(getattr(k, "nbytes", 0) for k in keys)), "shapes": rows}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)  # --results-dir was checked writable as parsed
    print(f"saved {write_json(out_dir / f'bootstrap_inputs-{stamp}.json', record)}")


if __name__ == "__main__":
    run_main(main)
