"""Adding a variant is one registry entry: a throwaway softmax and a throwaway KD term, registered
here and nowhere else, run through a tiny distillation and come out labelled in its run record,
its file name and the results table."""

import json

import pytest
import torch

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import SOFTMAXES, exact_softmax, register_softmax, softmax_spec
from cgf_bert.config import DistillConfig, TrainConfig
from cgf_bert.objective import LOSSES, LossTerm, kd_preset, register_loss
from cgf_bert.registry import Param
from cgf_bert.report.summary import render
from cgf_bert.store.names import Variant
from cgf_bert.store.records import load_records
from cgf_bert.train.recipes import distill


@pytest.fixture
def throwaway():
    @register_softmax("test_sharp", (Param("scale", float, 2.0, "score multiplier", min=0.0),),
                      label=lambda p: f"sharp x{p['scale']:g}", slug=lambda p: f"sharp{p['scale']:g}")
    def sharp(scores, valid, scale=2.0):
        """Exact softmax of scaled scores (a throwaway variant)."""
        return exact_softmax(scores * scale, valid)

    @register_loss("test_last_attn", needs=("attentions",))
    def last_attn(s, t, batch):
        """MSE between the last layer's attention maps (a throwaway term)."""
        return ((s["attentions"][-1] - t["attentions"][-1]) ** 2).mean()

    yield
    del SOFTMAXES["test_sharp"], LOSSES["test_last_attn"]


@pytest.mark.parametrize("cache", [True, False])
def test_throwaway_softmax_and_term_run_a_distillation(throwaway, tiny_bert, tiny_mrpc, tmp_path, cache):
    cfg = TrainConfig(model=str(tiny_bert), data_dir=str(tiny_mrpc), epochs=1, batch_size=8,
                      approx=Approximations(softmax=softmax_spec("test_sharp", scale=3)))
    dcfg = DistillConfig(terms=kd_preset(0.5, 2.0, 10.0) + (LossTerm.make("test_last_attn", 1.0),), cache_teacher=cache)
    rec = distill(cfg, dcfg, tmp_path / "teacher.pt", results_dir=tmp_path / "r")
    assert "-distill-sharp3-b10-test_last_attn1-pretrained-s42" in rec["name"]
    assert rec["config"]["approx"]["softmax"] == {"name": "test_sharp", "scale": 3.0}
    assert {"loss": "test_last_attn", "weight": 1.0} in rec["distill"]["terms"] and rec["distill"]["teacher_cached"] == cache
    assert set(rec["epochs"][0]["train"]) == {"loss", "ce", "kd", "hidden_mse", "test_last_attn"}
    assert rec["epochs"][0]["train"]["test_last_attn"] > 0
    (stored,) = [r for r in load_records(tmp_path / "r") if r["script"] == "distill"]
    label = "sharp x3 KD beta=10 + test_last_attn=1 (pretrained init)"
    assert Variant.of_record(stored).label() == label
    table = render("<!-- table:runs -->\n<!-- /table -->", load_records(tmp_path / "r"))
    assert rec["name"] in table
    checkpoint = json.loads(torch.load(rec["checkpoint"], weights_only=True)["meta"])
    assert checkpoint["approx"]["softmax"] == {"name": "test_sharp", "scale": 3.0}
