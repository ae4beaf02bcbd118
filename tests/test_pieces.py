"""An encrypted run in pieces (``fhe.staged``, ``encrypted_inference --state``): a run stopped after a layer
goes on from that layer's ciphertext and ends where a run in one go does.

The references are independent of the pieces: the circuit run in one go, and the torch model itself."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.fhe import accounting as A
from cgf_bert.fhe import encoder as E
from cgf_bert.fhe import pipeline as P
from cgf_bert.fhe import staged as S
from cgf_bert.fhe.backends import SimulatedCkks
from cgf_bert.fhe.ops import Levelled
from cgf_bert.model.bert import build_model
from test_encoder_circuit import POLY, _example, _model, needs_fhe


def _circuit(tiny_bert):
    model = _model(tiny_bert, POLY)
    ids, tt = _example(6)
    circuit = E.EncoderCircuit(E.Weights.of(model), POLY, E.TokenLayout.for_model(1024, model.bert.config.hidden_size))
    emb = P.embed(model, ids, tt)
    return (circuit, emb, *P.calibrate(circuit, [emb], 17, 1))


def test_a_circuit_started_at_a_layer_from_the_layer_befores_output_ends_as_the_whole_run(tiny_bert):
    """``forward(first=1)`` on layer 0's output: the same logits and the same operations after layer 0."""
    circuit, emb, bounds, centres = _circuit(tiny_bert)
    outputs = {}
    whole, log, _ = P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres, probe=lambda i, x: outputs.setdefault(i, x))
    ops, rest = SimulatedCkks(1024, 17, 1), A.StageLog()
    boot = A.Refresher(ops, rest, 17, bounds=bounds, centres=centres)
    got = P.run(circuit, A.Counted(ops, rest), boot, emb, rest, start=(1, outputs[0]))
    np.testing.assert_array_equal(got, whole)
    assert not any(stage.startswith("layer 0") for stage in rest.stages)
    def ops_of(lg, skip=()):  # every count but the seconds, which are timed
        return {k: {m: n for m, n in v.items() if not m.endswith("seconds")} for k, v in lg.stages.items() if not k.startswith(skip)}

    assert ops_of(rest) == ops_of(log, skip=("layer 0",))
    with pytest.raises(CgfBertError, match="no encoder layer 3"):
        P.run(circuit, A.Counted(ops, A.StageLog()), boot, emb, A.StageLog(), start=(3, outputs[0]))


def test_a_stage_log_reads_back_from_json_as_it_was(tiny_bert):
    circuit, emb, bounds, centres = _circuit(tiny_bert)
    _, log, _ = P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres)
    back = A.StageLog.from_json(json.loads(json.dumps(log.to_json())))
    assert back.table() == log.table() and back.level_table() == log.level_table()
    assert back.steps_by_kind() == log.steps_by_kind() and back.current == log.current


class _FileSim(SimulatedCkks):
    """The simulation with its values written and read as files, as desilofhe's ciphertexts are."""

    def write(self, x, path):
        with open(path, "wb") as f:
            np.savez(f, slots=x.slots, level=x.level)

    def read(self, path):
        with np.load(path) as f:
            return Levelled(f["slots"], int(f["level"]))


def test_the_state_keeps_the_last_layers_ciphertext_and_refuses_another_runs(tmp_path):
    pieces = S.Pieces(tmp_path / "state")
    assert (tmp_path / "state" / ".gitignore").read_text().splitlines()[-1] == "*"  # never committed by mistake
    pieces.agree("options", {"pack": 2, "layers": None})
    pieces.agree("options", {"pack": 2, "layers": None})  # the same run: agreed
    with pytest.raises(CgfBertError, match="belongs to another run: its options differ in pack"):
        pieces.agree("options", {"pack": 1, "layers": None})
    ops = _FileSim(4, 17)
    assert pieces.resume("m-pack0", ops) is None and pieces.saved("m-pack0") == {}
    for layer in range(2):
        pieces.save("m-pack0", ops, Levelled(np.full(4, float(layer)), 5), {"layers_done": layer + 1, "examples": [[2, 7]]})
    first, x = pieces.resume("m-pack0", ops)
    assert first == 2 and np.array_equal(x.slots, np.full(4, 1.0)) and x.level == 5
    assert [p.name for p in (tmp_path / "state").glob("*.ct")] == ["m-pack0-after2.ct"]  # the older one removed
    with pytest.raises(CgfBertError, match="begun on other examples"):
        pieces.check("m-pack0", [[2, 8]])
    with pytest.raises(CgfBertError, match="secret.key is missing, but the folder holds a run's progress"):
        pieces.secret_key
    (tmp_path / "state" / "m-pack0-after2.ct").unlink()
    with pytest.raises(CgfBertError, match="not there; without it the run cannot go on"):
        pieces.check("m-pack0", [[2, 7]])
    pieces.save("m-pack0", ops, None, {"layers_done": 2, "logits": [1.0, float("nan")]})  # a state file may hold a NaN
    assert pieces.progress()["m-pack0"]["logits"][0] == 1.0 and pieces.check("m-pack0", [[2, 7]])


def test_a_state_begun_before_centres_goes_on_only_without_them(tiny_bert, tmp_path):
    """A state folder from before centres existed pinned each checkpoint's bounds alone: the uncentred
    calibration (--no-centre) agrees with it exactly; the centred one is refused, saying how to go on."""
    from experiments.encrypted_inference import pinned

    from cgf_bert.fhe.keys import GeneralKeys
    from cgf_bert.store.provenance import repo_relative

    circuit, emb, bounds, centres = _circuit(tiny_bert)
    plain, none = P.calibrate(circuit, [emb], 17, 1, centre=False)
    keys, pieces = GeneralKeys(1024), S.Pieces(tmp_path / "state")
    old = {"checkpoint": repo_relative("checkpoints/x.pt"), "label": "L", "bounds": plain, "rotation_keys": keys.to_json()}
    pieces.agree("model0", old)  # as the state of the run in pieces begun before centres was written
    assert pinned("checkpoints/x.pt", "L", plain, none, keys, drops=False) == old
    pieces.agree("model0", pinned("checkpoints/x.pt", "L", plain, none, keys, drops=False))
    with pytest.raises(CgfBertError, match="differ in bounds, centres"):
        pieces.agree("model0", pinned("checkpoints/x.pt", "L", bounds, centres, keys, drops=False))
    with pytest.raises(CgfBertError, match="differ in level_drops"):  # nor with level drops, begun without them
        pieces.agree("model0", pinned("checkpoints/x.pt", "L", plain, none, keys, drops=True))
    assert "centres" not in pieces.agreed("model0") and "level_drops" not in pieces.agreed("model0")


def test_a_run_stopped_between_layers_goes_on_to_the_whole_runs_logits_and_counts(tiny_bert, tmp_path):
    """``staged.encrypted`` on the simulation: stopped after layer 0, then gone on with from its saved ciphertext,
    it ends with the logits and the operations of the circuit run in one go; a process whose time is up
    begins no other ciphertext, and makes no key for it."""
    circuit, emb, bounds, centres = _circuit(tiny_bert)
    whole, log, _ = P.simulate(circuit, emb, 17, 1, bounds=bounds, centres=centres)
    hidden = [np.zeros((6, 32))] * 2

    def no_keys():
        raise AssertionError("keys made for a ciphertext there is no time for")

    with pytest.raises(S.Stopped, match="a left after 0 of 2 layers"):  # 0: no layer begun, no key made
        S.encrypted(circuit, no_keys, bounds, emb, hidden, S.Pieces(tmp_path / "state", stop_after=0), "a", [[1, 2]], centres=centres)
    early = S.Pieces(tmp_path / "state", stop_after=1e-6)  # any layer outlasts it: stopped after the first
    with pytest.raises(S.Stopped, match="stopped after layer 0 of 2"):
        S.encrypted(circuit, lambda: _FileSim(1024, 17, 1), bounds, emb, hidden, early, "a", [[1, 2]], centres=centres)
    with pytest.raises(S.Stopped, match="b left after 0 of 2 layers"):
        S.encrypted(circuit, no_keys, bounds, emb, hidden, early, "b", [[3, 4]], centres=centres)
    later = S.Pieces(tmp_path / "state")
    got = S.encrypted(circuit, lambda: _FileSim(1024, 17, 1), bounds, emb, hidden, later, "a", [[1, 2]], centres=centres)
    np.testing.assert_array_equal(got.logits, whole)
    assert [p["first_layer"] for p in got.pieces] == [0, 1] and [e["layer"] for e in got.per_layer] == [0, 1]

    def counts(table):
        return {r["stage"]: {k: v for k, v in r.items() if not k.endswith("seconds")} for r in table}

    assert counts(got.table) == counts(log.table())
    again = S.encrypted(circuit, no_keys, bounds, emb, hidden, S.Pieces(tmp_path / "state"), "a", [[1, 2]], centres=centres)  # done: read back
    np.testing.assert_array_equal(again.logits, whole)


def test_a_folder_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CgfBertError, match="cannot write there"):
        S.Pieces(tmp_path / "file" / "state")


def _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags):
    from cgf_bert.store.checkpoint import save_checkpoint
    from experiments import encrypted_inference

    path = tmp_path / "student.pt"
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(path, build_model(str(tiny_bert), Approximations(softmax=softmax_spec("cgf"))), {"model": str(tiny_bert), "seed": 0})
    monkeypatch.setattr(sys, "argv", ["encrypted_inference.py", str(path), "--examples", "1", "--calibrate", "2",
                                      "--data-dir", str(tiny_mrpc), "--results-dir", str(tmp_path), *flags])
    encrypted_inference.main()
    return capsys.readouterr().out


@needs_fhe
def test_a_run_stopped_after_a_layer_goes_on_from_it_and_ends_with_the_models_logits(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    """--stop-after 0.0001 stops after layer 0 with a partial record; --stop-after 0 then records the same progress
    and makes no key (how a killed run gets its record); the same command (new keys, made from the saved secret key)
    goes on from layer 1; once done, the command gives the result again without making a key."""
    state = tmp_path / "state"
    flags = ("--backend", "interactive", "--threads", "2", "--layers", "2", "--state", str(state))
    out = _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags, "--stop-after", "0.0001")
    assert "stopped after layer 0 of 2" in out and "the same command goes on" in out
    (partial,) = (tmp_path / "fhe").glob("encrypted_inference_partial-*.json")
    (progress,) = json.loads(partial.read_text())["progress"].values()
    assert progress["layers_done"] == 1 and [e["layer"] for e in progress["per_layer"]] == [0] and "logits" not in progress
    partial.unlink()
    from experiments import encrypted_inference

    with monkeypatch.context() as m:
        m.setattr(encrypted_inference, "make_backend", lambda *a, **k: pytest.fail("a key made under --stop-after 0"))
        out = _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags, "--stop-after", "0")
    assert "left after 1 of 2 layers" in out and "the command without --stop-after 0 goes on" in out
    (again,) = (tmp_path / "fhe").glob("encrypted_inference_partial-*.json")
    assert list(json.loads(again.read_text())["progress"].values()) == [progress]
    again.unlink()
    assert (state / "secret.key").exists() and [p.name for p in state.glob("*.ct")] == ["model0-pack0-after1.ct"]

    with monkeypatch.context() as m:  # going on: the calibration it began with, found once
        m.setattr(encrypted_inference.P, "calibrate", lambda *a, **k: pytest.fail("calibrated again going on"))
        out = _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags)
    assert "rotation keys: those the run in" in out
    (record,) = (tmp_path / "fhe").glob("encrypted_inference-*.json")
    began = json.loads((state / "state.json").read_text())["model0"]
    assert json.loads(record.read_text())["results"][0]["bounds"] == began["bounds"] and began["centres"]
    (ex,) = json.loads(record.read_text())["results"][0]["examples"]
    assert [e["layer"] for e in ex["per_layer"]] == [0, 1] and [p["first_layer"] for p in ex["pieces"]] == [0, 1]
    assert ex["same_prediction"] and ex["max_abs_error"] < 1e-3 * np.abs(ex["reference_logits"]).max()
    assert json.loads(record.read_text())["keys"]["keygen_seconds"] > 0  # the interactive context's keys, timed
    assert all(e["max_abs_error"] < 1e-3 * e["max_abs_value"] for e in ex["per_layer"])
    # the client's refresh is a fresh encryption: its measured error is CKKS's encoding noise, at every site the plan refreshed
    assert ex["bootstrap_errors"] and max(ex["bootstrap_errors"].values()) < 1e-6
    record.unlink()

    _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags)  # done: read back, no key made
    (again,) = (tmp_path / "fhe").glob("encrypted_inference-*.json")
    rec = json.loads(again.read_text())
    assert rec["keys"] is None and rec["results"][0]["examples"][0]["encrypted_logits"] == ex["encrypted_logits"]
    assert rec["state"] == "state" and all(p["keygen_seconds"] > 0 for p in ex["pieces"])  # each piece made its keys

    with pytest.raises(CgfBertError, match="options differ in calibrate"):
        _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags, "--calibrate", "3")
    with pytest.raises(CgfBertError, match="differ in centres"):  # begun with centres, it goes on only with them
        _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags, "--no-centre")
    (state / "state.json").write_text(json.dumps({**json.loads((state / "state.json").read_text()),
                                                  "model0": {k: v for k, v in began.items() if k != "centres"}}))
    with pytest.raises(CgfBertError, match="begun without bootstrap centres: go on with --no-centre"):
        _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags)


@needs_fhe
def test_a_stopped_runs_record_holds_the_examples_it_finished_against_the_model(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    """Two ciphertexts of a one-layer run, stopped before the second: the partial record keeps the first one's
    example, its decrypted logits those of the saved progress, and the line says so. Its reference (the torch
    model) agrees with the slot simulation of the circuit (numpy, written apart from it) to float tolerance, and
    the encrypted logits with both to CKKS's; its error and prediction are those of its logits."""
    flags = ("--backend", "interactive", "--threads", "2", "--layers", "1", "--examples", "2", "--state", str(tmp_path / "state"))
    out = _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags, "--stop-after", "0.0001")
    (partial,) = (tmp_path / "fhe").glob("encrypted_inference_partial-*.json")
    rec = json.loads(partial.read_text())
    assert "model0-pack1 left after 0 of 1 layers" in rec["stopped"] and "model0-pack1" not in rec["progress"]
    (ex,) = rec["finished"]["model0"]["examples"]
    assert [ex["encrypted_logits"]] == np.atleast_2d(rec["progress"]["model0-pack0"]["logits"]).tolist() and ex["ciphertext"] == 0
    ref, enc = np.array(ex["reference_logits"]), np.array(ex["encrypted_logits"])
    assert np.abs(ref - ex["simulated_logits"]).max() < 1e-9 * max(1.0, np.abs(ref).max())
    assert ex["max_abs_error"] == np.abs(enc - ref).max() < 1e-3 * np.abs(ref).max()
    assert ex["same_prediction"] == (enc.argmax() == ref.argmax()) and ex["same_prediction"]
    assert "predictions equal on 1/1" in out and "(the examples finished so far)" in out
    (png,) = (tmp_path / "fhe").glob("encrypted_inference_partial-*.png")  # their figure: time by stage, error by layer
    assert png.stem == partial.stem and rec["finished"]["model0"]["per_example_mean_by_stage"]["feed-forward"]["mul_plain"] > 0


def test_a_run_in_pieces_needs_ciphertexts_and_stopping_needs_a_state(tmp_path, monkeypatch, capsys):
    from experiments import encrypted_inference

    monkeypatch.setattr(sys, "argv", ["encrypted_inference.py", str(tmp_path / "x.pt"), "--state", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exit_:
        encrypted_inference.main()
    assert exit_.value.code == 2 and "the simulation keeps no ciphertexts" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["encrypted_inference.py", str(tmp_path / "x.pt"), "--backend", "interactive", "--stop-after", "5"])
    with pytest.raises(CgfBertError, match="goes on only from a --state folder"):
        encrypted_inference.main()  # before the checkpoint is read
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["encrypted_inference.py", str(tmp_path / "x.pt"), "--backend", "interactive",
                                      "--state", str(tmp_path / "empty"), "--stop-after", "0"])
    with pytest.raises(CgfBertError, match="holds no run's progress"):
        encrypted_inference.main()  # nothing to record: refused before any work, the folder left as it was
    assert not list((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("bound", [3.7, 0.2])
def test_each_sites_bootstrap_error_is_measured_on_the_bootstraps_own_range(bound):
    """A simulated bootstrap adding a known error e on [-1, 1] (scaled back by 4 for bound 3.7, by 1/5 for
    0.2: ``backends.scaled_bound``): the site's measured error is e, whatever the bound."""
    from cgf_bert.fhe.backends import BootstrapNoise

    e = 2.5e-6
    sim = SimulatedCkks(64, 17, reserve=1, noise=BootstrapNoise(e, np.array([e]), "constant"))
    boot = A.Refresher(sim, A.StageLog(), 17, bounds={"site": bound}, measure=True)
    boot(Levelled(np.linspace(-0.1, 0.1, 64), 0), 2, "site")
    assert boot.errors["site"] == pytest.approx(e, rel=1e-6)
    quiet = A.Refresher(SimulatedCkks(64, 17, reserve=1), A.StageLog(), 17, bounds={"site": bound})
    quiet(Levelled(np.zeros(64), 0), 2, "site")
    assert quiet.errors == {}  # measured only when asked: it decrypts
