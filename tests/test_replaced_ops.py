"""Every replaceable op is one registry entry away: throwaway GELU, LayerNorm and pooler kinds,
registered here and nowhere else, compute what a hand computation from the layer's own weights
says, keep the state dict as it is, train, and round-trip through checkpoints, records and
validate.py, per layer where the op is per layer. Exact specs leave stock transformers' modules
(the same objects) and its logits."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FINETUNING, run_script, tiny_config
from test_model import batch
from transformers import BertForSequenceClassification, BertModel

from cgf_bert import CgfBertError
from cgf_bert.approx.activations import GELU, POOLER
from cgf_bert.approx.approximations import EXACT, Approximations
from cgf_bert.approx.layernorm import LAYERNORM
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.approx.spec import Spec
from cgf_bert.cli import config_from_args, parse_for, script_parser
from cgf_bert.config import TrainConfig
from cgf_bert.data.loader import make_loader
from cgf_bert.model.bert import BertMRPC, bert_from_config, build_model
from cgf_bert.model.replaced import layer_norms
from cgf_bert.registry import Param
from cgf_bert.store.checkpoint import load_model, read_checkpoint, save_checkpoint
from cgf_bert.store.records import load_records, train_config
from cgf_bert.train.engine import evaluate
from cgf_bert.train.recipes import finetune
from cgf_bert.train.run import prepare_data

BOUND = Param("bound", float, 1.0, "clip to [-bound, bound]", above=0.0)


@pytest.fixture(scope="module")
def kinds():
    """A GELU, a LayerNorm and a pooler kind that exist only while this module's tests run."""

    @GELU.register("test_relu")
    def relu(x):
        """ReLU in place of GELU (a throwaway kind)."""
        return torch.relu(x)

    @LAYERNORM.register("test_rms")
    def rms(x, weight, bias, eps, where):
        """LayerNorm without the mean subtraction (a throwaway kind)."""
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight + bias

    @POOLER.register("test_clip", (BOUND,), label=lambda p: f"clip {p['bound']:g}", slug=lambda p: f"clip{p['bound']:g}")
    def clip(x, bound=1.0):
        """Clipping in place of tanh (a throwaway kind)."""
        return x.clamp(-bound, bound)

    yield
    del GELU.kinds["test_relu"], LAYERNORM.kinds["test_rms"], POOLER.kinds["test_clip"]


def gelu(name, layers=None, **kw):
    return Spec.make("gelu", name, layers, **kw)


def layernorm(name, layers=None, **kw):
    return Spec.make("layernorm", name, layers, **kw)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return BertMRPC(bert_from_config(tiny_config())).eval()


def io_of(modules, model, b) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of each of ``modules`` in a forward of ``model`` on ``b``."""
    seen = {}
    handles = [m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out))) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            model(**b)
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(modules))]


def test_exact_specs_keep_the_models_own_modules_and_stock_logits(kinds, model):
    """Replacing every op and going back to exact restores the very modules transformers built,
    and the logits of stock ``BertForSequenceClassification`` with the same weights."""
    layers = model.bert.encoder.layer
    own = [layer.intermediate.intermediate_act_fn for layer in layers] + [model.bert.pooler.activation]
    norms = [n for layer in layers for n in layer_norms(layer).values()] + [model.bert.embeddings.LayerNorm]
    replaced = Approximations(softmax=softmax_spec("cgf"), gelu=gelu("test_relu"), layernorm=layernorm("test_rms"),
                              pooler=Spec.make("pooler", "test_clip"))
    model.set_approx(replaced)
    now = [layer.intermediate.intermediate_act_fn for layer in layers] + [model.bert.pooler.activation]
    assert not any(a is b for a, b in zip(now, own))
    assert [type(n).__name__ for n in norms] == ["ApproxLayerNorm"] * 4 + ["LayerNorm"]  # the embedding LayerNorm stays exact
    # exact everywhere, also as a per-layer override of an exact spec: the model's own modules again
    model.set_approx(EXACT.replace(gelu=gelu("exact", {1: gelu("exact")})))
    assert all(a is b for a, b in zip([layer.intermediate.intermediate_act_fn for layer in layers] + [model.bert.pooler.activation], own))
    assert all(type(n) is torch.nn.LayerNorm for n in norms)
    stock = BertForSequenceClassification(tiny_config().__class__(**tiny_config().to_dict(), num_labels=2, attn_implementation="eager")).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**b)["logits"], stock(**b).logits, rtol=0, atol=1e-5)


def test_gelu_kind_runs_in_the_layers_it_is_placed_in(kinds, model):
    """GELU exact in layer 0 and the throwaway ReLU in layer 1: each layer's feed-forward inner
    state is what its own weights give through that function."""
    b = batch()
    exact_logits = model(**b)["logits"].detach()
    model.set_approx(EXACT.replace(gelu=gelu("exact", {1: gelu("test_relu")})))
    inter = [layer.intermediate for layer in model.bert.encoder.layer]
    (x0, y0), (x1, y1) = io_of(inter, model, b)  # (B, T, hidden) -> (B, T, intermediate)
    torch.testing.assert_close(y0, F.gelu(x0 @ inter[0].dense.weight.T + inter[0].dense.bias))
    torch.testing.assert_close(y1, torch.relu(x1 @ inter[1].dense.weight.T + inter[1].dense.bias))
    assert (y1 == 0).float().mean() > 0.3 and (y0 < 0).any()  # ReLU's zeros; GELU's negative part
    with torch.no_grad():
        assert not torch.allclose(model(**b)["logits"], exact_logits, atol=1e-4)
    assert model.approx.label() == "exact, GELU exact, layer 1 test_relu"


def test_layernorm_kind_replaces_each_layers_norms_and_keeps_the_embedding_one(kinds, model):
    b = batch()
    model.set_approx(EXACT.replace(layernorm=layernorm("test_rms", {0: layernorm("exact")})))
    (l0a, l0b), (l1a, l1b) = (tuple(layer_norms(layer).values()) for layer in model.bert.encoder.layer)
    emb = model.bert.embeddings.LayerNorm
    seen = io_of([l0a, l0b, l1a, l1b, emb], model, b)
    for norm, (x, y) in zip([l0a, l0b, emb], [seen[0], seen[1], seen[4]]):  # exact: mean and variance
        torch.testing.assert_close(y, (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
                                   * norm.weight + norm.bias)
    for norm, (x, y) in zip([l1a, l1b], seen[2:4]):  # layer 1: no mean subtracted
        torch.testing.assert_close(y, x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias)
        assert not torch.allclose(y, F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps), atol=1e-3)


def test_pooler_kind_and_its_parameter(kinds, model):
    """The logits are the classifier on the clipped pooler projection of [CLS], by hand."""
    b = batch()
    model.set_approx(EXACT.replace(pooler=Spec.make("pooler", "test_clip", bound=0.05)))
    with torch.no_grad():
        out = model(**b, needs=("hidden",))
        cls = out["hidden"][-1][:, 0]  # (B, hidden)
        pre = cls @ model.bert.pooler.dense.weight.T + model.bert.pooler.dense.bias
        logits = pre.clamp(-0.05, 0.05) @ model.classifier.weight.T + model.classifier.bias  # (B, 2)
    torch.testing.assert_close(out["logits"], logits)
    assert (pre.abs() > 0.05).any() and not torch.allclose(pre.clamp(-0.05, 0.05), torch.tanh(pre))  # the clip bites
    assert model.approx.label() == "exact, pooler clip 0.05" and model.approx.slug() == "exact-pooler-clip0.05"
    with pytest.raises(CgfBertError, match="pooler is one per model"):
        Spec.make("pooler", "test_clip", layers={0: Spec.make("pooler", "exact")})
    with pytest.raises(CgfBertError, match="bound must be finite and > 0"):
        Spec.make("pooler", "test_clip", bound=0)


def test_replacing_ops_leaves_the_state_dict_as_it_is(kinds, model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()]
    model.set_approx(Approximations(gelu=gelu("test_relu"), layernorm=layernorm("test_rms"), pooler=Spec.make("pooler", "test_clip")))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert ([n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()]) == names


# ---------------------------------------------------------------- through the recipes and scripts


@pytest.fixture(scope="module")
def dev(tiny_bert, tiny_mrpc):
    tokenizer, data = prepare_data(str(tiny_bert), str(tiny_mrpc), 128)
    return make_loader(data["validation"], tokenizer, 128)


def reference_dev(tiny_bert, state_dict, approx, dev) -> dict:
    """Dev metrics of ``state_dict`` in a model built here with ``approx``."""
    model = build_model(str(tiny_bert), approx)
    model.load_state_dict(state_dict)
    return evaluate(model, dev, torch.device("cpu"))


def test_replaced_ops_train_and_are_scored_again_from_the_checkpoint(kinds, tiny_bert, tiny_mrpc, dev, tmp_path, monkeypatch, capsys):
    """A run with all three throwaway kinds: the record and checkpoint name them, training moved
    the weights, the saved best epoch scores as recorded, and the state dict fits a stock model."""
    approx = Approximations(gelu=gelu("test_relu"), layernorm=layernorm("test_rms", {1: layernorm("exact")}),
                            pooler=Spec.make("pooler", "test_clip", bound=0.5))
    cfg = TrainConfig(model=str(tiny_bert), data_dir=str(tiny_mrpc), epochs=1, batch_size=8, lr=1e-3, approx=approx)
    rec = finetune(cfg, out=tmp_path / "m.pt", results_dir=tmp_path / "r")
    assert rec["config"]["approx"] == {"softmax": {"name": "exact"}, "gelu": {"name": "test_relu"},
                                       "layernorm": {"name": "test_rms", "layers": {"1": {"name": "exact"}}},
                                       "pooler": {"name": "test_clip", "bound": 0.5}}
    assert "-finetune-exact-gelu-test_relu-layernorm-test_rms-L1exact-pooler-clip0.5-s42" in rec["name"]
    (stored,) = load_records(tmp_path / "r")
    assert train_config(stored) == cfg
    state_dict, meta = read_checkpoint(tmp_path / "m.pt")
    assert meta["approx"] == approx
    pretrained = BertModel.from_pretrained(tiny_bert).state_dict()
    key = "encoder.layer.1.intermediate.dense.weight"
    assert (state_dict[f"bert.{key}"] - pretrained[key]).abs().max() > 1e-4  # trained through the replaced ops
    assert rec["best"] == reference_dev(tiny_bert, state_dict, approx, dev)  # the record's dev figure, evaluated afresh
    loaded, _ = load_model(tmp_path / "m.pt")
    assert [type(layer.intermediate.intermediate_act_fn).__name__ for layer in loaded.bert.encoder.layer] == ["Activation"] * 2
    assert [type(n).__name__ for layer in loaded.bert.encoder.layer for n in layer_norms(layer).values()] == ["ApproxLayerNorm"] * 2 + ["LayerNorm"] * 2
    stock = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    stock.load_state_dict(state_dict, strict=True)  # the same keys and shapes as stock BERT's
    code, out, err = run_script(monkeypatch, capsys, "validate.py", tmp_path / "m.pt", "--data-dir", tiny_mrpc, "--json", "--results-dir", tmp_path)
    assert code == 0, err
    r = json.loads(out)
    assert r["approx"] == rec["config"]["approx"] and r["dev"] == rec["best"]


def test_per_layer_gelu_from_the_command_line_round_trips_through_checkpoint_and_validate(
        kinds, tiny_bert, tiny_mrpc, dev, tmp_path, monkeypatch, capsys):
    """``--gelu-layers 1=test_relu`` as finetune.py parses it -> a checkpoint -> validate.py, which
    scores it with that placement and, with ``--gelu-layers 0=test_relu``, with another."""
    parser = script_parser(FINETUNING / "finetune.py")  # built now: it offers the throwaway kinds
    args = parse_for(parser, ["--model", str(tiny_bert), "--gelu-layers", "1=test_relu", "--pooler", "test_clip", "--pooler-bound", "0.2"], "test")
    approx = config_from_args(TrainConfig, args).approx
    placed = gelu("exact", {1: gelu("test_relu")})
    assert approx == EXACT.replace(gelu=placed, pooler=Spec.make("pooler", "test_clip", bound=0.2))
    torch.manual_seed(0)
    model = build_model(str(tiny_bert), approx)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 3.0)  # large logits, so a changed op moves the dev loss
    path = save_checkpoint(tmp_path / "g.pt", model, {"model": str(tiny_bert)})
    state_dict, meta = read_checkpoint(path)
    assert meta["approx"] == approx and list(state_dict) == list(BertMRPC(bert_from_config(tiny_config())).state_dict())

    def validate(*extra):
        code, out, err = run_script(monkeypatch, capsys, "validate.py", path, "--data-dir", tiny_mrpc, "--json", "--results-dir", tmp_path, *extra)
        assert code == 0, err
        return json.loads(out)

    r = validate()
    assert Approximations.from_json(r["approx"]) == approx and r["dev"] == reference_dev(tiny_bert, state_dict, approx, dev)
    moved = validate("--gelu-layers", "0=test_relu")  # only the GELU is overridden; the pooler stays the checkpoint's
    other = approx.replace(gelu=gelu("exact", {0: gelu("test_relu")}))
    assert Approximations.from_json(moved["approx"]) == other and moved["dev"] == reference_dev(tiny_bert, state_dict, other, dev)
    assert abs(moved["dev"]["loss"] - r["dev"]["loss"]) > 1e-4
    code, _, err = run_script(monkeypatch, capsys, "validate.py", path, "--data-dir", tiny_mrpc, "--gelu-layers", "2=test_relu",
                              "--results-dir", tmp_path)
    assert code == 2 and err.startswith("error: ") and "--gelu-layers names layer(s) [2], but the model has 2 layers" in err and len(err.strip().splitlines()) == 1
