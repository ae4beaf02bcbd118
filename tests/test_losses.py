"""Each distillation term against a plain reference, and the KD step's weighting."""

import math

import pytest
import torch
from conftest import tiny_config

from cgf_bert import CgfBertError
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.bert import BertMRPC, bert_from_config
from cgf_bert.store.records import distill_config
from cgf_bert.objective import LossTerm, get_loss, kd_preset, needs, objective_label
from cgf_bert.train.losses import hidden_mse, logit_kd, make_kd_step


def test_logit_kd_matches_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    T = 2.0
    ref = 0.0
    for i in range(5):
        pt = torch.softmax(t[i] / T, -1)
        ps = torch.softmax(s[i] / T, -1)
        ref += sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(2))
    ref = ref / 5 * T * T
    torch.testing.assert_close(logit_kd(s, t, T), torch.tensor(float(ref)))
    assert logit_kd(t, t, T).abs() < 1e-6


def test_hidden_mse_matches_reference_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    L, B, T, H = 3, 2, 6, 4
    s = tuple(torch.randn(B, T, H, generator=g) for _ in range(L))
    t = tuple(torch.randn(B, T, H, generator=g) for _ in range(L))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    ref = []
    for l in range(L):
        errs = [((s[l][b, i] - t[l][b, i]) ** 2).mean() for b in range(B) for i in range(T) if mask[b, i]]
        ref.append(sum(errs) / len(errs))
    torch.testing.assert_close(hidden_mse(s, t, mask), torch.stack(ref).mean())
    s2 = tuple(x.clone() for x in s)
    for x in s2:
        x[1, 3:] += 100.0  # garbage in padding positions changes nothing
    torch.testing.assert_close(hidden_mse(s2, t, mask), hidden_mse(s, t, mask))


def test_hidden_mse_layer_count_mismatch():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(CgfBertError, match="hidden states"):
        hidden_mse((x, x), (x,), torch.ones(1, 2))


def test_registry_and_preset():
    with pytest.raises(CgfBertError, match="unknown loss 'cosine'.*ce"):
        get_loss("cosine")
    assert [t.name for t in kd_preset(0.5, 2.0, 0)] == ["ce", "kd"]
    assert kd_preset(0.3, 4.0, 10)[2] == LossTerm.make("hidden_mse", 10)
    assert dict(kd_preset(0.3, 4.0, 10)[1].params) == {"temperature": 4.0}  # the temperature belongs to the logit term
    assert needs(kd_preset(0.5, 2.0, 10)) == ("hidden",) and needs(kd_preset(0.5, 2.0, 0)) == ()
    assert objective_label(kd_preset(0.5, 2.0, 10)) == "KD beta=10"
    assert objective_label(kd_preset(0.9, 1.0, 0)) == "KD beta=0 alpha=0.9 T=1"
    with pytest.raises(CgfBertError, match="temperature must be finite and > 0"):
        LossTerm.make("kd", 0.5, temperature=0)
    with pytest.raises(CgfBertError, match="takes no parameter temperature"):
        LossTerm.make("ce", 0.5, temperature=2)


def test_term_json_roundtrip_and_legacy_records():
    terms = kd_preset(0.5, 2.0, 10)
    assert tuple(LossTerm.from_json(t.to_json()) for t in terms) == terms
    # records before terms carried parameters kept the KD temperature apart: the loader's rule puts it back
    legacy = {"config": {}, "distill": {"temperature": 2.0, "init": "pretrained",
                                        "terms": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5}, {"loss": "hidden_mse", "weight": 10}]}}
    assert distill_config(legacy).terms == terms


def test_kd_step_weights_terms_and_leaves_teacher_alone():
    torch.manual_seed(0)
    teacher = BertMRPC(bert_from_config(tiny_config()))
    student = BertMRPC(bert_from_config(tiny_config())).set_softmax(softmax_spec("cgf", coeff=0.5))
    batch = {
        "input_ids": torch.randint(5, 25, (4, 9)),
        "attention_mask": torch.ones(4, 9, dtype=torch.long),
        "token_type_ids": torch.zeros(4, 9, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    batch["attention_mask"][2, 5:] = 0
    step = make_kd_step(teacher, kd_preset(alpha=0.3, temperature=2.0, beta=10))
    student.eval()  # no dropout, so the reference below sees the same forward
    loss, terms = step(student, batch)
    assert set(terms) == {"ce", "kd", "hidden_mse"}
    assert not teacher.training
    with torch.no_grad():
        t = teacher(**batch, needs=("hidden",))
        s = student(**batch, needs=("hidden",))
    t_logits, t_hidden, s_logits, s_hidden = t["logits"], t["hidden"], s["logits"], s["hidden"]
    ce = torch.nn.functional.cross_entropy(s_logits, batch["labels"])
    kd = logit_kd(s_logits, t_logits, 2.0)
    hid = hidden_mse(s_hidden, t_hidden, batch["attention_mask"])
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["kd"], kd)
    torch.testing.assert_close(terms["hidden_mse"], hid)
    torch.testing.assert_close(loss.detach(), 0.7 * ce + 0.3 * kd + 10 * hid)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
