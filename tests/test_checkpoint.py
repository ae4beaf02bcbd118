"""One checkpoint format: atomic, self-describing, never executes pickled code."""

import os

import pytest
import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.bert import build_model
from cgf_bert.store.checkpoint import load_model, read_checkpoint, save_checkpoint


def test_roundtrip_keeps_weights_and_metadata(tiny_bert, tmp_path):
    spec = softmax_spec("cgf", coeff=0.65)
    model = build_model(str(tiny_bert), spec)
    path = save_checkpoint(tmp_path / "m.pt", model, {"model": str(tiny_bert), "seed": 3, "epoch": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    loaded, meta = load_model(path)
    assert meta["seed"] == 3 and meta["approx"].softmax == spec
    assert loaded.softmax == spec
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_softmax_override_on_load(tiny_bert, tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", build_model(str(tiny_bert)), {"model": str(tiny_bert)})
    model, meta = load_model(path, Approximations(softmax=softmax_spec("cgf", coeff=0.4)))
    assert meta["approx"].softmax.name == "exact" and model.softmax.label() == "cgf c=0.4"


def test_per_layer_spec_roundtrip(tiny_bert, tmp_path):
    spec = softmax_spec("cgf", coeff=0.5, layers={1: softmax_spec("exact")})
    path = save_checkpoint(tmp_path / "m.pt", build_model(str(tiny_bert), spec), {"model": str(tiny_bert)})
    model, meta = load_model(path)
    assert meta["approx"].softmax == spec and model.softmax == spec
    assert [layer.attention.self.softmax_spec.name for layer in model.bert.encoder.layer] == ["cgf", "exact"]


def test_legacy_checkpoint_format_is_read(tiny_bert, tmp_path):
    """Checkpoints written before softmax specs ("cgf-bert/1": a name and a coefficient) still load."""
    sd = build_model(str(tiny_bert)).state_dict()
    meta = '{"format": "cgf-bert/1", "model": "%s", "softmax": "cgf", "coeff": 0.65}' % tiny_bert
    torch.save({"state_dict": sd, "meta": meta}, tmp_path / "old.pt")
    model, meta = load_model(tmp_path / "old.pt")
    assert model.softmax == softmax_spec("cgf", coeff=0.65) and "coeff" not in meta


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CgfBertError, match="not found"):
        read_checkpoint(tmp_path / "absent.pt")


def test_random_bytes(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(CgfBertError, match="not a readable cgf-bert checkpoint"):
        read_checkpoint(p)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "meta": Boom()}, p)
    with pytest.raises(CgfBertError):
        read_checkpoint(p)
    assert not (tmp_path / "pwned").exists()


def test_foreign_torch_file_is_rejected(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, p)
    with pytest.raises(CgfBertError, match="not a readable"):
        read_checkpoint(p)


def test_weights_of_another_model_are_rejected(tiny_bert, tmp_path):
    model = build_model(str(tiny_bert))
    sd = model.state_dict()
    sd["classifier.weight"] = torch.zeros(3, 32)
    torch.save({"state_dict": sd, "meta": '{"format": "cgf-bert/1", "model": "%s", "softmax": "exact", "coeff": 0.5}' % tiny_bert}, tmp_path / "bad.pt")
    with pytest.raises(CgfBertError, match="weights do not fit"):
        load_model(tmp_path / "bad.pt")


def test_failed_write_keeps_the_old_checkpoint(tiny_bert, tmp_path, monkeypatch):
    model = build_model(str(tiny_bert))
    path = save_checkpoint(tmp_path / "m.pt", model, {"model": str(tiny_bert), "epoch": 1})

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, model, {"model": str(tiny_bert), "epoch": 2})
    monkeypatch.undo()
    assert read_checkpoint(path)[1]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
