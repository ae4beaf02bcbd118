"""Hessian analysis (cgf_bert.analysis.hessian) against matrices whose spectrum is known."""

import numpy as np
import torch

from cgf_bert.analysis import hessian as H


def _quadratic(eigs, seed=0):
    """0.5 x^T A x over two parameter tensors (shapes 3 and (2, 2)), A = Q diag(eigs) Q^T: its Hessian is A."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    params = [torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)]

    def loss(_b):
        x = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * x @ a @ x

    return a, params, H.loss_hvp(loss, params)


EIGS = [9.0, -5.0, 3.0, 1.0, 0.5, 0.1, 0.0]


def test_the_top_eigenvalues_are_the_matrixs():
    _, params, hvp = _quadratic(EIGS)
    values, costs = H.top_eigenvalues(hvp, params, k=2, iters=300, tol=1e-10)
    np.testing.assert_allclose(values, [9.0, -5.0], rtol=1e-5)  # the largest in magnitude, then the next
    assert all(1 <= c <= 300 for c in costs)


def test_hutchinson_is_exact_on_a_diagonal_and_unbiased_otherwise():
    a, params, hvp = _quadratic(EIGS)
    est, err = H.hutchinson_trace(hvp, params, samples=400, seed=1)
    assert abs(est - float(torch.trace(a))) < 4 * err + 1e-9
    diag = [torch.zeros(3, dtype=torch.float64, requires_grad=True), torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)]
    d = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], dtype=torch.float64)
    dh = H.loss_hvp(lambda _b: 0.5 * (d * torch.cat([p.reshape(-1) for p in diag]) ** 2).sum(), diag)
    assert H.hutchinson_trace(dh, diag, samples=3)[0] == 28.0


def test_full_lanczos_recovers_the_spectrum_and_the_density_integrates_to_one():
    _, params, hvp = _quadratic(EIGS)
    (q,) = H.slq_density(hvp, params, steps=len(EIGS), runs=1)
    np.testing.assert_allclose(sorted(q["nodes"]), sorted(EIGS), atol=1e-8)
    assert abs(sum(q["weights"]) - 1) < 1e-10
    grid = torch.linspace(-10, 12, 4001, dtype=torch.float64)
    dens = H.smoothed([q], grid, sigma=0.1)
    assert abs(float(torch.trapezoid(dens, grid)) - 1) < 1e-3


def test_the_hvp_of_a_network_is_its_hessian_times_v():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    params = list(net.parameters())
    hvp = H.loss_hvp(lambda b: torch.nn.functional.cross_entropy(net(x[b::2]), y[b::2]) * 2 * len(y[b::2]) / len(y), params, batches=2)
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss_of(theta):
        out, i = [], 0
        for p in params:
            out.append(theta[i:i + p.numel()].reshape(p.shape))
            i += p.numel()
        z = torch.func.functional_call(net, {n: t for (n, _), t in zip(net.named_parameters(), out)}, (x,))
        return torch.nn.functional.cross_entropy(z, y)

    full = torch.autograd.functional.hessian(loss_of, flat.detach())
    v = [torch.randn_like(p) for p in params]
    got = torch.cat([h.reshape(-1) for h in hvp(v)])
    torch.testing.assert_close(got, full @ torch.cat([t.reshape(-1) for t in v]), rtol=1e-8, atol=1e-10)


def test_the_experiment_on_a_tiny_bert_agrees_with_itself(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    """experiments.hessian end to end: power iteration's top eigenvalue is the extreme Lanczos node (two
    methods, one Hessian), and the record counts every product."""
    import json

    from conftest import run_script

    from cgf_bert.approx.softmax import softmax_spec
    from cgf_bert.model.bert import build_model
    from cgf_bert.store.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(str(tiny_bert), softmax_spec("cgf")), {"model": str(tiny_bert)})
    code, out, err = run_script(monkeypatch, capsys, "experiments.hessian", ckpt, "--examples", 8, "--batch-size", 8, "--max-length", 32,
                                "--power-iters", 100, "--lanczos-steps", 24, "--trace-samples", 4, "--data-dir", tiny_mrpc,
                                "--results-dir", tmp_path)
    assert code == 0, err
    (rec,) = tmp_path.glob("analysis/hessian-*.json")
    (res,) = json.loads(rec.read_text())["results"]
    nodes = res["density"][0]["nodes"]
    top = res["top_eigenvalues"][0]
    extreme = max(nodes, key=abs)
    assert abs(top - extreme) <= 1e-2 * abs(extreme), (top, extreme)
    assert res["hvps"] == sum(res["power_iterations"]) + 4 + len(nodes) and res["parameters"] > 0
    assert (tmp_path / "analysis").glob("hessian-*.png")


def test_the_hvp_through_the_cgf_softmax_is_the_finite_difference_of_its_gradient(tiny_bert):
    """The CGF softmax's hand-written backward, differentiated again (create_graph), gives the true H v:
    the central difference of the gradient along v, and a symmetric operator (u . H v = v . H u)."""
    from cgf_bert.approx.softmax import softmax_spec
    from cgf_bert.model.bert import build_model

    torch.manual_seed(0)
    model = build_model(str(tiny_bert), softmax_spec("cgf", coeff=0.5)).double().eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:  # scores of order 1 or more: the variance term matters
            layer.attention.self.query.weight *= 8
    ids = torch.randint(5, 25, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 1, 1])
    params = [model.bert.encoder.layer[0].attention.self.query.weight, model.bert.encoder.layer[0].attention.self.key.weight]

    def loss(_b=0):
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))["logits"]
        return torch.nn.functional.cross_entropy(logits, labels)

    hvp = H.loss_hvp(loss, params)
    g = torch.Generator().manual_seed(2)
    v, u = H.random_like(params, g), H.random_like(params, g)
    hv = hvp(v)

    def grad_at(step):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(step * d)
        out = torch.autograd.grad(loss(), params)
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(step * d)
        return out

    eps = 1e-5
    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(eps), grad_at(-eps))]
    for got, want in zip(hv, fd):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert abs(H.dot(u, hv) - H.dot(v, hvp(u))) <= 1e-8 * abs(H.dot(u, hv)) + 1e-12
