"""``fhe.keys``: the key switches a rotation takes with each key set, and the medium key's fixed keys chosen
for a circuit's rotations."""

import itertools
import json

import pytest

from cgf_bert import CgfBertError
from cgf_bert.fhe.keys import EveryStep, FixedKeys, GeneralKeys, from_json, rotation_keys


def _fewest(k: int, steps, slots: int) -> int:
    """Brute force: the fewest steps (repeats allowed) summing to k mod slots."""
    for m in range(slots):
        if any(sum(c) % slots == k % slots for c in itertools.combinations_with_replacement(steps, m)):
            return m
    raise AssertionError(k)


def test_a_rotation_is_the_fewest_fixed_key_steps_summing_to_it():
    slots, steps = 64, (1, 9, 60)
    keys = FixedKeys(slots, steps)
    for k in range(-slots, slots):
        path = keys.path(k)
        assert sum(path) % slots == k % slots and set(path) <= set(steps)
        assert keys.switches(k) == len(path) == _fewest(k, steps, slots), k
    assert keys.cost({9: 2, -4: 1}) == 2 * 1 + 1 * _fewest(-4, steps, slots)


def test_fixed_keys_without_step_one_are_refused_and_steps_are_taken_mod_the_slots():
    with pytest.raises(CgfBertError, match="lack step 1"):
        FixedKeys(64, (2, 4))
    assert FixedKeys(64, (65, -1, 63, 2)).steps == (1, 2, 63)


def test_the_local_search_improves_on_its_start_and_counts_equal_steps_mod_the_slots_together():
    """Rotations by 1000 at 4096 slots: the start (step 1 and the signed powers of two 1000's decomposition
    uses) takes 3 key switches each; the search finds the step itself. -1 and 4095 are one rotation."""
    counts = {1000: 100, -1: 10, 4095: 3}
    start = FixedKeys.chosen(counts, 4096, n=3, tries=0)
    found = FixedKeys.chosen(counts, 4096, n=3, tries=200)
    assert start.cost(counts) > found.cost(counts) == 100 + 13
    assert {1000, 4095} <= set(found.steps)


def test_the_chosen_keys_make_the_circuits_rotations_in_fewer_key_switches_than_the_rotation_key():
    """A circuit's rotations like the encoder's (broadcasts by -1..-16, key offsets by multiples of 512): 15 fixed keys
    beat the 15 left powers of two of the rotation key, every step stays possible, and the choice is repeatable."""
    slots = 32768
    counts = {**{-(1 << i): 200 for i in range(5)}, **{1 << i: 200 for i in range(9)}, **{r * 512: 3 for r in range(1, 64)}}
    chosen = FixedKeys.chosen(counts, slots, tries=200)
    alone = GeneralKeys(slots, both_ways=False)
    assert len(chosen.steps) == 15 and 1 in chosen.steps
    assert chosen.cost(counts) < sum(n * alone.switches(k) for k, n in counts.items()) / 2
    assert chosen == FixedKeys.chosen(counts, slots, tries=200)
    assert all(chosen.switches(k) > 0 for k in range(1, slots, 997))


def test_rotation_keys_by_bootstrap_key():
    assert rotation_keys("small", 64) == GeneralKeys(64, True)
    assert rotation_keys("fixed", 64).switches(-3) == 1 and rotation_keys("fixed", 64).switches(64) == 0
    assert rotation_keys("rotation-key", 64) == GeneralKeys(64, False)
    assert isinstance(rotation_keys("medium", 1024, {3: 1}), FixedKeys)
    with pytest.raises(CgfBertError, match="none were given"):
        rotation_keys("medium", 64)
    with pytest.raises(CgfBertError, match="no rotation keys"):
        rotation_keys("large", 64)


def test_keys_read_back_from_json_make_every_rotation_as_the_keys_written():
    """A run in pieces goes on with the keys its state names: read back, they are equal and cost every step the same."""
    keys = [FixedKeys.chosen({3: 5.0, -7: 2.0, 200: 1.0}, 1024, tries=50), GeneralKeys(1024, True), GeneralKeys(1024, False), EveryStep(1024)]
    for k in keys:
        again = from_json(json.loads(json.dumps(k.to_json())), 1024)
        assert again == k and [again.switches(s) for s in range(-40, 1024, 7)] == [k.switches(s) for s in range(-40, 1024, 7)]
    with pytest.raises(CgfBertError, match="not fixed, general or every step"):
        from_json({"kind": "all"}, 1024)


def test_the_bootstrap_keys_steps_are_found_by_rotating_and_a_wrong_one_is_kept_apart():
    """``experiments.bootstrap_key_rotations.probe`` on a stand-in engine whose key holds steps 1 and 5, refuses
    the others, and rotates by 7 the wrong way: held 1 and 5 (each a left rotation, as ``np.roll`` by -k), 7
    recorded as wrong, never as held."""
    import numpy as np
    from experiments.bootstrap_key_rotations import candidates, probe

    class Engine:
        def rotate(self, ct, key, step):
            if step in (1, 5):
                return np.roll(ct, -step)
            if step == 7:
                return np.roll(ct, step)
            raise RuntimeError("the bootstrap key holds no rotation by this step")

        def decrypt(self, ct, secret):
            return ct + 0j

    values = np.random.default_rng(0).uniform(-1, 1, 64)
    found = probe(Engine(), None, values, values, None, [1, 2, 5, 7, 63])
    assert [h["step"] for h in found["held"]] == [1, 5] and all(h["max_error"] == 0 for h in found["held"])
    assert found["refused"] == [2, 63] and [w["step"] for w in found["wrong"]] == [7]
    steps = candidates(2**15)
    assert {1, 16, 1024, 2**14, 2**15 - 1, 2**15 - 8, 2**15 - 1024} <= set(steps) and 0 not in steps and len(set(steps)) == len(steps)


def test_a_circuits_rotations_are_timed_by_the_bootstrap_key_and_through_the_fixed_keys_path(tmp_path):
    """``compare`` on a stand-in engine: a step of two fixed-key switches is rotated by two keys (the path the run
    takes), the ciphertext's seconds are its steps' medians times their counts; a file that is no partial record
    is refused with its name."""
    import numpy as np
    from experiments.bootstrap_key_rotations import circuit_steps, compare

    used = []

    class Engine:
        def rotate(self, ct, key, step=None):
            used.append("boot" if step is not None else key)
            return np.roll(ct, -(step if step is not None else key))

    keys = FixedKeys(64, (1, 2))
    out = compare(Engine(), None, {1: 1, 2: 2}, keys, np.arange(64.0), {3: 2.0, 2: 1.0}, repeat=3)
    assert [(r["step"], r["rotations"], r["fixed_key_switches"]) for r in out["steps"]] == [(2, 1.0, 1), (3, 2.0, 2)]
    assert used.count("boot") == 6 and sorted(k for k in used if k != "boot") == [1, 1, 1] + [2] * 6
    assert out["seconds_fixed_keys"] == pytest.approx(sum(r["rotations"] * r["fixed_keys"] for r in out["steps"]))
    (tmp_path / "r.json").write_text(json.dumps({"progress": {"m-pack0": {"log": {"steps": {"a": {"3": 2}, "b": {"67": 1}}}}}}))
    assert circuit_steps(str(tmp_path / "r.json"), 64) == {3: 3.0}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CgfBertError, match="bad.json: not a partial encrypted_inference record"):
        circuit_steps(str(tmp_path / "bad.json"), 64)
