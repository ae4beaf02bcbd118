"""--precision bf16: the encoder's matmuls in bf16, CGF's scores and probabilities still float32,
finite gradients; refused on a CPU without native bf16; a different recipe from fp32 in records."""

import dataclasses

import pytest
import torch

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.config import TrainConfig
from cgf_bert.data.glue import load_mrpc
from cgf_bert.data.loader import load_tokenizer, make_loader, tokenize
from cgf_bert.model.attention import tapped
from cgf_bert.model.bert import build_model
from cgf_bert.report.tables import is_reference_recipe, precision_table
from cgf_bert.store.names import Variant
from cgf_bert.store.records import config_json, train_config
from cgf_bert.train import precision, recipes
from cgf_bert.store.checkpoint import read_checkpoint
from cgf_bert.train.engine import ce_step, evaluate
from cgf_bert.train.run import prepare_data
from cgf_bert.train.precision import autocast, check_precision, cpu_flags

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch(tiny_bert, tiny_mrpc):
    tok = load_tokenizer(str(tiny_bert))
    return next(iter(make_loader(tokenize(load_mrpc(tiny_mrpc), tok)["train"], tok, 8)))


def dtypes_seen(model, batch, prec: str) -> tuple[list, torch.Tensor]:
    """(scores dtype, probabilities dtype) of each layer, and the loss, of a forward under ``prec``."""
    seen = []
    taps = {i: (lambda m, s, mask, p, v, o: seen.append((s.dtype, p.dtype, v.dtype))) for i in range(2)}
    with tapped(model.bert, taps), autocast(CPU, prec):
        loss, _ = ce_step(model, batch)
    return seen, loss


def test_bf16_keeps_cgf_in_float32_and_gives_finite_gradients(tiny_bert, batch):
    torch.manual_seed(0)
    model = build_model(str(tiny_bert), softmax_spec("cgf", coeff=0.5)).train()
    seen, loss = dtypes_seen(model, batch, "bf16")
    assert seen == [(torch.float32, torch.float32, torch.bfloat16)] * 2  # V is the bf16 projection: autocast is on
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # the same model under fp32 and the exact softmax under bf16, for contrast
    assert dtypes_seen(model, batch, "fp32")[0] == [(torch.float32,) * 3] * 2
    model.set_softmax(softmax_spec("exact"))
    assert dtypes_seen(model, batch, "bf16")[0] == [(torch.bfloat16,) * 3] * 2


def test_bf16_refused_without_native_bf16(tmp_path):
    with pytest.raises(CgfBertError, match="--precision bf16 needs native bf16 arithmetic, which this CPU"):
        check_precision("bf16", CPU, flags={"avx2", "avx512f"})
    assert check_precision("bf16", CPU, flags={"avx2", "avx512_bf16"}) == "bf16"
    assert check_precision("bf16", CPU, flags={"amx_bf16"}) == "bf16"
    assert check_precision("fp32", CPU, flags=set()) == "fp32"
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "none")) == set()


def test_bf16_run_is_its_own_recipe(tiny_bert, tiny_mrpc, tmp_path, monkeypatch):
    # Refusal is tested above; here the run must go through on any CPU (PyTorch emulates bf16 where it is not native).
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    autocast_in_steps = []

    def step(model, batch):  # the recipe's CE step, noting the autocast it runs under
        autocast_in_steps.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return ce_step(model, batch)

    monkeypatch.setattr(recipes, "ce_step", step)
    spec = softmax_spec("cgf", coeff=0.5)
    cfg = TrainConfig(model=str(tiny_bert), data_dir=str(tiny_mrpc), epochs=1, batch_size=8, approx=Approximations(softmax=spec),
                      precision="bf16")
    rec = recipes.finetune(cfg, out=tmp_path / "m.pt", results_dir=tmp_path)
    assert rec["config"]["precision"] == "bf16" and "-finetune-cgf0.5-bf16-s42" in rec["name"]
    assert autocast_in_steps == [torch.bfloat16] * 6  # every training step (48 examples / 8), none in fp32
    # the weights stay float32, and the recorded dev figure is theirs in float32 (evaluation never autocasts)
    state_dict, _ = read_checkpoint(tmp_path / "m.pt")
    assert {v.dtype for k, v in state_dict.items() if v.is_floating_point()} == {torch.float32}
    model = build_model(str(tiny_bert), spec)
    model.load_state_dict(state_dict)
    tok, data = prepare_data(str(tiny_bert), str(tiny_mrpc), 128)
    assert rec["best"] == evaluate(model, make_loader(data["validation"], tok, 128), CPU)
    assert Variant.of_record(rec).label() == "cgf c=0.5 CE, bf16"
    reference = {"script": "finetune", "config": config_json(TrainConfig())}
    old = {**reference, "config": {k: v for k, v in reference["config"].items() if k != "precision"}}  # before the field
    assert train_config(old).precision == "fp32" and is_reference_recipe(old) and Variant.of_record(old).label() == "exact"
    bf16 = {**reference, "config": config_json(dataclasses.replace(TrainConfig(), precision="bf16"))}
    assert not is_reference_recipe(bf16) and Variant.of_record(bf16).label() == "exact, bf16"


def test_precision_table_pairs_each_bf16_row_with_its_fp32_runs():
    def rec(name, seed, acc, prec="fp32", **cfg):
        config = config_json(dataclasses.replace(TrainConfig(), seed=seed, precision=prec, **cfg))
        return {"name": name, "script": "finetune", "seed": seed, "config": config, "best": {"accuracy": acc}, "_path": f"results/{name}.json"}

    records = [
        rec("a", 42, 0.80), rec("b", 7, 0.82), rec("c", 123, 0.81),          # exact, fp32
        rec("d", 42, 0.81, "bf16"), rec("e", 7, 0.80, "bf16"),             # exact, bf16: two seeds in common
        rec("f", 7, 0.70, "bf16", epochs=3),                                # another recipe: left out
        rec("g", 7, 0.75, "bf16", approx=Approximations(softmax=softmax_spec("cgf", coeff=0.5))),  # bf16 only: nothing to pair, left out
    ]
    lines = precision_table(records).splitlines()
    assert len(lines) == 3  # header, rule, one row
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # seeds in the order of the bf16 runs' seeds; paired differences +1 and -2 points
    assert cells[:5] == ["exact", "bf16", "42 7", "80.50 ± 0.71", "81.00 ± 1.41"]
    assert cells[5] == "-0.50 ± 2.12" and cells[7] == "1 of 2"
