"""loss_ablation, variant_compare and layer_sensitivity end to end on the tiny model: they train what
is missing, reuse what is on record, and write their summary and plot. Each module's first run is
a process of its own; the runs that set up or repeat one call the scripts in this process."""

import json
import subprocess
import sys

from test_experiments import FINETUNING, in_process, module


def common(tiny_bert, tiny_mrpc, tmp_path):
    return ["--model", tiny_bert, "--data-dir", tiny_mrpc, "--epochs", 1, "--batch-size", 8, "--results-dir", tmp_path]


def summary(tmp_path, name):
    (path,) = tmp_path.glob(f"experiments/{name}-*.json")
    (png,) = tmp_path.glob(f"experiments/{name}-*.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    return json.loads(path.read_text())


def test_loss_ablation(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    args = [*common(tiny_bert, tiny_mrpc, tmp_path), "--teacher", tmp_path / "teacher.pt", "--seeds", 1,
            "--settings", "recipe", "attn_kl=1+cka_inter=0.5"]
    out = module("experiments.loss_ablation", *args)
    assert "+ attn_kl=1+cka_inter=0.5" in out and "paired Δ vs KD beta=10 (pretrained init)" in out
    runs = sorted(p.name for p in tmp_path.glob("*-distill-*.json"))
    assert len(runs) == 2 and any("-b10-attn_kl1-cka_inter0.5-" in r for r in runs)
    assert all("-distill-cgf0.5-b10" in r for r in runs)  # the default student is the table's CGF c=0.5
    s = summary(tmp_path, "loss_ablation")
    assert [r["setting"] for r in s["rows"]] == ["KD beta=10 (pretrained init)", "+ attn_kl=1+cka_inter=0.5"]
    # the teacher, fine-tuned here on seed 1 because none existed, is the exact run it pairs with
    assert s["rows"][1]["vs_base"]["seeds"] == [1] and s["rows"][0]["vs_exact"]["seeds"] == [1]
    in_process(monkeypatch, capsys, "experiments.loss_ablation", *args, "--no-train")
    assert len(list(tmp_path.glob("*-distill-*.json"))) == 2  # reused, nothing retrained
    # the experiment modules' refusal, end to end: exit 2, one line naming the valid terms
    bad = subprocess.run([sys.executable, "-m", "experiments.loss_ablation", "--settings", "attn_kk=1"], cwd=FINETUNING, capture_output=True, text=True)
    assert bad.returncode == 2 and "attn_kl" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error: unknown loss 'attn_kk'"), bad.stderr


def test_variant_compare(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    base = [*common(tiny_bert, tiny_mrpc, tmp_path), "--seeds", 1, "--methods", "ce"]
    args = [*base, "--variants", "quad2:shift=3"]
    in_process(monkeypatch, capsys, "finetune.py", *common(tiny_bert, tiny_mrpc, tmp_path), "--seed", 1)
    out = module("experiments.variant_compare", *args)
    s = summary(tmp_path, "variant_compare")
    labels = [r["setting"] for r in s["rows"]]
    assert labels == ["2quad c=3 CE"]
    assert s["rows"][0]["vs_exact"]["seeds"] == [1] and "2quad c=3 CE" in out
    assert s["rows"][0]["input_division"] is True
    row = next(line for line in out.splitlines() if line.startswith("| 2quad c=3 CE |"))
    assert "divides by an input-dependent sum" in out and row.endswith("| yes |")  # its FHE cost, beside its score
    # a variant with no record has no row, and the others keep their own properties
    for f in tmp_path.glob("experiments/variant_compare-*"):
        f.unlink()
    in_process(monkeypatch, capsys, "experiments.variant_compare", *base, "--variants", "relu_n", "quad2:shift=3", "--no-train")
    s = summary(tmp_path, "variant_compare")
    assert [(r["setting"], r["input_division"]) for r in s["rows"]] == [("2quad c=3 CE", True)]


def test_layer_sensitivity(tiny_bert, tiny_mrpc, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "exact.pt"
    in_process(monkeypatch, capsys, "finetune.py", *common(tiny_bert, tiny_mrpc, tmp_path), "--seed", 1, "-o", ckpt)
    out = module("experiments.layer_sensitivity", *common(tiny_bert, tiny_mrpc, tmp_path), "--checkpoint", ckpt, "--train-seeds", 1)
    s = summary(tmp_path, "layer_sensitivity")
    assert [r["label"] for r in s["swap"]] == ["exact", "exact, layer 0 cgf c=0.5", "exact, layer 1 cgf c=0.5", "cgf c=0.5"]
    assert set(s["trained"]) == {"0", "1"} and "-finetune-exact-L1cgf0.5-s1" in s["trained"]["1"]["records"][0]
    assert s["references"]["CE fine-tune, all exact"] is not None  # the exact run above, same seed
    # the table printed is the one a summary marker renders from the record, with each layer's numbers
    from cgf_bert.report.summary import render
    from cgf_bert.store.records import load_records
    stem = next(tmp_path.glob("experiments/layer_sensitivity-*.json")).stem
    table = render(f"<!-- table:experiment:{stem} -->\n<!-- /table -->", load_records(tmp_path))
    assert table.splitlines()[3] in out and "trained with CE, seeds 1" in table
    ref, layer1 = s["references"]["CE fine-tune, all exact"], s["trained"]["1"]["accuracy"][0]
    swap1 = s["swap"][2]
    row = next(line for line in table.splitlines() if line.startswith("| layer 1 |"))
    assert row == (f"| layer 1 | {swap1['accuracy'] * 100:.2f} ({(swap1['accuracy'] - s['swap'][0]['accuracy']) * 100:+.2f}) "
                   f"| {swap1['agreement'] * 100:.1f} % | {layer1 * 100:.2f} ({(layer1 - ref) * 100:+.2f}) |")
