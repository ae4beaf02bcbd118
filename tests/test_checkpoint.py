"""One checkpoint format: atomic, self-describing, never executes pickled code."""

import json
import os

import pytest
import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.bert import build_model
from cgf_bert.store.checkpoint import FORMAT, load_model, read_checkpoint, save_checkpoint


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


def sharpened(model):
    """``model`` with attention sharp and a classifier large enough that softmax kinds give
    visibly different logits."""
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight *= 20
            layer.attention.self.key.weight *= 20
        model.classifier.weight *= 100
    return model.eval()


def logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 25, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))["logits"]


def test_softmax_override_on_load(tiny_bert, tmp_path):
    """An exact checkpoint loaded as CGF c=0.4 computes what a CGF c=0.4 model with its weights computes."""
    exact = sharpened(build_model(str(tiny_bert)))
    path = save_checkpoint(tmp_path / "m.pt", exact, {"model": str(tiny_bert)})
    cgf = softmax_spec("cgf", coeff=0.4)
    model, meta = load_model(path, Approximations(softmax=cgf))
    assert meta["approx"].softmax.name == "exact"  # the checkpoint's own, untouched by the override
    direct = build_model(str(tiny_bert), cgf).eval()
    direct.load_state_dict(exact.state_dict())
    torch.testing.assert_close(logits(model.eval()), logits(direct), rtol=0, atol=0)
    assert not torch.allclose(logits(model), logits(exact), atol=1e-3)
    assert [layer.attention.self.softmax_spec for layer in model.bert.encoder.layer] == [cgf, cgf]


def test_per_layer_spec_roundtrip(tiny_bert, tmp_path):
    spec = softmax_spec("cgf", coeff=0.5, layers={1: softmax_spec("exact")})
    path = save_checkpoint(tmp_path / "m.pt", build_model(str(tiny_bert), spec), {"model": str(tiny_bert)})
    model, meta = load_model(path)
    assert meta["approx"].softmax == spec and model.softmax == spec
    assert [layer.attention.self.softmax_spec.name for layer in model.bert.encoder.layer] == ["cgf", "exact"]


@pytest.mark.parametrize("fmt, softmax_meta, expected", [
    # "cgf-bert/1": the softmax a kind's name, CGF's coefficient apart (or absent: the default 0.5)
    ("cgf-bert/1", {"softmax": "cgf", "coeff": 0.65}, softmax_spec("cgf", coeff=0.65)),
    ("cgf-bert/1", {"softmax": "cgf"}, softmax_spec("cgf", coeff=0.5)),
    ("cgf-bert/1", {"softmax": "exact", "coeff": 0.5}, softmax_spec("exact")),
    # "cgf-bert/2": the softmax's spec, per-layer overrides included; every other op exact
    ("cgf-bert/2", {"softmax": {"name": "cgf", "coeff": 0.6, "layers": {"1": {"name": "exact"}}}},
     softmax_spec("cgf", coeff=0.6, layers={1: softmax_spec("exact")})),
])
def test_older_checkpoint_formats_load_with_their_softmax(fmt, softmax_meta, expected, tiny_bert, tmp_path):
    """Checkpoints written before Approximations still load, run their softmax, and save as today's format."""
    model = sharpened(build_model(str(tiny_bert)))
    meta = {"format": fmt, "model": str(tiny_bert), "seed": 3, **softmax_meta}
    torch.save({"state_dict": model.state_dict(), "meta": json.dumps(meta)}, tmp_path / "old.pt")
    loaded, meta = load_model(tmp_path / "old.pt")
    assert meta["approx"] == Approximations(softmax=expected) and loaded.approx == meta["approx"]
    assert "coeff" not in meta and "softmax" not in meta and meta["seed"] == 3
    direct = build_model(str(tiny_bert), expected).eval()
    direct.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(loaded.eval()), logits(direct), rtol=0, atol=0)
    again = save_checkpoint(tmp_path / "new.pt", loaded, meta)
    assert json.loads(torch.load(again, weights_only=True)["meta"])["format"] == FORMAT
    assert read_checkpoint(again)[1]["approx"] == meta["approx"]


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


def test_the_code_version_is_read_at_import_and_never_asked_of_git_again(monkeypatch):
    """A run of hours records the code it started with: saving never asks git again (the tree may have moved on)."""
    import subprocess

    from cgf_bert.store import provenance

    before, changed = provenance.code_version(), provenance.uncommitted_files()

    def no_git(*a, **k):
        raise AssertionError("git consulted at save time")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.code_version() == before and provenance.uncommitted_files() == changed
    assert before == provenance._AT_IMPORT[0] and before
