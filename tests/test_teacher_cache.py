"""The cached teacher outputs equal the live teacher's, so the cached KD step is the same step."""

import logging

import torch
from conftest import tiny_config

from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.data.glue import load_mrpc
from cgf_bert.data.loader import load_tokenizer, make_loader, tokenize
from cgf_bert.model.bert import BertMRPC, bert_from_config
from cgf_bert.objective import kd_preset
from cgf_bert.train import teacher_cache
from cgf_bert.train.losses import make_kd_step
from cgf_bert.train.teacher_cache import TeacherCache, cache_bytes, maybe_build


def _setup(tiny_bert, tiny_mrpc):
    tok = load_tokenizer(str(tiny_bert))
    ds = tokenize(load_mrpc(tiny_mrpc), tok)
    torch.manual_seed(0)
    teacher = BertMRPC(bert_from_config(tiny_config())).eval()
    return tok, ds, teacher


def test_cache_matches_live_teacher_in_any_batch(tiny_bert, tiny_mrpc):
    tok, ds, teacher = _setup(tiny_bert, tiny_mrpc)
    needs = ("attentions", "hidden")
    cache = TeacherCache.build(teacher, ds["train"], tok, torch.device("cpu"), batch_size=7, needs=needs)
    assert len(cache.outputs["hidden"]) == len(ds["train"]) and cache.logits.shape == (len(ds["train"]), 2)
    assert cache.nbytes == cache_bytes(ds["train"]["length"], teacher.bert.config, needs)
    # Training batches are shuffled and padded differently from the cache's: same values.
    for batch in make_loader(ds["train"], tok, 5, shuffle=True, seed=3):
        got = cache.lookup(batch["idx"], batch["input_ids"].shape[1], torch.device("cpu"))
        with torch.no_grad():
            ref = teacher(**batch, needs=needs)
        torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
        m = batch["attention_mask"].bool()  # (B, T)
        assert len(got["hidden"]) == len(ref["hidden"]) == 3
        for h, r in zip(got["hidden"], ref["hidden"]):
            assert h.shape == r.shape
            torch.testing.assert_close(h[m], r[m], atol=1e-5, rtol=1e-5)
            assert (h[~m] == 0).all()
        pair = m[:, None, :, None] & m[:, None, None, :]  # (B, 1, T, T): real query and real key
        assert len(got["attentions"]) == len(ref["attentions"]) == 2
        for a, r in zip(got["attentions"], ref["attentions"]):
            assert a.shape == r.shape
            torch.testing.assert_close(a[pair.expand_as(a)], r[pair.expand_as(r)], atol=1e-5, rtol=1e-5)
            assert (a[~pair.expand_as(a)] == 0).all()


def test_cached_kd_step_equals_live_kd_step(tiny_bert, tiny_mrpc):
    tok, ds, teacher = _setup(tiny_bert, tiny_mrpc)
    student = BertMRPC(bert_from_config(tiny_config())).set_softmax(softmax_spec("cgf", coeff=0.5)).eval()
    terms = kd_preset(alpha=0.5, temperature=2.0, beta=10)
    cache = TeacherCache.build(teacher, ds["train"], tok, torch.device("cpu"), batch_size=16, needs=("hidden",))
    live, cached = make_kd_step(teacher, terms), make_kd_step(None, terms, cache)
    batch = next(iter(make_loader(ds["train"], tok, 8, shuffle=True, seed=1)))
    (l1, t1), (l2, t2) = live(student, batch), cached(student, batch)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    for k in t1:
        torch.testing.assert_close(t1[k], t2[k], atol=1e-5, rtol=1e-5)
    logits_only = TeacherCache.build(teacher, ds["train"], tok, torch.device("cpu"), 16, needs=())
    assert logits_only.outputs == {}
    loss, terms_out = make_kd_step(None, kd_preset(0.5, 2.0, 0), logits_only)(student, batch)
    assert set(terms_out) == {"ce", "kd"} and torch.isfinite(loss)


def test_no_cache_when_it_would_not_fit(tiny_bert, tiny_mrpc, monkeypatch, caplog):
    tok, ds, teacher = _setup(tiny_bert, tiny_mrpc)
    monkeypatch.setattr(teacher_cache, "available_memory", lambda: 1000)
    with caplog.at_level(logging.WARNING):
        assert maybe_build(teacher, ds["train"], tok, torch.device("cpu"), 16, ("hidden",)) is None
    assert "live" in caplog.text
    monkeypatch.setattr(teacher_cache, "available_memory", lambda: None)
    assert maybe_build(teacher, ds["train"], tok, torch.device("cpu"), 16, ("hidden",)) is not None
