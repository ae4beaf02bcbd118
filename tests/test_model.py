"""The exact path is stock transformers BERT; CGF is a different, working function."""

import pytest
import torch
from transformers import BertForSequenceClassification

from cgf_bert import CgfBertError
from cgf_bert.model import BertMRPC, bert_from_config, build_model, make_exact

from conftest import tiny_config


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
        torch.testing.assert_close(ours(**b), stock(**b).logits, rtol=0, atol=1e-5)


def test_exact_equals_stock_without_padding(pair):
    ours, stock = pair
    b = batch()
    b["attention_mask"][:] = 1  # transformers passes no mask at all in this case
    with torch.no_grad():
        torch.testing.assert_close(ours(**b), stock(**b).logits, rtol=0, atol=1e-5)


def test_cgf_changes_logits_and_make_exact_restores_them(pair):
    ours, _ = pair
    b = batch()
    with torch.no_grad():
        exact = ours(**b)
        cgf = ours.set_softmax("cgf", 0.5)(**b)
        assert ours.softmax == ("cgf", 0.5)
        assert not torch.allclose(exact, cgf, atol=1e-4)
        torch.testing.assert_close(make_exact(ours)(**b), exact)


def test_cgf_ignores_padding_tokens(pair):
    """Padding a sequence with more masked tokens does not change its CLS logits."""
    ours, _ = pair
    ours.set_softmax("cgf", 0.65)
    b = batch(B=1, T=6)
    longer = {k: torch.cat([v, torch.full((1, 4), 0 if k != "input_ids" else 7)], 1) for k, v in b.items()}
    with torch.no_grad():
        torch.testing.assert_close(ours(**b), ours(**longer), rtol=1e-5, atol=1e-5)


def test_hidden_states_and_gradients(pair):
    ours, _ = pair
    ours.train().set_softmax("cgf")
    logits, hidden = ours(**batch(), hidden_states=True)
    assert len(hidden) == tiny_config().num_hidden_layers + 1  # embeddings + each layer
    logits.sum().backward()
    assert ours.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_build_model_from_local_folder(tiny_bert):
    m = build_model(str(tiny_bert), "cgf", 0.7)
    assert m.softmax == ("cgf", 0.7)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(CgfBertError, match="cannot load BERT"):
        build_model(str(tmp_path / "nope"))


def test_unknown_softmax_is_a_clear_error(pair):
    with pytest.raises(CgfBertError, match="unknown softmax"):
        pair[0].set_softmax("relu")
