"""The FHE-friendly attention forms (2Quad, relu/n, row-normalised relu^p) against formulas
written row by row here: masked keys exactly 0, declared properties, and a short training run."""

import pytest
import torch
from test_softmax import random_case

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import get_softmax, softmax_spec


def reference(scores, valid, row):
    """Apply ``row(list of valid scores) -> list of probs`` row by row; masked keys 0."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    flat_s, flat_o = scores.double().reshape(-1, scores.shape[-1]), out.view(-1, scores.shape[-1])
    flat_v = valid.expand_as(scores).reshape(-1, scores.shape[-1])
    for r in range(flat_s.shape[0]):
        keys = [j for j in range(flat_s.shape[1]) if flat_v[r, j]]
        for j, p in zip(keys, row([flat_s[r, j].item() for j in keys])):
            flat_o[r, j] = p
    return out


def normalised(qs):
    total = sum(qs)
    return [q / total if total else 0.0 for q in qs]


ROWS = {
    ("quad2", 5.0): lambda v: normalised([(x + 5.0) ** 2 for x in v]),
    ("quad2", 0.0): lambda v: normalised([x**2 for x in v]),
    ("relu_n", None): lambda v: [max(x, 0.0) / len(v) for x in v],
    ("relu_pow", 2): lambda v: normalised([max(x, 0.0) ** 2 for x in v]),
    ("relu_pow", 3): lambda v: normalised([max(x, 0.0) ** 3 for x in v]),
}
PARAM = {"quad2": "shift", "relu_pow": "power"}


@pytest.mark.parametrize("name,value", list(ROWS))
def test_matches_row_formula_and_masks_exactly(name, value):
    spec = softmax_spec(name, **({PARAM[name]: value} if value is not None else {}))
    scores, valid = random_case(seed=3)
    scores = scores.masked_fill(~valid, 1e4)  # a huge masked score must still give exactly 0
    got = spec(scores, valid)
    assert (got[~valid.expand_as(got)] == 0).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference(scores, valid, ROWS[name, value]), rtol=1e-5, atol=1e-6)
    all_valid = torch.ones_like(valid[:, :, :1])
    torch.testing.assert_close(spec(scores, None), spec(scores, all_valid))


def test_declared_properties():
    assert not get_softmax("relu_n").input_division  # only the public length divides
    assert get_softmax("quad2").input_division and get_softmax("relu_pow").input_division
    assert softmax_spec("quad2").label() == "2quad c=5" and softmax_spec("relu_pow", power=3).slug() == "relupow3"


@pytest.mark.parametrize("name", ["quad2", "relu_n", "relu_pow"])
def test_variant_trains_a_tiny_bert(name, tiny_bert, tiny_mrpc, tmp_path):
    """A short run moves the encoder's weights, and the record's dev figure is the saved
    checkpoint's, evaluated afresh in a model built here with the variant."""
    from transformers import BertModel

    from cgf_bert.config import TrainConfig
    from cgf_bert.data.loader import make_loader
    from cgf_bert.model.bert import build_model
    from cgf_bert.store.checkpoint import read_checkpoint
    from cgf_bert.train.engine import evaluate
    from cgf_bert.train.recipes import finetune
    from cgf_bert.train.run import prepare_data

    spec = softmax_spec(name)
    rec = finetune(TrainConfig(model=str(tiny_bert), data_dir=str(tiny_mrpc), epochs=1, batch_size=8, lr=1e-3,
                               approx=Approximations(softmax=spec)), out=tmp_path / "m.pt", results_dir=tmp_path)
    assert rec["config"]["approx"]["softmax"] == spec.to_json()
    state_dict, meta = read_checkpoint(tmp_path / "m.pt")
    assert meta["approx"].softmax == spec
    key = "encoder.layer.0.attention.self.query.weight"  # upstream of the variant: moved only through its gradient
    assert (state_dict[f"bert.{key}"] - BertModel.from_pretrained(tiny_bert).state_dict()[key]).abs().max() > 1e-4
    model = build_model(str(tiny_bert), spec)
    model.load_state_dict(state_dict)
    tok, data = prepare_data(str(tiny_bert), str(tiny_mrpc), 128)
    assert rec["best"] == evaluate(model, make_loader(data["validation"], tok, 128), torch.device("cpu"))
