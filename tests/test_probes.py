"""Layer probes on a tiny random BERT: the encoder run as steps is the model, the linear
approximator recovers an exactly linear layer, and replacing, removing and swapping layers do
what they say."""

import json

import torch
from conftest import tiny_config
from test_experiments import module
from torch import nn

from cgf_bert.analysis.probes import (
    LinearMap,
    Moments,
    Variant,
    block_io,
    cache_dev,
    fit_maps,
    nonlinearity,
    order_steps,
    relative_residual,
    run_steps,
    swap_order,
    variant_logits,
    variants,
)
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.bert import BertMRPC, bert_from_config
from cgf_bert.model.steps import embed, encoder_mask, head

CPU = torch.device("cpu")


def _model(softmax="cgf"):
    torch.manual_seed(0)
    spec = softmax_spec("cgf", coeff=0.5) if softmax == "cgf" else softmax_spec("exact")
    return BertMRPC(bert_from_config(tiny_config())).set_softmax(spec).eval()


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, 6:] = 0
        mask[2, 4:] = 0
        out.append({"input_ids": torch.randint(5, 25, (3, 9), generator=g), "attention_mask": mask,
                    "token_type_ids": torch.zeros(3, 9, dtype=torch.long), "labels": torch.tensor([0, 1, 1])})
    return out


class LinearLayer(nn.Module):
    """A stand-in BERT layer that is exactly affine in both blocks: attention x A + a, feed-forward x B + b."""

    def __init__(self, d, seed=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = LinearMap(torch.randn(d, d, generator=g) / d**0.5, torch.randn(d, generator=g)), \
            LinearMap(torch.randn(d, d, generator=g) / d**0.5, torch.randn(d, generator=g))
        self.attention = lambda h, mask: (self.a(h), None)

    def feed_forward_chunk(self, x):
        return self.b(x)

    def forward(self, h, mask, *args, **kwargs):  # the encoder passes BERT's other layer arguments
        return self.b(self.a(h))


def test_steps_are_the_model():
    model = _model()
    for batch in _batches(2):
        mask = encoder_mask(batch["attention_mask"])
        with torch.no_grad():
            logits = head(model, run_steps(embed(model, batch), mask, order_steps(model, range(2))))
            hs, _ = block_io(model, batch)  # the layer as attention block then feed-forward block
            torch.testing.assert_close(logits, model(**batch)["logits"])
            torch.testing.assert_close(head(model, hs[-1]), logits)


def test_moments_recover_an_affine_map_exactly():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    m = Moments(6, 4)
    for _ in range(3):  # accumulated over batches
        x = torch.randn(50, 6, generator=g) * 3 + 1
        m.add(x, x @ w + b)
    lin, lam = m.solve(ridge=0.0)
    assert lam == 0.0
    torch.testing.assert_close(lin.weight, w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.bias, b, atol=1e-5, rtol=1e-5)
    x = torch.randn(20, 6, generator=g)
    assert relative_residual(lin(x), x @ w + b) < 1e-10
    assert m.solve(ridge=1.0)[1] > 0  # the ridge is relative to the mean input variance


def test_a_linear_layer_is_found_linear_and_its_map_replaces_it_exactly():
    model = _model()
    model.bert.encoder.layer[0] = LinearLayer(tiny_config().hidden_size)
    batches = _batches(4)
    maps, lams = fit_maps(model, batches, CPU, ridge=1e-9)
    cache = cache_dev(model, _batches(2, seed=7), CPU)
    nl = nonlinearity(maps, cache)
    assert all(nl[0][b]["linear"] < 1e-6 for b in ("layer", "attention", "ffn"))  # residual ~0
    assert nl[1]["layer"]["linear"] > 1e-3  # a real BERT layer is not linear
    assert all(nl[0][b]["identity"] > 0.1 for b in ("layer", "attention", "ffn"))
    base = variant_logits(model, cache, Variant("baseline", 0, tuple(order_steps(model, range(2)))), CPU)
    with torch.no_grad():
        torch.testing.assert_close(base, torch.cat([model(**b)["logits"] for b in _batches(2, seed=7)]))
    named = {v.name: v for _, v in variants(model, maps, shuffles=1, seed=0)}
    for name in ("layer 0 linear", "attention 0 linear", "ffn 0 linear"):
        torch.testing.assert_close(variant_logits(model, cache, named[name], CPU), base, atol=1e-4, rtol=1e-4)
    # a real layer's map is the map's output: replacing layer 1 equals the head on the map of h_1
    lin_logits = torch.cat([head(model, maps[1]["layer"](hs[1])) for hs in cache.hs]).detach()
    torch.testing.assert_close(variant_logits(model, cache, named["layer 1 linear"], CPU), lin_logits)


def test_swaps_and_removal():
    model = _model("exact")
    cache = cache_dev(model, _batches(2), CPU)
    run = lambda order: variant_logits(model, cache, Variant("", 0, tuple(order_steps(model, order))), CPU)  # noqa: E731
    base = run(range(2))
    torch.testing.assert_close(run(swap_order(2, 1, 1)), base)  # a layer swapped with itself: nothing changes
    torch.testing.assert_close(run(swap_order(2, 0, 0)), base)
    h0, mask = cache.hs[0][0], cache.masks[0]  # random layers are near the identity: compare hidden states, closely
    with torch.no_grad():
        assert (run_steps(h0, mask, order_steps(model, swap_order(2, 0, 1))) - cache.hs[0][2]).abs().max() > 1e-4
    identity = LinearMap(torch.eye(tiny_config().hidden_size), torch.zeros(tiny_config().hidden_size))
    removed = variant_logits(model, cache, Variant("", 0, (identity, *order_steps(model, [1]))), CPU)
    torch.testing.assert_close(run([1]), removed)  # removal is the identity in the layer's place
    maps, _ = fit_maps(model, _batches(2), CPU, ridge=1e-4)
    named = {v.name: v for _, v in variants(model, maps, shuffles=0, seed=0)}
    torch.testing.assert_close(variant_logits(model, cache, named["layer 0 removed"], CPU), removed)
    torch.testing.assert_close(variant_logits(model, cache, named["swap 0,1"], CPU), run([1, 0]))


def test_layer_probes_script(tiny_bert, tiny_mrpc, tmp_path):
    from cgf_bert.model.bert import build_model
    from cgf_bert.store.checkpoint import save_checkpoint

    a = save_checkpoint(tmp_path / "exact.pt", build_model(str(tiny_bert)), {"model": str(tiny_bert)})
    b = save_checkpoint(tmp_path / "cgf.pt", build_model(str(tiny_bert), softmax_spec("cgf", coeff=0.5)), {"model": str(tiny_bert)})
    out = module("experiments.layer_probes", "--checkpoint", a, "--checkpoint", b, "--data-dir", tiny_mrpc,
                 "--limit-train", 20, "--shuffles", 2, "--out-dir", tmp_path / "probes")
    (path,) = (tmp_path / "probes").glob("layer_probes-*.json")
    rec = json.loads(path.read_text())
    assert [e["softmax"] for e in rec["checkpoints"]] == ["exact", "cgf c=0.5"]
    assert rec["data"]["train_examples"] == 20 and rec["settings"]["ridge"] == 1e-4
    kinds = [r["probe"] for r in rec["checkpoints"][0]["probes"]["variants"]]
    assert kinds.count("replace") == 6 and kinds.count("remove") == 2 and kinds.count("swap") == 1 and kinds.count("shuffle") == 2
    assert len(list((tmp_path / "probes").glob("*.png"))) == 2 and "dev accuracy" in out
