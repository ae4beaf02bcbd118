"""fit(): best-epoch checkpoint, JSONL metrics, determinism, and a clean stop on nan."""

import json

import pytest
import torch

from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.data.glue import load_mrpc
from cgf_bert.data.loader import load_tokenizer, make_loader, tokenize
from cgf_bert.data.tasks import classification_metrics
from cgf_bert.model.bert import build_model
from cgf_bert.store.checkpoint import read_checkpoint
from cgf_bert.train.engine import NonFiniteLoss, build_optimizer, ce_step, fit, freeze_embeddings, set_seed


@pytest.fixture(scope="module")
def data(tiny_bert, tiny_mrpc):
    tok = load_tokenizer(str(tiny_bert))
    return tok, tokenize(load_mrpc(tiny_mrpc), tok)


@pytest.fixture
def loaders(data):
    """Fresh loaders per test: the shuffling generator advances with every epoch."""
    tok, ds = data
    return make_loader(ds["train"], tok, 8, shuffle=True, seed=0), make_loader(ds["validation"], tok, 16)


def train(tiny_bert, loaders, tmp_path, step=ce_step, epochs=2, seed=0, name="m"):
    set_seed(seed)
    loaders[0].generator.manual_seed(seed)  # a run's shuffles depend on its seed only
    model = build_model(str(tiny_bert), softmax_spec("cgf", coeff=0.5))
    freeze_embeddings(model)
    opt, sched = build_optimizer(model, 1e-3, epochs * len(loaders[0]))
    res = fit(model, step, *loaders, opt, sched, epochs=epochs, device=torch.device("cpu"),
              checkpoint=tmp_path / f"{name}.pt", meta={"model": str(tiny_bert)}, metrics_path=tmp_path / f"{name}.jsonl")
    return model, res


def test_fit_keeps_best_epoch_and_logs_jsonl(tiny_bert, loaders, tmp_path):
    model, res = train(tiny_bert, loaders, tmp_path, epochs=3)
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    best = max(rows, key=lambda r: r["dev"]["accuracy"])  # max() keeps the first on ties, like fit
    assert res.best_epoch == best["epoch"] and res.best == best["dev"]
    _, meta = read_checkpoint(tmp_path / "m.pt")
    assert meta["epoch"] == res.best_epoch and meta["dev"] == res.best and meta["approx"].softmax == softmax_spec("cgf", coeff=0.5)
    assert all(not p.requires_grad for p in model.bert.embeddings.parameters())


def test_same_seed_same_result_on_cpu(tiny_bert, loaders, tmp_path):
    _, a = train(tiny_bert, loaders, tmp_path, name="a")
    _, b = train(tiny_bert, loaders, tmp_path, name="b")
    assert [h["train"] for h in a.history] == [h["train"] for h in b.history]


def test_nonfinite_loss_stops_and_keeps_best_checkpoint(tiny_bert, loaders, tmp_path):
    calls = {"n": 0}

    def nan_in_epoch_two(model, batch):
        calls["n"] += 1
        loss, terms = ce_step(model, batch)
        return (loss * float("nan") if calls["n"] > len(loaders[0]) else loss), terms

    with pytest.raises(NonFiniteLoss, match=r"loss is nan at epoch 2, step 1; the best checkpoint so far \(epoch 1\) is kept"):
        train(tiny_bert, loaders, tmp_path, step=nan_in_epoch_two)
    assert read_checkpoint(tmp_path / "m.pt")[1]["epoch"] == 1


def test_classification_metrics():
    import numpy as np

    m = classification_metrics(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert m["accuracy"] == 0.6 and m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
