"""Loss-landscape curvature from Hessian-vector products (after PyHessian, Yao et al. 2020).

Everything here sees the Hessian only through ``hvp(v) = H v`` over a list of parameter tensors, by
double backward: ``H v = d/dtheta (grad L . v)``. On it:

- ``top_eigenvalues``: power iteration, each new eigenvector deflated against the ones found;
- ``hutchinson_trace``: ``E[v^T H v]`` over Rademacher ``v`` (exact for a diagonal H);
- ``slq_density``: stochastic Lanczos quadrature: ``m`` Lanczos steps from a random unit vector give
  a tridiagonal T whose eigenvalues (nodes) and squared first eigenvector components (weights)
  are a quadrature of the spectral density; averaged over runs and smoothed by a Gaussian.

``loss_hvp`` builds ``hvp`` for a model's mean cross-entropy over fixed batches, in eval mode (no
dropout, so H is a fixed matrix), over the trainable parameters.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Vec = list[torch.Tensor]  # one tensor per parameter
HVP = Callable[[Vec], Vec]


def dot(a: Vec, b: Vec) -> float:
    """Accumulated in float64 (millions of float32 products otherwise lose the small eigenvalues)."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def axpy(alpha: float, x: Vec, y: Vec) -> Vec:
    """``alpha x + y``."""
    return [alpha * a + b for a, b in zip(x, y)]


def normalized(v: Vec) -> Vec:
    n = dot(v, v) ** 0.5
    return [x / (n + 1e-30) for x in v]


def random_like(params: Sequence[torch.Tensor], gen: torch.Generator, rademacher: bool = False) -> Vec:
    out = []
    for p in params:
        r = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        out.append((torch.sign(r) if rademacher else r).to(p.device))
    return out


def loss_hvp(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], batches: int = 1) -> HVP:
    """``v -> H v`` of the mean over ``batches`` of ``loss_fn(b)``'s losses (``loss_fn(b)`` for b in
    range(batches); each batch's graph is built and freed in turn, so memory is one batch's)."""

    def hvp(v: Vec) -> Vec:
        out = [torch.zeros_like(p) for p in params]
        for b in range(batches):
            loss = loss_fn(b) / batches
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(sum((g * x).sum() for g, x in zip(grads, v)), params)
            out = [o + h.detach() for o, h in zip(out, hv)]
        return out

    return hvp


def top_eigenvalues(hvp: HVP, params: Sequence[torch.Tensor], k: int = 1, iters: int = 20, tol: float = 1e-3,
                    seed: int = 0) -> tuple[list[float], list[int]]:
    """The ``k`` eigenvalues of largest magnitude (power iteration with deflation) and the HVPs each took."""
    gen = torch.Generator().manual_seed(seed)
    found: list[Vec] = []
    values, costs = [], []
    for _ in range(k):
        v = normalized(random_like(params, gen))
        value, used = None, 0
        for _ in range(iters):
            for u in found:  # deflate: stay orthogonal to the eigenvectors already found
                v = normalized(axpy(-dot(u, v), u, v))
            hv = hvp(v)
            used += 1
            new = dot(hv, v)
            v = normalized(hv)
            if value is not None and abs(new - value) <= tol * (abs(value) + 1e-12):
                value = new
                break
            value = new
        for u in found:
            v = normalized(axpy(-dot(u, v), u, v))
        found.append(v)
        values.append(float(value))
        costs.append(used)
    return values, costs


def hutchinson_trace(hvp: HVP, params: Sequence[torch.Tensor], samples: int = 16, seed: int = 0) -> tuple[float, float]:
    """(the trace estimate, its standard error) from ``samples`` Rademacher vectors."""
    gen = torch.Generator().manual_seed(seed)
    est = torch.tensor([dot(hvp(v), v) for v in (random_like(params, gen, rademacher=True) for _ in range(samples))])
    return float(est.mean()), float(est.std() / samples**0.5) if samples > 1 else float("nan")


def lanczos(hvp: HVP, params: Sequence[torch.Tensor], steps: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The nodes and weights of one SLQ run: ``steps`` Lanczos steps with full reorthogonalization."""
    v = normalized(random_like(params, gen))
    basis, alphas, betas = [v], [], []
    w_prev, beta = None, 0.0
    for j in range(steps):
        w = hvp(basis[-1])
        alpha = dot(w, basis[-1])
        w = axpy(-alpha, basis[-1], w)
        if w_prev is not None:
            w = axpy(-beta, w_prev, w)
        for u in basis:  # full reorthogonalization: without it the nodes repeat (ghost eigenvalues)
            w = axpy(-dot(u, w), u, w)
        alphas.append(alpha)
        beta = dot(w, w) ** 0.5
        if j + 1 == steps or beta <= 1e-6 * max(abs(a) for a in alphas):  # the Krylov space is exhausted (relative: float32)
            break
        betas.append(beta)
        w_prev = basis[-1]
        basis.append([x / beta for x in w])
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(t)
    return nodes, vecs[0] ** 2


def slq_density(hvp: HVP, params: Sequence[torch.Tensor], steps: int = 32, runs: int = 1, seed: int = 0) -> list[dict]:
    """``runs`` SLQ quadratures: ``[{"nodes": [...], "weights": [...]}]`` (weights of a run sum to 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(runs):
        nodes, weights = lanczos(hvp, params, steps, gen)
        out.append({"nodes": nodes.tolist(), "weights": weights.tolist()})
    return out


def smoothed(quadratures: list[dict], grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """The density on ``grid``: each run's nodes as Gaussians of width ``sigma`` weighted by their
    weights, averaged over runs."""
    dens = torch.zeros_like(grid, dtype=torch.float64)
    for q in quadratures:
        nodes, weights = torch.tensor(q["nodes"], dtype=torch.float64), torch.tensor(q["weights"], dtype=torch.float64)
        g = torch.exp(-((grid[:, None] - nodes[None]) ** 2) / (2 * sigma**2)) / (sigma * (2 * torch.pi) ** 0.5)
        dens += (g * weights[None]).sum(-1)
    return dens / max(len(quadratures), 1)
