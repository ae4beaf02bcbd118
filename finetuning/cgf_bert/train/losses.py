"""Distillation loss terms: the functions behind the loss registry's entries, and the KD train step.

Each ``@register_loss`` entry (``objective.py``) declares what it reads from student and teacher
and its parameters; a term's value is returned before weighting and logged. Adding a term is one
decorated function here (and its test).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cgf_bert import CgfBertError
from cgf_bert.objective import LossTerm, Outputs, needs, register_loss
from cgf_bert.registry import Param

Batch = dict[str, torch.Tensor]














# ---------------------------------------------------------------- the terms


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2
    (Hinton et al.) so its gradient scale does not shrink as T grows. Batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean") * t * t


def hidden_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers (embedding output and each layer) of the MSE over valid tokens.

    Each state is (B, T, H); ``mask`` is (B, T), 1 for real tokens. Padding positions
    are excluded, so the value does not depend on how a batch was padded.
    """
    if len(student) != len(teacher):
        raise CgfBertError(f"student has {len(student)} hidden states, teacher {len(teacher)}: layer maps differ")
    m = mask.unsqueeze(-1).float()  # (B, T, 1)
    denom = m.sum() * student[0].shape[-1]
    per_layer = [(((s.float() - t.float()) ** 2) * m).sum() / denom for s, t in zip(student, teacher)]
    return torch.stack(per_layer).mean()


@register_loss("ce", uses_teacher=False)
def _ce(s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
    """Hard-label cross-entropy."""
    return F.cross_entropy(s["logits"], batch["labels"])


@register_loss("kd", params=(Param("temperature", float, 2.0, "KD temperature T (the KL term is scaled by T^2)", above=0.0),))
def _kd(s: Outputs, t: Outputs, batch: Batch, temperature: float = 2.0) -> torch.Tensor:
    """Logit KD: T^2 KL(teacher_T || student_T)."""
    return logit_kd(s["logits"], t["logits"], temperature)


@register_loss("hidden_mse", needs=("hidden",))
def _hidden(s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
    """Per-layer hidden-state MSE over valid tokens."""
    return hidden_mse(s["hidden"], t["hidden"], batch["attention_mask"])


# ---------------------------------------------------------------- attention and feature-structure terms
# Shapes: attention maps (B, H, Q, K); hidden, context and value states (B, T, hidden); the
# batch's ``attention_mask`` (B, T) is 1 on real tokens. Every term below reads valid tokens
# only, so padding a batch further leaves it unchanged; each is a mean over the layers it reads.

TINY = 1e-30  # floor under a row sum (an all-masked row)


def _masks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows (B, 1, Q), keys (B, 1, 1, K)) as float masks."""
    m = mask.float()
    return m[:, None, :], m[:, None, None, :]


class _LogProb(torch.autograd.Function):
    """log p with a backward that cannot overflow.

    CGF gives some keys probabilities that underflow float32 (layer 0 of the pretrained student
    reaches 1e-45): autograd's 1/p there is inf, and the step's gradient turns nan (seen on the
    second MRPC step). The true gradient reaching the scores, (1/p) * dp/ds, is bounded; here
    p is floored at float32's smallest normal number in both directions, so the few keys
    below it (probability < 1e-38) get a gradient scaled down instead of an inf.
    """

    @staticmethod
    def forward(ctx, p):
        floored = p.clamp_min(torch.finfo(p.dtype).tiny)
        ctx.save_for_backward(floored)
        return floored.log()

    @staticmethod
    def backward(ctx, g):
        (floored,) = ctx.saved_tensors
        return g / floored


def renormalised_log(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(p_j / sum_k p_k) over valid keys (log-space, so a row whose mass underflows is still a
    distribution); masked keys -inf."""
    _, keys = _masks(mask)
    logp = _LogProb.apply(p.float()).masked_fill(keys == 0, float("-inf"))
    return logp - logp.logsumexp(-1, keepdim=True)


def row_kl(teacher: torch.Tensor, student_log: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher row || student row) over valid keys, mean over valid query rows and heads.

    ``student_log`` holds the student's log-probabilities (masked keys -inf, never read).
    """
    rows, keys = _masks(mask)
    t = teacher.float() * keys
    s = student_log.masked_fill(keys == 0, 0.0)
    kl = (torch.xlogy(t, t) - t * s).sum(-1)  # (B, H, Q); 0 log 0 = 0
    return (kl * rows).sum() / (rows.sum() * t.shape[1])


def attention_kl(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of ``row_kl``, each student row renormalised over its valid keys first
    (CGF rows do not sum to 1; this loss compares distributions, and only it renormalises)."""
    return torch.stack([row_kl(t, renormalised_log(s, mask), mask) for s, t in zip(student, teacher)]).mean()


def attention_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the MSE of raw probabilities over valid (query, key) entries and heads."""
    rows, keys = _masks(mask)
    valid = rows[..., None] * keys  # (B, 1, Q, K)
    denom = valid.sum() * student[0].shape[1]
    return torch.stack([(((s.float() - t.float()) ** 2) * valid).sum() / denom for s, t in zip(student, teacher)]).mean()


def value_relation(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM's value relation of values (B, H, T, d): log-softmax over valid keys of V V^T / sqrt(d)."""
    v = values.float()
    rel = v @ v.transpose(-1, -2) / math.sqrt(v.shape[-1])
    return rel.masked_fill(mask[:, None, None, :] == 0, float("-inf")).log_softmax(-1)


def _centered(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` (..., N, F) minus its mean over the rows where ``m`` (..., N) is 1; other rows 0."""
    m = m.float().unsqueeze(-1)
    mean = (x * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp_min(1.0)
    return (x - mean) * m


def linear_cka(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Linear CKA of features ``x`` (..., N, F) and ``y`` (..., N, G) over the N rows ``m`` marks.

    CKA = <K_x, K_y> / (|K_x| |K_y|) with K = X_c X_c^T the Gram matrix of the row-centered
    features (Kornblith et al. 2019); 1 for identical features, invariant to orthogonal
    transforms and isotropic scaling of either. Computed from the N x N Grams, cheap for N
    tokens or examples much smaller than the feature width.
    """
    if m is None:
        m = x.new_ones(x.shape[:-1])
    xc, yc = _centered(x.float(), m), _centered(y.float(), m)
    kx, ky = xc @ xc.transpose(-1, -2), yc @ yc.transpose(-1, -2)
    num = (kx * ky).sum((-1, -2))
    return num / (kx.norm(dim=(-1, -2)) * ky.norm(dim=(-1, -2))).clamp_min(TINY)


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, hidden) states over each example's valid tokens: (B, hidden)."""
    m = mask.float().unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1)


@register_loss("attn_kl", needs=("attentions",))
def _attn_kl(s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
    """Attention-map KL(teacher || student) per row over valid keys and query rows (student rows renormalised)."""
    return attention_kl(s["attentions"], t["attentions"], batch["attention_mask"])


@register_loss("attn_mse", needs=("attentions",))
def _attn_mse(s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
    """Attention-map MSE over valid entries, raw probabilities (no renormalising)."""
    return attention_mse(s["attentions"], t["attentions"], batch["attention_mask"])


@register_loss("attn_out", needs=("context",))
def _attn_out(s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
    """MSE of each self-attention's output P·V (before the output projection) over valid tokens."""
    return hidden_mse(s["context"], t["context"], batch["attention_mask"])


LAYER = Param("layer", int, -1, "layer index (-1 = the last)", min=-64, max=63)


@register_loss("value_rel", needs=("values",), params=(LAYER,))
def _value_rel(s: Outputs, t: Outputs, batch: Batch, layer: int = -1) -> torch.Tensor:
    """MiniLM value-relation KL(teacher || student) of softmax(V V^T / sqrt(d)), one layer."""
    mask = batch["attention_mask"]
    return row_kl(value_relation(t["values"][layer], mask).exp(), value_relation(s["values"][layer], mask), mask)

# FSD (Jung et al., "Feature structure distillation with centered kernel alignment in BERT
# transferring"): the three structures of each encoder layer's output (the embedding output is
# skipped: embeddings are frozen in every recipe), compared by linear CKA; loss = 1 - CKA.


@register_loss("cka_intra", needs=("hidden",))
def _cka_intra(s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
    """FSD intra-feature: 1 - CKA of each example's token-by-token structure (valid tokens), mean over examples and layers."""
    mask = batch["attention_mask"]
    return torch.stack([1 - linear_cka(hs, ht, mask).mean() for hs, ht in zip(s["hidden"][1:], t["hidden"][1:])]).mean()


@register_loss("cka_inter", needs=("hidden",))
def _cka_inter(s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
    """FSD local inter-feature: 1 - CKA across the batch's examples of each layer's token-mean features."""
    mask = batch["attention_mask"]
    return torch.stack([1 - linear_cka(pooled(hs, mask), pooled(ht, mask)) for hs, ht in zip(s["hidden"][1:], t["hidden"][1:])]).mean()


MEMORY = Param("memory", int, 512, "teacher features kept in cka_global's queue (examples)", min=1)


@register_loss("cka_global", needs=("hidden",), params=(MEMORY,), stateful=True)
def _cka_global(s: Outputs, t: Outputs, batch: Batch, memory: int = 512, state: dict | None = None) -> torch.Tensor:
    """FSD global inter-feature: 1 - CKA of the batch's relations to a queue of teacher features beyond the batch.

    The paper relates each example to k-means centroids of the teacher's features over the
    whole training set. We keep instead a FIFO queue of the teacher's token-mean features of
    the last ``memory`` training examples per layer (as MoCo keeps its keys): no extra pass
    over the data, the same distribution, and it works with the live teacher as with the
    cache. Each example's structure is its row of inner products with the queue (current
    batch included, so the first step has a memory); student and teacher rows are compared by
    CKA across the batch. The queue is per run and is not saved by ``--resume``.
    """
    mask, queues = batch["attention_mask"], state.setdefault("queues", {})
    losses = []
    for i, (hs, ht) in enumerate(zip(s["hidden"][1:], t["hidden"][1:])):
        ps, pt = pooled(hs, mask), pooled(ht, mask).detach()
        bank = torch.cat([pt, queues.get(i, pt[:0])])  # (M, hidden), newest first
        losses.append(_relations_cka(ps, pt, bank))
        queues[i] = bank[:memory]
    return torch.stack(losses).mean()


def _relations_cka(ps: torch.Tensor, pt: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """FSD's global structure: 1 - CKA across the batch of the student's and the teacher's rows of
    inner products with ``bank`` (M, hidden). Under bf16 autocast the products and Grams stay in
    float32 (a CKA of near-parallel bf16 Grams is mostly rounding)."""
    with torch.autocast(ps.device.type, enabled=False):
        return 1 - linear_cka(ps @ bank.T, pt @ bank.T)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """``k`` centroids of the rows of ``x`` (N, F): k-means++ seeding (a fixed generator, so a run and
    its resume get the same centroids), then Lloyd steps until no assignment changes. (k, F)."""
    if k > len(x):
        raise CgfBertError(f"{k} centroids need at least {k} examples, got {len(x)}")
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    centres = x[torch.randint(len(x), (1,), generator=g)]
    while len(centres) < k:  # each next centre drawn with probability proportional to its squared distance
        d2 = torch.cdist(x, centres).min(1).values ** 2
        if d2.sum() == 0:
            raise CgfBertError(f"{k} centroids need {k} distinct feature vectors, the features have {len(centres)}")
        centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
    assign = None
    for _ in range(iters):
        new = torch.cdist(x, centres).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = x[assign == c]
            if len(members):  # an empty cluster keeps its centre
                centres[c] = members.mean(0)
    return centres.float()


CENTROIDS = Param("centroids", int, 100, "k-means centroids of the teacher's features over the training set, per layer", min=2, max=4096)


def _teacher_centroids(cache, centroids: int = 100) -> dict:
    """Per layer, k-means centroids of the teacher's token-mean features over every cached training example."""
    if cache is None or "hidden" not in cache.outputs:
        raise CgfBertError("loss 'cka_centroids' clusters the teacher's cached hidden states on the training set, "
                           "and no teacher cache was built (not enough memory for it): use cka_global's queue instead")
    means = torch.stack([h.mean(1) for h in cache.outputs["hidden"]])  # (N, layers + 1, hidden): one row per example
    # the embedding output skipped; the same centroids for every training seed (k-means seeded at 0)
    return {"centroids": [kmeans(means[:, i], centroids) for i in range(1, means.shape[1])]}


@register_loss("cka_centroids", needs=("hidden",), params=(CENTROIDS,), prepare=_teacher_centroids)
def _cka_centroids(s: Outputs, t: Outputs, batch: Batch, centroids: int = 100, state: dict | None = None) -> torch.Tensor:
    """FSD global inter-feature with FSD's own memory: 1 - CKA of the batch's relations to k-means centroids.

    As in the paper, each example is related to ``centroids`` k-means centroids of the teacher's
    token-mean features over the whole training set (per layer), clustered once before training
    from the teacher cache (``_teacher_centroids``); ``cka_global`` is the same structure against a
    FIFO queue of recent examples instead. The centroids are remade identically on ``--resume``.
    """
    mask, banks = batch["attention_mask"], state["centroids"]
    losses = []
    for i, (hs, ht) in enumerate(zip(s["hidden"][1:], t["hidden"][1:])):
        if banks[i].device != hs.device:  # made on the CPU from the cache: moved once
            banks[i] = banks[i].to(hs.device)
        losses.append(_relations_cka(pooled(hs, mask), pooled(ht, mask).detach(), banks[i]))
    return torch.stack(losses).mean()


# ---------------------------------------------------------------- the preset and its label












# ---------------------------------------------------------------- the step


def make_kd_step(teacher: nn.Module | None, terms: tuple[LossTerm, ...], cache=None):
    """A ``train_step`` for ``fit``: the student is trained against the teacher's outputs.

    With a ``TeacherCache`` the teacher's outputs are looked up by the batch's ``idx``;
    otherwise ``teacher`` runs in eval mode under no_grad on each batch. Both model calls
    ask for exactly the outputs the terms need.
    """
    if cache is None:
        teacher.eval()
    need = needs(terms)
    # per-run memories (cka_global's queue; cka_centroids' clusters, made here from the cache)
    states = {t.name: t.kind.prepare(cache, **dict(t.params)) if t.kind.prepare else {} for t in terms if t.kind.stateful}

    def kd_step(model: nn.Module, batch: Batch):
        if cache is not None:
            t_out = cache.lookup(batch["idx"], batch["input_ids"].shape[1], batch["input_ids"].device)
        else:
            with torch.no_grad():
                t_out = teacher(**batch, needs=need)
        s_out = model(**batch, needs=need)
        values = {t.name: t(s_out, t_out, batch, states.get(t.name)) for t in terms}
        loss = sum(t.weight * values[t.name] for t in terms)
        return loss, {k: v.detach() for k, v in values.items()}

    return kd_step
