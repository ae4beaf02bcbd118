"""The attention-map, attention-output, value-relation and CKA distillation terms against plain
references written here (loops over examples, heads and rows), CKA's invariances, padding
invariance on a tiny BERT, and a distillation that uses several of them."""

import math

import pytest
import torch
from conftest import tiny_config

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.config import DistillConfig, TrainConfig
from cgf_bert.model.bert import BertMRPC, bert_from_config
from cgf_bert.objective import LOSSES, LossTerm, kd_preset, needs
from cgf_bert import CgfBertError
from cgf_bert.train.losses import kmeans, linear_cka
from cgf_bert.train.teacher_cache import TeacherCache
from cgf_bert.train.recipes import distill

B, H, T, D, L = 3, 2, 6, 4, 2
LENGTHS = [6, 4, 2]


def mask():
    return (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()


def probs(seed, normalised=True):
    """Attention maps (B, H, T, T) with masked keys 0; CGF-like rows (not summing to 1) unless normalised."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(B, H, T, T, generator=g) + 0.05
    p = p * mask()[:, None, None, :]
    return p / p.sum(-1, keepdim=True) if normalised else p * 1.7


def kl(t, s):
    return sum(a * math.log(a / b) for a, b in zip(t, s) if a > 0)


def ref_attn_kl(S, Tt):
    per_layer = []
    for s, t in zip(S, Tt):
        rows = []
        for b, n in enumerate(LENGTHS):
            for h in range(H):
                for q in range(n):
                    srow = s[b, h, q, :n].double().tolist()
                    total = sum(srow)
                    rows.append(kl(t[b, h, q, :n].double().tolist(), [x / total for x in srow]))
        per_layer.append(sum(rows) / len(rows))
    return sum(per_layer) / len(per_layer)


def ref_attn_mse(S, Tt):
    per_layer = []
    for s, t in zip(S, Tt):
        errs = [(s[b, h, q, k] - t[b, h, q, k]).item() ** 2 for b, n in enumerate(LENGTHS) for h in range(H) for q in range(n) for k in range(n)]
        per_layer.append(sum(errs) / len(errs))
    return sum(per_layer) / len(per_layer)


def term(name, s, t, m, state=None, **params):
    return LossTerm.make(name, 1.0, **params)(s, t, {"attention_mask": m}, state).item()


def test_attention_kl_and_mse_match_references():
    s, t = (probs(1, normalised=False), probs(2, normalised=False)), (probs(3), probs(4))
    assert term("attn_kl", {"attentions": s}, {"attentions": t}, mask()) == pytest.approx(ref_attn_kl(s, t), rel=1e-5)
    assert term("attn_mse", {"attentions": s}, {"attentions": t}, mask()) == pytest.approx(ref_attn_mse(s, t), rel=1e-5)
    # the KL compares distributions: scaling a student row changes nothing, the MSE sees it
    s2 = tuple(x * 3 for x in s)
    assert term("attn_kl", {"attentions": s2}, {"attentions": t}, mask()) == pytest.approx(ref_attn_kl(s, t), rel=1e-5)
    assert term("attn_mse", {"attentions": s2}, {"attentions": t}, mask()) != pytest.approx(ref_attn_mse(s, t), rel=1e-3)


def states(seed, width=8, layers=L):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, width, generator=g) for _ in range(layers))


def test_attn_out_is_the_valid_token_mse_of_the_contexts():
    s, t = states(1), states(2)
    errs = [[((s[i][b, k] - t[i][b, k]) ** 2).mean().item() for b, n in enumerate(LENGTHS) for k in range(n)] for i in range(L)]
    ref = sum(sum(e) / len(e) for e in errs) / L
    assert term("attn_out", {"context": s}, {"context": t}, mask()) == pytest.approx(ref, rel=1e-5)


def softmax_rows(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    return [v / sum(e) for v in e]


def test_value_relation_matches_reference_on_the_chosen_layer():
    g = torch.Generator().manual_seed(5)
    sv = tuple(torch.randn(B, H, T, D, generator=g) for _ in range(L))
    tv = tuple(torch.randn(B, H, T, D, generator=g) for _ in range(L))

    def ref(layer):
        rows = []
        for b, n in enumerate(LENGTHS):
            for h in range(H):
                vs, vt = sv[layer][b, h, :n].double(), tv[layer][b, h, :n].double()
                for q in range(n):
                    rs = softmax_rows([(vs[q] @ vs[k]).item() / math.sqrt(D) for k in range(n)])
                    rt = softmax_rows([(vt[q] @ vt[k]).item() / math.sqrt(D) for k in range(n)])
                    rows.append(kl(rt, rs))
        return sum(rows) / len(rows)

    assert term("value_rel", {"values": sv}, {"values": tv}, mask()) == pytest.approx(ref(-1), rel=1e-5)
    assert term("value_rel", {"values": sv}, {"values": tv}, mask(), layer=0) == pytest.approx(ref(0), rel=1e-5)


def ref_cka(x, y):
    """Linear CKA from its HSIC definition with the centering matrix, in float64."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    c = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = c @ x @ x.T @ c, c @ y @ y.T @ c
    return ((kx * ky).sum() / (kx.norm() * ky.norm())).item()


def test_cka_is_one_for_identical_features_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g)
    rot, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, 2.5 * x @ rot).item() == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, y).item() == pytest.approx(ref_cka(x, y), rel=1e-4)
    assert linear_cka(x @ rot * 0.1, y).item() == pytest.approx(ref_cka(x, y), rel=1e-4)
    assert linear_cka(x, y).item() < 0.9


def pooled_ref(h, b, n):
    return h[b, :n].mean(0)


def test_cka_terms_match_references():
    s, t = states(1, layers=L + 1), states(2, layers=L + 1)  # embedding output first: skipped
    so, to = {"hidden": s}, {"hidden": t}
    intra = sum(sum(1 - ref_cka(s[i][b, :n], t[i][b, :n]) for b, n in enumerate(LENGTHS)) / B for i in range(1, L + 1)) / L
    assert term("cka_intra", so, to, mask()) == pytest.approx(intra, rel=1e-4)
    ps = [torch.stack([pooled_ref(s[i], b, n) for b, n in enumerate(LENGTHS)]) for i in range(L + 1)]
    pt = [torch.stack([pooled_ref(t[i], b, n) for b, n in enumerate(LENGTHS)]) for i in range(L + 1)]
    inter = sum(1 - ref_cka(ps[i], pt[i]) for i in range(1, L + 1)) / L
    assert term("cka_inter", so, to, mask()) == pytest.approx(inter, rel=1e-4)
    # global: each example's row of inner products with a queue of teacher features (this batch first)
    state = {}
    first = sum(1 - ref_cka(ps[i] @ pt[i].T, pt[i] @ pt[i].T) for i in range(1, L + 1)) / L
    assert term("cka_global", so, to, mask(), state, memory=4) == pytest.approx(first, rel=1e-4)
    bank = [torch.cat([pt[i], pt[i]]) for i in range(L + 1)]  # second step: this batch, then the queue (3 kept of 4)
    second = sum(1 - ref_cka(ps[i] @ bank[i].T, pt[i] @ bank[i].T) for i in range(1, L + 1)) / L
    assert term("cka_global", so, to, mask(), state, memory=4) == pytest.approx(second, rel=1e-4)
    assert all(q.shape[0] == 4 for q in state["queues"].values())


def test_kmeans_finds_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(40, 2, generator=g) for c in centres])
    got = kmeans(x, 3)
    # each true centre has one found centroid at its cluster's mean (the exact k-means optimum here)
    for c in range(3):
        nearest = got[torch.cdist(centres[c:c + 1], got).argmin()]
        assert torch.allclose(nearest, x[40 * c:40 * (c + 1)].mean(0), atol=1e-5)
    assert torch.equal(kmeans(x, 3), got)  # the same centroids on every call (a resumed run)
    with pytest.raises(CgfBertError, match="4 centroids need at least 4 examples"):
        kmeans(x[:3], 4)


def test_cka_centroids_relates_the_batch_to_the_teachers_clusters():
    """cka_centroids: the centroids clustered once from the cached teacher features of every training
    example (the embedding output skipped), then 1 - CKA of the batch's rows of inner products with them."""
    g = torch.Generator().manual_seed(3)
    per_example = [torch.randn(L + 1, n, 8, generator=g) for n in (3, 5, 2, 4, 6, 3)]  # (layers + 1, tokens, hidden 8 as states())
    cache = TeacherCache(list(range(6)), torch.zeros(6, 2), {"hidden": per_example})
    term_ = LossTerm.make("cka_centroids", 1.0, centroids=2)
    state = term_.kind.prepare(cache, **dict(term_.params))
    means = torch.stack([h.mean(1) for h in per_example])
    for i, bank in enumerate(state["centroids"], start=1):
        assert torch.equal(bank, kmeans(means[:, i], 2))
    s, t = states(1, layers=L + 1), states(2, layers=L + 1)
    ps = [torch.stack([pooled_ref(s[i], b, n) for b, n in enumerate(LENGTHS)]) for i in range(L + 1)]
    pt = [torch.stack([pooled_ref(t[i], b, n) for b, n in enumerate(LENGTHS)]) for i in range(L + 1)]
    want = sum(1 - ref_cka(ps[i] @ state["centroids"][i - 1].T, pt[i] @ state["centroids"][i - 1].T) for i in range(1, L + 1)) / L
    assert term_({"hidden": s}, {"hidden": t}, {"attention_mask": mask()}, state).item() == pytest.approx(want, rel=1e-4)
    with pytest.raises(CgfBertError, match="no teacher cache was built"):
        term_.kind.prepare(None, centroids=2)


NEW = ["attn_kl", "attn_mse", "attn_out", "value_rel", "cka_intra", "cka_inter", "cka_global", "cka_centroids"]


def test_terms_ignore_padding_on_a_tiny_bert():
    """Padding a batch further (masked tokens holding other words) leaves every term unchanged."""
    torch.manual_seed(0)
    teacher = BertMRPC(bert_from_config(tiny_config())).eval()
    student = BertMRPC(bert_from_config(tiny_config())).set_softmax(softmax_spec("cgf", coeff=0.5)).eval()
    ids = torch.randint(5, 25, (3, 7))
    m = (torch.arange(7)[None, :] < torch.tensor([7, 5, 3])[:, None]).long()
    batch = {"input_ids": ids, "attention_mask": m, "token_type_ids": torch.zeros_like(ids)}
    padded = {"input_ids": torch.cat([ids, torch.randint(5, 25, (3, 4))], 1), "attention_mask": torch.cat([m, torch.zeros(3, 4, dtype=torch.long)], 1)}
    padded["token_type_ids"] = torch.zeros_like(padded["input_ids"])
    terms = [LossTerm.make(n, 1.0) for n in NEW]
    need = needs(tuple(terms))
    cfg = teacher.bert.config
    clusters = {"centroids": [torch.randn(4, cfg.hidden_size) for _ in range(cfg.num_hidden_layers)]}  # as prepare makes them
    state = lambda t: dict(clusters) if t.name == "cka_centroids" else {}  # noqa: E731
    with torch.no_grad():
        short = [t(student(**batch, needs=need), teacher(**batch, needs=need), batch, state(t)) for t in terms]
        long = [t(student(**padded, needs=need), teacher(**padded, needs=need), padded, state(t)) for t in terms]
    for name, a, b in zip(NEW, short, long):
        assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-7), name
        assert a.item() > 0, name  # random teacher and student differ


def test_registered_and_listed():
    assert set(NEW) <= set(LOSSES)
    assert LOSSES["attn_kl"].needs == {"attentions"} and LOSSES["attn_out"].needs == {"context"}
    assert LOSSES["value_rel"].needs == {"values"} and LOSSES["cka_global"].stateful


@pytest.mark.parametrize("cache", [True, False])
def test_distillation_with_several_terms(tiny_bert, tiny_mrpc, tmp_path, cache):
    cfg = TrainConfig(model=str(tiny_bert), data_dir=str(tiny_mrpc), epochs=1, batch_size=8, approx=Approximations(softmax=softmax_spec("cgf")))
    extra = (LossTerm.make("attn_kl", 1.0), LossTerm.make("attn_out", 0.1), LossTerm.make("value_rel", 1.0), LossTerm.make("cka_global", 1.0, memory=16),
             *([LossTerm.make("cka_centroids", 1.0, centroids=2)] if cache else []))  # the centroids come from the cache
    dcfg = DistillConfig(terms=kd_preset(0.5, 2.0, 10.0) + extra, cache_teacher=cache)
    rec = distill(cfg, dcfg, tmp_path / "teacher.pt", results_dir=tmp_path / "r")
    logged = rec["epochs"][0]["train"]
    assert {"attn_kl", "attn_out", "value_rel", "cka_global"} <= set(logged) and all(math.isfinite(v) for v in logged.values())
    assert rec["distill"]["teacher_cached"] == cache
    assert ("-b10-attn_kl1-attn_out0.1-value_rel1-cka_global1-cka_centroids1-" if cache else "-b10-attn_kl1-attn_out0.1-value_rel1-cka_global1-") in rec["name"]
