"""The exact path is stock transformers BERT; CGF is a different, working function."""

import pytest
import torch
from conftest import tiny_config
from transformers import BertForSequenceClassification, BertModel

from cgf_bert import CgfBertError
from cgf_bert.approx.softmax import EXACT_SOFTMAX as EXACT
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.bert import BertMRPC, bert_from_config, build_model


def batch(vocab=25, B=4, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B > 2:
        mask[1, 7:] = 0
        mask[2, 3:] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture
def pair():
    torch.manual_seed(0)
    ours = BertMRPC(bert_from_config(tiny_config())).eval()
    for layer in ours.bert.encoder.layer:  # sharpen attention so softmax variants differ visibly
        layer.attention.self.query.weight.data *= 20
        layer.attention.self.key.weight.data *= 20
    stock = BertForSequenceClassification(tiny_config().__class__(**tiny_config().to_dict(), num_labels=2, attn_implementation="eager")).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    return ours, stock


def test_exact_equals_stock_eager_bert(pair):
    ours, stock = pair
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b)["logits"], stock(**b).logits, rtol=0, atol=1e-5)


def test_exact_equals_stock_without_padding(pair):
    ours, stock = pair
    b = batch()
    b["attention_mask"][:] = 1  # transformers passes no mask at all in this case
    with torch.no_grad():
        torch.testing.assert_close(ours(**b)["logits"], stock(**b).logits, rtol=0, atol=1e-5)


def test_cgf_changes_logits_and_exact_restores_them(pair):
    ours, _ = pair
    b = batch()
    cgf_spec = softmax_spec("cgf", coeff=0.5)
    with torch.no_grad():
        exact = ours(**b)["logits"]
        cgf = ours.set_softmax(cgf_spec)(**b)["logits"]
        assert ours.softmax == cgf_spec
        assert not torch.allclose(exact, cgf, atol=1e-4)
        torch.testing.assert_close(ours.set_softmax(EXACT)(**b)["logits"], exact)


def test_per_layer_softmax(pair):
    """CGF in layer 0 only: layer 0 computes what an all-CGF model computes there, layer 1 the
    exact softmax (its rows sum to 1, CGF rows do not)."""
    ours, _ = pair
    b = batch()
    cgf = softmax_spec("cgf", coeff=0.5)
    mixed_spec = softmax_spec("exact", layers={0: cgf})
    with torch.no_grad():
        all_cgf = ours.set_softmax(cgf)(**b, needs=("attentions",))["attentions"]
        exact = ours.set_softmax(EXACT)(**b, needs=("attentions",))["attentions"]
        mixed = ours.set_softmax(mixed_spec)(**b, needs=("attentions",))["attentions"]
    assert [m.attention.self.softmax_spec.name for m in ours.bert.encoder.layer] == ["cgf", "exact"]
    torch.testing.assert_close(mixed[0], all_cgf[0])
    assert not torch.allclose(mixed[0], exact[0], atol=1e-3)
    valid_rows = b["attention_mask"].bool()[:, None, :].expand(-1, 4, -1)  # (B, H, Q): real query tokens
    torch.testing.assert_close(mixed[1].sum(-1)[valid_rows], torch.ones(int(valid_rows.sum())))
    assert not torch.allclose(mixed[0].sum(-1)[valid_rows], torch.ones(int(valid_rows.sum())), atol=1e-3)
    assert mixed_spec.label() == "exact, layer 0 cgf c=0.5" and mixed_spec.slug() == "exact-L0cgf0.5"
    with pytest.raises(CgfBertError, match="model has 2 layers"):
        ours.set_softmax(softmax_spec("cgf", layers={2: EXACT}))


def test_cgf_ignores_padding_tokens(pair):
    """Padding a sequence with more masked tokens does not change its CLS logits."""
    ours, _ = pair
    ours.set_softmax(softmax_spec("cgf", coeff=0.65))
    b = batch(B=1, T=6)
    longer = {k: torch.cat([v, torch.full((1, 4), 0 if k != "input_ids" else 7)], 1) for k, v in b.items()}
    with torch.no_grad():
        torch.testing.assert_close(ours(**b)["logits"], ours(**longer)["logits"], rtol=1e-5, atol=1e-5)


def test_hidden_states_and_gradients(pair):
    ours, _ = pair
    ours.train().set_softmax(softmax_spec("cgf"))
    out = ours(**batch(), needs=("hidden", "attentions"))
    assert len(out["hidden"]) == tiny_config().num_hidden_layers + 1  # embeddings + each layer
    assert len(out["attentions"]) == tiny_config().num_hidden_layers
    assert out["attentions"][0].shape == (4, 4, 11, 11)  # (B, H, T, T)
    assert (out["attentions"][0][2, :, :, 3:] == 0).all()  # masked keys exactly 0 (example 2 has 3 tokens)
    out["logits"].sum().backward()
    assert ours.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_build_model_from_local_folder(tiny_bert):
    """The folder's weights, as transformers itself reads them, each layer running the spec given;
    exact, the logits of stock ``BertForSequenceClassification`` loaded from the same folder."""
    cgf = softmax_spec("cgf", coeff=0.7)
    m = build_model(str(tiny_bert), cgf).eval()
    folder = BertModel.from_pretrained(tiny_bert).state_dict()
    ours = m.bert.state_dict()
    assert ours.keys() == folder.keys() and all(torch.equal(ours[k], folder[k]) for k in folder)
    assert [layer.attention.self.softmax_spec for layer in m.bert.encoder.layer] == [cgf, cgf]
    stock = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, attn_implementation="eager").eval()
    stock.classifier.load_state_dict(m.classifier.state_dict())
    b = batch()
    with torch.no_grad():
        cgf_logits = m(**b)["logits"]
        torch.testing.assert_close(m.set_softmax(EXACT)(**b)["logits"], stock(**b).logits, rtol=0, atol=1e-5)
        assert not torch.equal(cgf_logits, stock(**b).logits)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(CgfBertError, match="cannot load BERT"):
        build_model(str(tmp_path / "nope"))


def test_unknown_softmax_is_a_clear_error(pair):
    with pytest.raises(CgfBertError, match="unknown softmax"):
        pair[0].set_softmax(softmax_spec("relu"))
