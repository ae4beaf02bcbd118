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
    return circuit, emb, P.calibrate(circuit, [emb], 17, 1)


def test_a_circuit_started_at_a_layer_from_the_layer_befores_output_ends_as_the_whole_run(tiny_bert):
    """``forward(first=1)`` on layer 0's output: the same logits and the same operations after layer 0."""
    circuit, emb, bounds = _circuit(tiny_bert)
    outputs = {}
    whole, log, _ = P.simulate(circuit, emb, 17, 1, bounds=bounds, probe=lambda i, x: outputs.setdefault(i, x))
    ops, rest = SimulatedCkks(1024, 17, 1), A.StageLog()
    boot = A.Refresher(ops, rest, 17, bounds=bounds)
    got = P.run(circuit, A.Counted(ops, rest), boot, emb, rest, start=(1, outputs[0]))
    np.testing.assert_array_equal(got, whole)
    assert not any(stage.startswith("layer 0") for stage in rest.stages)
    def ops_of(lg, skip=()):  # every count but the seconds, which are timed
        return {k: {m: n for m, n in v.items() if not m.endswith("seconds")} for k, v in lg.stages.items() if not k.startswith(skip)}

    assert ops_of(rest) == ops_of(log, skip=("layer 0",))
    with pytest.raises(CgfBertError, match="no encoder layer 3"):
        P.run(circuit, A.Counted(ops, A.StageLog()), boot, emb, A.StageLog(), start=(3, outputs[0]))


def test_a_stage_log_reads_back_from_json_as_it_was(tiny_bert):
    circuit, emb, bounds = _circuit(tiny_bert)
    _, log, _ = P.simulate(circuit, emb, 17, 1, bounds=bounds)
    back = A.StageLog.from_json(json.loads(json.dumps(log.to_json())))
    assert back.table() == log.table() and back.level_table() == log.level_table()
    assert back.steps_by_kind() == log.steps_by_kind() and back.current == log.current


class _NumpyFiles:
    """Slot vectors written and read as files, as desilofhe's ciphertexts are."""

    def write(self, x, path):
        with open(path, "wb") as f:
            np.save(f, x.slots)

    def read(self, path):
        return Levelled(np.load(path), 5)


def test_the_state_keeps_the_last_layers_ciphertext_and_refuses_another_runs_options(tmp_path):
    pieces = S.Pieces(tmp_path / "state")
    pieces.agree("options", {"pack": 2, "layers": None})
    pieces.agree("options", {"pack": 2, "layers": None})  # the same run: agreed
    with pytest.raises(CgfBertError, match="belongs to another run: its options differ in pack"):
        pieces.agree("options", {"pack": 1, "layers": None})
    ops = _NumpyFiles()
    assert pieces.resume("m-pack0", ops) is None
    for layer in range(2):
        pieces.save("m-pack0", ops, Levelled(np.full(4, float(layer)), 5), {"layers_done": layer + 1})
    first, x = pieces.resume("m-pack0", ops)
    assert first == 2 and np.array_equal(x.slots, np.full(4, 1.0))
    assert [p.name for p in (tmp_path / "state").glob("*.ct")] == ["m-pack0-after2.ct"]  # the older one removed
    pieces.save("m-pack0", ops, None, {"layers_done": 2, "logits": [1.0, 2.0]})
    assert not list((tmp_path / "state").glob("*.ct")) and pieces.progress()["m-pack0"]["logits"] == [1.0, 2.0]
    (tmp_path / "state" / "m-pack0.json").write_text('{"layers_done": 1, "ciphertext": "gone.ct"}')
    with pytest.raises(CgfBertError, match="state is damaged"):
        pieces.resume("m-pack0", ops)


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
    """--stop-after 0 stops after layer 0 with a partial record; the same command (new keys, made from the saved
    secret key) goes on from layer 1; once done, the command gives the result again without making a key."""
    state = tmp_path / "state"
    flags = ("--backend", "interactive", "--threads", "2", "--layers", "2", "--state", str(state))
    out = _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags, "--stop-after", "0")
    assert "stopped after layer 0 of 2" in out and "the same command goes on" in out
    (partial,) = (tmp_path / "fhe").glob("encrypted_inference_partial-*.json")
    (progress,) = json.loads(partial.read_text())["progress"].values()
    assert progress["layers_done"] == 1 and [e["layer"] for e in progress["per_layer"]] == [0] and "logits" not in progress
    assert (state / "secret.key").exists() and [p.name for p in state.glob("*.ct")] == ["model0-pack0-after1.ct"]

    _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags)
    (record,) = (tmp_path / "fhe").glob("encrypted_inference-*.json")
    (ex,) = json.loads(record.read_text())["results"][0]["examples"]
    assert [e["layer"] for e in ex["per_layer"]] == [0, 1] and [p["first_layer"] for p in ex["pieces"]] == [0, 1]
    assert ex["same_prediction"] and ex["max_abs_error"] < 1e-3 * np.abs(ex["reference_logits"]).max()
    assert all(e["max_abs_error"] < 1e-3 * e["max_abs_value"] for e in ex["per_layer"])
    record.unlink()

    _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags)  # done: read back, no key made
    (again,) = (tmp_path / "fhe").glob("encrypted_inference-*.json")
    rec = json.loads(again.read_text())
    assert rec["keys"] is None and rec["results"][0]["examples"][0]["encrypted_logits"] == ex["encrypted_logits"]

    with pytest.raises(CgfBertError, match="options differ in calibrate"):
        _main(tmp_path, tiny_bert, tiny_mrpc, monkeypatch, capsys, *flags, "--calibrate", "3")


def test_a_run_in_pieces_needs_ciphertexts_and_stopping_needs_a_state(tmp_path, monkeypatch, capsys):
    from experiments import encrypted_inference

    for flags, said in ((["--state", str(tmp_path / "s")], "the simulation keeps no ciphertexts"),
                        (["--backend", "interactive", "--stop-after", "5"], "goes on only from a --state folder")):
        monkeypatch.setattr(sys, "argv", ["encrypted_inference.py", str(tmp_path / "x.pt"), *flags])
        with pytest.raises(SystemExit) as exit_:
            encrypted_inference.main()
        assert exit_.value.code == 2 and said in capsys.readouterr().err
