"""The kernel view on a tiny random BERT: the eNTK of a model linear in its parameters is the
analytic Gram, the chunked kernel is the plain Jacobian's, and the solvers fit a separable set."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_script, tiny_config
from test_experiments import in_process, module

from cgf_bert.analysis.kernel import EvalLogits, alignment, cka, gradient_fn, k_shot, logistic, lstsq, nested, ntk, solve_all
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.bert import BertMRPC, bert_from_config

CPU = torch.device("cpu")


def _model(softmax="cgf"):
    torch.manual_seed(0)
    spec = softmax_spec("cgf", coeff=0.5) if softmax == "cgf" else softmax_spec("exact")
    model = BertMRPC(bert_from_config(tiny_config())).set_softmax(spec).eval()
    model.classifier.weight.data.normal_(0, 0.5)  # a head big enough that the encoder's gradients are not tiny
    return model


def _examples(n, seed=1):
    """``n`` single examples of different lengths, and the same as padded batches of two."""
    g = torch.Generator().manual_seed(seed)
    singles = []
    for i in range(n):
        t = 4 + (3 * i) % 6
        singles.append({"input_ids": torch.randint(5, 25, (1, t), generator=g), "attention_mask": torch.ones(1, t, dtype=torch.long),
                        "token_type_ids": (torch.arange(t) >= t // 2).long()[None]})
    batches = []
    for i in range(0, n, 2):
        group = singles[i : i + 2]
        width = max(s["input_ids"].shape[1] for s in group)
        pad = lambda x: torch.cat([torch.nn.functional.pad(s[x], (0, width - s[x].shape[1])) for s in group])  # noqa: E731
        batches.append({k: pad(k) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return singles, batches


def _jacobian(model, singles):
    """(N, P) gradients of z1 - z0 by plain autograd, one unpadded example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for s in singles:
        logits = model(**s)["logits"][0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(logits[1] - logits[0], params)]))
    return torch.stack(rows).double()


@pytest.mark.parametrize("softmax", ["cgf", "exact"])
def test_chunked_kernel_is_the_jacobians(softmax):
    model = _model(softmax)
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    singles, batches = _examples(7)
    grads, n_params = gradient_fn(model, CPU)
    j = _jacobian(model, singles)  # (7, P)
    assert j.shape[1] == n_params
    rows, cols = batches[:2], batches[2:]  # 4 training rows, 3 others
    want_sgd = j @ j[:4].T
    want_sign = j @ torch.sign(j[:4]).T
    for chunk in (1, 2, 64):  # held rows per chunk: 1 and 2 recompute, 64 holds them all
        k = ntk(grads, n_params, rows, cols, row_chunk=chunk)
        torch.testing.assert_close(k.sgd, want_sgd, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(k.sign, want_sign, rtol=1e-4, atol=1e-6)
    assert ntk(grads, n_params, rows, cols, row_chunk=64).gradients == 7
    assert ntk(grads, n_params, rows, cols, row_chunk=2).gradients == 2 * 2 + 2 * (2 + 3)  # each chunk, then the rest streamed


def test_ntk_of_a_model_linear_in_its_parameters_is_the_analytic_gram():
    model = _model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))  # f = (w1 - w0) . h + b1 - b0: linear in the head
    singles, batches = _examples(6)
    grads, n_params = gradient_fn(model, CPU)
    assert n_params == 2 * tiny_config().hidden_size + 2
    with torch.no_grad():
        h = torch.cat([model.bert(**s).pooler_output for s in singles]).double()  # (6, d)
        z = torch.cat([model(**s)["logits"] for s in singles]).double()
    k = ntk(grads, n_params, batches[:1], batches[1:], row_chunk=8)
    # d f / d W = (-h, h), d f / d b = (-1, 1)
    torch.testing.assert_close(k.sgd, 2 * (h @ h[:2].T + 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.sign, 2 * (h @ torch.sign(h[:2]).T + 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.f, z[:, 1] - z[:, 0], rtol=1e-5, atol=1e-6)  # the output, from the same passes


def test_solvers_fit_a_separable_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y01 = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    x = x + 0.3 * (2 * y01[:, None] - 1) * torch.tensor([1.0, 0.5], dtype=torch.float64)  # a margin
    k = x @ x.T  # linear kernel
    y = 2 * y01.double() - 1
    assert ((lstsq(k, y, k, ridge=1e-6) > 0).long() == y01).all()
    assert ((logistic(k, y, k, ridge=1e-4) > 0).long() == y01).all()
    f0 = torch.zeros(40, dtype=torch.float64)
    scores = solve_all(k, y01, k, 1e-4, f0, f0)
    assert all(((s > 0).long() == y01).all() for s in scores.values())
    # with f0 the linearised model keeps f0 where it already fits and moves where it does not
    f0 = 3 * y  # already right: nothing to learn
    torch.testing.assert_close(logistic(k, y, k, ridge=1.0, f0_train=f0, f0_test=f0), f0, atol=0.5, rtol=0)


def test_cka_and_subsets():
    a = torch.randn(10, 10, dtype=torch.float64)
    a = a @ a.T
    assert cka(a, 3 * a) == pytest.approx(1.0) and alignment(a, 2 * a) == pytest.approx(1.0)
    assert cka(a, torch.eye(10, dtype=torch.float64)) < 1.0
    labels = [0, 1] * 20
    draw = k_shot(labels, 8, seed=3)
    assert [labels[i] for i in draw] == [0] * 8 + [1] * 8 and len(set(draw)) == 16
    small = [draw[p] for p in nested(draw, 8, 2)]
    assert [labels[i] for i in small] == [0, 0, 1, 1] and small == draw[:2] + draw[8:10]
    assert k_shot(labels, 8, seed=3) == draw != k_shot(labels, 8, seed=4)


def test_eval_logits_keep_the_last_evaluation():
    lin = torch.nn.Linear(2, 2)
    hook = EvalLogits()
    lin.register_forward_hook(hook)
    lin.eval()
    lin(torch.ones(3, 2))
    lin.train()
    lin(torch.zeros(1, 2))
    lin.eval()
    a, b = lin(torch.ones(2, 2)), lin(torch.zeros(1, 2))
    torch.testing.assert_close(hook.result(), torch.cat([a, b]).detach())


def test_kernel_view_script(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    from cgf_bert.model.bert import build_model
    from cgf_bert.store.checkpoint import save_checkpoint

    a = save_checkpoint(tmp_path / "exact.pt", build_model(str(tiny_bert)), {"model": str(tiny_bert)})
    b = save_checkpoint(tmp_path / "cgf.pt", build_model(str(tiny_bert), softmax_spec("cgf", coeff=0.5)), {"model": str(tiny_bert)})
    common = ["--data-dir", tiny_mrpc, "--k-small", 2, "--k-large", 4, "--subsets", 2, "--limit-dev", 10, "--row-chunk", 5]
    module("experiments.kernel_view", "--checkpoint", a, *common, "--out-dir", tmp_path / "first")
    (first,) = (tmp_path / "first").glob("kernel_view-*.json")
    out = in_process(monkeypatch, capsys, "experiments.kernel_view", "--checkpoint", b, "--reuse", first, *common, "--out-dir", tmp_path / "probes")
    (path,) = (tmp_path / "probes").glob("kernel_view-*.json")
    rec = json.loads(path.read_text())
    assert [e["softmax"] for e in rec["checkpoints"]] == ["exact", "cgf c=0.5"]
    assert rec["checkpoints"][0]["from_record"] and "from_record" not in rec["checkpoints"][1]
    assert rec["blocks"]["of"] == [rec["checkpoints"][1]["checkpoint"]]
    runs = rec["checkpoints"][1]["runs"]
    assert [(r["seed"], r["k"], r["train_examples"]) for r in runs] == [(0, 2, 4), (0, 4, 8), (1, 2, 4), (1, 4, 8)]
    assert runs[0]["fine_tune"]["steps"] == 1 and set(runs[0]["kernels"]) == {"sgd", "sign"}
    assert len(rec["comparison"]) == 4 and rec["data"]["dev_examples"] == 10
    assert (tmp_path / "probes" / Path(rec["figure"]).name).exists() and "fine-tune" in out
    code, _, err = run_script(monkeypatch, capsys, "experiments.kernel_view", "--checkpoint", b, "--reuse", first, *common, "--ridge", 0.5)
    assert code == 2 and "ran with other settings (ridge)" in err and len(err.strip().splitlines()) == 1
