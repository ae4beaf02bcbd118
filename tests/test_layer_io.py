"""A layer taken apart and put back: the blocks are the layer's own scores and values, and
putting back what the layer computed gives the model's own logits."""

import numpy as np
import torch
from conftest import tiny_config

from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.model.bert import BertMRPC, bert_from_config
from cgf_bert.model.layer_io import capture_blocks, forward_with_layer_output


def _case():
    torch.manual_seed(0)
    model = BertMRPC(bert_from_config(tiny_config())).set_softmax(softmax_spec("cgf", coeff=0.5)).eval()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(5, 25, (3, 9), generator=g), "attention_mask": torch.ones(3, 9, dtype=torch.long),
             "token_type_ids": torch.zeros(3, 9, dtype=torch.long)}
    batch["attention_mask"][1, 6:] = 0
    batch["attention_mask"][2, 4:] = 0
    return model, batch


def cgf_numpy(scores, c=0.5):
    x = scores - scores.mean(-1, keepdims=True)
    var = (x * x).mean(-1, keepdims=True)
    return np.exp(x - c * var) / scores.shape[-1]


def test_blocks_are_the_layers_scores_and_putting_them_back_changes_nothing():
    model, batch = _case()
    blocks, logits = capture_blocks(model, batch, layer=1)
    heads = tiny_config().num_attention_heads
    assert len(blocks) == 3 * heads
    assert [b[0].shape for b in blocks[::heads]] == [(9, 9), (6, 6), (4, 4)]  # real tokens only
    outs = [cgf_numpy(s) @ v for s, _, v in blocks]  # what the layer computes, in float64 numpy
    again = forward_with_layer_output(model, batch, 1, outs)
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch)["logits"], logits)


def test_a_changed_output_changes_the_logits():
    model, batch = _case()
    blocks, logits = capture_blocks(model, batch, layer=0)
    outs = [cgf_numpy(s) @ v + 1.0 for s, _, v in blocks]
    assert not torch.allclose(forward_with_layer_output(model, batch, 0, outs), logits, atol=1e-3)
