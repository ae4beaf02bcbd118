"""The attention analysis against plain references written here, and its script end to end."""

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script

from cgf_bert.analysis.ranges import (
    PERCENTILES,
    analyse,
    attention_kl,
    cgf_row_sums,
    exp_argument,
    floored,
    outside,
    pct_key,
    strict_json,
    summarise,
)
from cgf_bert.approx.softmax import cgf_softmax, softmax_spec
from cgf_bert.data.loader import make_loader
from cgf_bert.model.attention import self_attentions
from cgf_bert.model.bert import build_model
from cgf_bert.store.checkpoint import save_checkpoint
from cgf_bert.train.run import prepare_data

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"
CGF = softmax_spec("cgf", coeff=0.5)
# layer 0 runs CGF with its own c = 0.5; layer 1 runs exact, so it shows CGF's argument at the c given to analyse
MIXED = softmax_spec("cgf", coeff=0.5, layers={1: softmax_spec("exact")})
GIVEN_C = 0.7


def random_case(seed=0, B=3, H=2, Q=5, K=7):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, Q, K, generator=g) * 3
    lengths = torch.tensor([K, 4, 1])[:B]
    valid = (torch.arange(K)[None, :] < lengths[:, None])[:, None, None, :].expand(B, 1, Q, K)  # (B, 1, Q, K)
    return scores, valid


# ---------------------------------------------------------------- per-batch measurements


def test_exp_argument_and_row_sums_match_the_formula_row_by_row():
    scores, valid = random_case()
    arg, sums = exp_argument(scores, valid, 0.65), cgf_row_sums(exp_argument(scores, valid, 0.65), valid)
    for b, h, q in np.ndindex(*scores.shape[:3]):
        keys = [k for k in range(scores.shape[3]) if valid[b, 0, q, k]]
        s = [scores[b, h, q, k].item() for k in keys]
        mu = sum(s) / len(s)
        var = sum((x - mu) ** 2 for x in s) / len(s)
        want = [x - mu - 0.65 * var for x in s]
        assert arg[b, h, q, keys].tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert sums[b, h, q].item() == pytest.approx(sum(math.exp(a) for a in want) / len(s), rel=1e-5)
    # for a CGF layer the row sums are the softmax's own
    torch.testing.assert_close(sums.float(), cgf_softmax(scores, valid, 0.65).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coeff", [0.5, 0.65])
def test_row_sums_are_exactly_one_for_constant_scores(coeff):
    scores, valid = random_case()
    # a different constant per row, in halves so that float32 sums and means of it are exact
    const = (torch.randint(-40, 40, (3, 2, 5, 1)) / 2).expand_as(scores)
    for mask in (valid, None):
        arg = exp_argument(const, mask, coeff)
        assert torch.equal(cgf_row_sums(arg, mask), torch.ones(3, 2, 5, dtype=torch.float64))


def reference_kl(p_rows, q_rows, keys):
    """sum_j p_j log(p_j / q'_j) over the valid keys, q' the student's row renormalised."""
    out = []
    for p, q in zip(p_rows, q_rows):
        p, q = [p[k] for k in keys], [q[k] for k in keys]
        total = sum(q)
        out.append(sum(pj * math.log(pj / (qj / total)) for pj, qj in zip(p, q) if pj > 0))
    return out


def test_kl_renormalises_the_student_and_ignores_masked_keys():
    scores, valid = random_case(1)
    teacher = torch.softmax(scores.masked_fill(~valid, -1e9), -1)
    student = cgf_softmax(scores * 0.7 + 0.3, valid, 0.5)  # rows that do not sum to 1
    kl = attention_kl(teacher, student, valid)
    for b, h in np.ndindex(*scores.shape[:2]):
        keys = [k for k in range(scores.shape[3]) if valid[b, 0, 0, k]]
        want = reference_kl(teacher[b, h].double().tolist(), student[b, h].double().tolist(), keys)
        assert kl[b, h].tolist() == pytest.approx(want, rel=1e-6, abs=1e-9)
    # a student proportional to the teacher: 0, up to the float32 teacher rows summing to 1 within ~1e-7
    assert attention_kl(teacher, teacher * 3.0, valid).abs().max() < 1e-6


def test_kl_floors_a_student_zero_and_counts_it():
    p = torch.tensor([[[[0.5, 0.5, 0.0]]]])
    q = torch.tensor([[[[1.0, 0.0, 0.0]]]])  # float32 underflow: 0 where the teacher has mass
    kl = attention_kl(p, q, None)
    assert math.isfinite(kl.item()) and kl.item() > 30
    assert floored(p, q, None) == 1


# ---------------------------------------------------------------- exact summaries


@pytest.mark.parametrize("n", [1, 2, 7, 1001])
def test_summaries_are_numpy_percentiles_and_counts(n):
    v = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 10
    s = summarise(v.copy())  # summarise reorders its argument
    w = v.astype(np.float64)
    assert s["count"] == n and s["min"] == w.min() and s["max"] == w.max()
    assert s["mean"] == pytest.approx(w.mean()) and s["std"] == pytest.approx(w.std())
    for q in PERCENTILES:
        assert s[pct_key(q)] == pytest.approx(np.percentile(w, q), rel=1e-12, abs=1e-12)
    o = outside(v, -3.0, 4.0)
    assert (o["below"], o["above"]) == (int((v < -3).sum()), int((v > 4).sum()))
    assert o["share"] == pytest.approx(((v < -3) | (v > 4)).mean())


def test_strict_json_writes_nulls_with_reasons():
    obj, notes = strict_json({"a": [1.0, float("inf")], "layers": [{"kl": {"mean": float("nan")}, "row_sum": {"max": float("inf")}}]})
    assert obj == {"a": [1.0, None], "layers": [{"kl": {"mean": None}, "row_sum": {"max": None}}]}
    json.dumps(obj, allow_nan=False)
    assert [n["at"] for n in notes] == ["a[1]", "layers[0].kl.mean", "layers[0].row_sum.max"]
    assert "probability 0" in notes[1]["reason"] and "overflows" in notes[2]["reason"]


# ---------------------------------------------------------------- a tiny BERT, against loops


@pytest.fixture(scope="module")
def data(tiny_bert, tiny_mrpc):
    return prepare_data(str(tiny_bert), str(tiny_mrpc), 64)


def sharpen(model, scale=6.0, noise=0.0, seed=0):
    """Scale the query and key projections (random init gives near-constant scores), plus noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in self_attentions(model.bert):
            m.query.weight.mul_(scale).add_(torch.randn(m.query.weight.shape, generator=g) * noise)
            m.key.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def models(tiny_bert):
    torch.manual_seed(0)
    teacher = sharpen(build_model(str(tiny_bert)))
    student = sharpen(build_model(str(tiny_bert), MIXED), noise=0.3)  # same BERT weights, then a different query
    return teacher.eval(), student.eval()


def capture(model, seen):
    """Forward hooks: per layer, the query and key projections, GELU input, both LayerNorm
    inputs and the attention output (the input of attention.output.dense), of example 0."""
    handles = []
    for i, layer in enumerate(model.bert.encoder.layer):
        for name, mod, use_input in (("q", layer.attention.self.query, False), ("k", layer.attention.self.key, False),
                                     ("gelu", layer.intermediate.dense, False), ("ln1", layer.attention.output.LayerNorm, True),
                                     ("ln2", layer.output.LayerNorm, True), ("ctx", layer.attention.output.dense, True)):
            def keep(m, inp, out, key=(name, i), use_input=use_input):
                seen[key] = (inp[0] if use_input else out)[0].detach().double().numpy()  # (T, features)
            handles.append(mod.register_forward_hook(keep))
    return handles


@torch.no_grad()
def reference(student, teacher, dataset, tokenizer, coeffs):
    """Every figure from loops over examples (one at a time: no padding), layers, heads and rows."""
    cfg = student.bert.config
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    ref = defaultdict(lambda: defaultdict(list))  # ref[measure][(layer, head) or layer] -> values
    seen = {}
    handles = capture(student, seen)
    try:
        for batch in make_loader(dataset, tokenizer, 1):
            s_att = student(**batch, needs=("attentions",))["attentions"]
            t_att = teacher(**batch, needs=("attentions",))["attentions"]
            T = batch["input_ids"].shape[1]
            for i, c in enumerate(coeffs):
                q, k = seen[("q", i)].reshape(T, H, d), seen[("k", i)].reshape(T, H, d)
                for h in range(H):
                    for row in q[:, h] @ k[:, h].T / math.sqrt(d):  # (T,) scores of one query
                        arg = row - row.mean() - c * ((row - row.mean()) ** 2).mean()
                        ref["arg"][i, h] += arg.tolist()
                        ref["row_sum"][i, h].append(np.exp(arg).sum() / T)
                    ref["kl"][i, h] += reference_kl(t_att[i][0, h].double().tolist(), s_att[i][0, h].double().tolist(), range(T))
                ref["gelu"][i] += seen[("gelu", i)].ravel().tolist()
                ref["ln1"][i] += seen[("ln1", i)].var(-1).tolist()
                ref["ln2"][i] += seen[("ln2", i)].var(-1).tolist()
                ref["ctx"][i] += seen[("ctx", i)].ravel().tolist()
                ref["norm"][i] += np.linalg.norm(seen[("ctx", i)], axis=-1).tolist()
    finally:
        for h in handles:
            h.remove()
    return ref


def assert_distribution(got, values, rel=1e-4, abs=1e-4):
    v = np.asarray(values, dtype=np.float64)
    assert got["count"] == len(v)
    want = {"min": v.min(), "max": v.max(), "mean": v.mean(), **{pct_key(q): np.percentile(v, q) for q in PERCENTILES}}
    assert {k: got[k] for k in want} == pytest.approx(want, rel=rel, abs=abs)


def test_analyse_matches_loops_over_examples_and_heads(models, data):
    teacher, student = models
    tokenizer, splits = data
    loader = make_loader(splits["validation"], tokenizer, 8)  # padded batches
    got = analyse(student, loader, torch.device("cpu"), coeff=GIVEN_C, intervals=[(-1.0, 1.0), (-32, 32)], teacher=teacher)
    coeffs = [0.5, GIVEN_C]  # layer 0: its own c; layer 1 (exact): the given one
    ref = reference(student, teacher, splits["validation"], tokenizer, coeffs)
    assert [layer["coeff"] for layer in got["layers"]] == coeffs
    assert got["examples"] == len(splits["validation"]) and got["tokens"] == sum(splits["validation"]["length"])
    assert np.std(ref["arg"][0, 0]) > 0.5  # the sharpened scores spread: the comparison below is not of constants
    for i, layer in enumerate(got["layers"]):
        heads = range(len(layer["exp_arg_heads"]))
        for h in heads:
            assert_distribution(layer["exp_arg_heads"][h], ref["arg"][i, h])
            assert_distribution(layer["row_sum_heads"][h], ref["row_sum"][i, h])
            assert_distribution(layer["kl_heads"][h], ref["kl"][i, h], abs=1e-6)
            v = np.asarray(ref["arg"][i, h])
            n_out = int(((v < -1) | (v > 1)).sum())
            assert abs(layer["exp_arg_heads"][h]["outside"][0]["share"] * len(v) - n_out) <= 1  # float32 vs float64 at the edge
        assert_distribution(layer["exp_arg"], sum((ref["arg"][i, h] for h in heads), []))
        assert layer["exp_arg"]["outside"][1]["share"] == 0.0
        assert_distribution(layer["gelu_input"], ref["gelu"][i])
        assert_distribution(layer["ln_var_attention"], ref["ln1"][i])
        assert_distribution(layer["ln_var_output"], ref["ln2"][i])
        assert_distribution(layer["attention_output"]["norm"], ref["norm"][i])
        ctx = layer["attention_output"]
        assert (ctx["min"], ctx["max"]) == pytest.approx((min(ref["ctx"][i]), max(ref["ctx"][i])), rel=1e-5)
        assert layer["kl"]["mean"] == pytest.approx(np.mean(sum((ref["kl"][i, h] for h in heads), [])), rel=1e-4)
    assert got["layers"][0]["kl"]["mean"] > 1e-3  # CGF against exact: a real difference was measured


def flat(x, at=""):
    """(path, number) for every number in a result."""
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in flat(v, f"{at}.{k}")]
    if isinstance(x, list):
        return [p for i, v in enumerate(x) for p in flat(v, f"{at}[{i}]")]
    return [(at, x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def test_padding_does_not_change_the_figures(models, data):
    teacher, student = models
    tokenizer, splits = data
    alone = analyse(student, make_loader(splits["validation"], tokenizer, 1), teacher=teacher)  # no padding at all
    extra = 5  # pad every batch of 8 by 5 more columns of [PAD]
    padded = [{k: torch.cat([v, v.new_zeros(len(v), extra)], 1) if v.dim() == 2 else v for k, v in b.items()}
              for b in make_loader(splits["validation"], tokenizer, 8)]
    assert sum(int((b["attention_mask"] == 0).sum()) for b in padded) > extra * len(padded)
    both = analyse(student, padded, teacher=teacher)
    a, b = flat(alone), flat(both)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6), path


def test_constant_scores_give_row_sums_of_exactly_one(tiny_bert, data):
    """A zero query projection makes every score 0: arguments exactly 0, row sums exactly 1."""
    tokenizer, splits = data
    model = build_model(str(tiny_bert), CGF)
    with torch.no_grad():
        for m in self_attentions(model.bert):
            m.query.weight.zero_(), m.query.bias.zero_()
    got = analyse(model, make_loader(splits["validation"], tokenizer, 8))
    for layer in got["layers"]:
        assert layer["row_sum"]["min"] == layer["row_sum"]["max"] == 1.0 and layer["row_sum"]["std"] == 0.0
        assert layer["exp_arg"]["min"] == layer["exp_arg"]["max"] == 0.0


# ---------------------------------------------------------------- the module, end to end


@pytest.fixture(scope="module")
def checkpoints(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("analysis-ckpts")
    meta = {"model": str(tiny_bert)}
    return (save_checkpoint(folder / "teacher.pt", build_model(str(tiny_bert)), meta),
            save_checkpoint(folder / "cgf.pt", build_model(str(tiny_bert), CGF), meta))


def strict_load(path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_module_end_to_end(checkpoints, tiny_mrpc, tmp_path):
    teacher, student = checkpoints
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "experiments.attention_analysis", str(student), "--teacher", str(teacher), "--data-dir", str(tiny_mrpc),
           "--examples", "12", "--interval", "-0.01", "0.01", "--interval", "-32", "32", "--map-example", "3", "--out-dir", str(tmp_path)]
    p = subprocess.run(cmd, cwd=FINETUNING, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("row sum mean±std") == 2 and "out[-0.01,0.01]" in p.stdout
    (path,) = tmp_path.glob("attention_analysis-*.json")
    rec = strict_load(path)
    assert rec["command"].startswith("-m experiments.attention_analysis") and rec["code_version"] and rec["device"].startswith("cpu")
    assert rec["data"]["examples"] == 12 and rec["intervals"] == [[-0.01, 0.01], [-32, 32]]
    (entry,) = rec["checkpoints"]
    assert entry["checkpoint"] == str(student) and entry["checkpoint_softmax"] == CGF.to_json() and entry["scored_as"] is None
    layers = entry["analysis"]["layers"]
    assert len(layers) == 2 and len(layers[0]["kl_heads"]) == 4 and layers[0]["kl"]["mean"] > -1e-6
    assert rec["teacher"]["analysis"]["layers"][0]["exp_arg"]["count"] == layers[0]["exp_arg"]["count"]
    figs = entry["figures"]
    for key in ("ranges", "kl_heatmap", "attention_maps"):
        assert Path(figs[key]).read_bytes()[:4] == b"\x89PNG"
    assert figs["map"]["layer"] == 1 and figs["map"]["example_idx"] == 3


def run_in_process(monkeypatch, capsys, *argv):
    """The module's main under run_main, in this process: (exit code, stdout, stderr)."""
    return run_script(monkeypatch, capsys, "experiments.attention_analysis", *argv)


def test_as_softmax_scores_the_teacher_as_the_cgf_student(checkpoints, tiny_mrpc, tmp_path, monkeypatch, capsys):
    """The two checkpoints share BERT's weights: the teacher scored as CGF is the CGF student."""
    teacher, student = checkpoints
    common = ["--teacher", teacher, "--data-dir", tiny_mrpc, "--examples", 12]
    runs = {}
    for name, args in (("student", [student]), ("relabelled", [teacher, "--as-softmax", "cgf:coeff=0.5"])):
        code, out, err = run_in_process(monkeypatch, capsys, *args, *common, "--out-dir", tmp_path / name)
        assert code == 0, err
        (path,) = (tmp_path / name).glob("*.json")
        runs[name] = strict_load(path)["checkpoints"][0]
    assert runs["relabelled"]["scored_as"] == CGF.to_json() and runs["relabelled"]["checkpoint_softmax"] == {"name": "exact"}
    assert runs["relabelled"]["analysis"]["layers"] == runs["student"]["analysis"]["layers"]


@pytest.mark.parametrize("case, message", [
    ("missing", "checkpoint not found"),
    ("other-base", "attention maps compare only on the same base model"),
    ("bad-spec", "unknown softmax"),
])
def test_module_errors_are_one_readable_line(case, message, checkpoints, tiny_mrpc, tmp_path, monkeypatch, capsys):
    teacher, student = checkpoints
    ckpt = {"missing": tmp_path / "nope.pt", "other-base": tmp_path / "other.pt", "bad-spec": student}[case]
    if case == "other-base":
        meta = {"format": "cgf-bert/2", "model": "minilm-l6", "softmax": {"name": "exact"}}  # another base model
        torch.save({"state_dict": {}, "meta": json.dumps(meta)}, ckpt)
    extra = ["--as-softmax", "nosuch"] if case == "bad-spec" else []
    code, _, err = run_in_process(monkeypatch, capsys, ckpt, "--teacher", teacher, "--data-dir", tiny_mrpc, "--out-dir", tmp_path, *extra)
    assert code == 2 and message in err.lower(), err
    assert not list(tmp_path.glob("*.json"))


def test_the_range_plot_names_each_series_by_the_model_it_is(tmp_path, monkeypatch):
    from cgf_bert.analysis import range_plots

    legends = []
    monkeypatch.setattr(range_plots, "save", lambda fig, path: legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    layer = {"layer": 0, "coeff": 0.5, "exp_arg": {"min": -3.0, "max": 2.0, "p1": -2.0, "p99": 1.0}}
    result = {"label": "exact", "layers": [layer]}
    range_plots.plot_ranges(result, result, (-8.0, 8.0), tmp_path / "r.png", "t", names=("teacher t.pt", "t.pt (the teacher itself)"))
    texts = legends[0]
    assert texts[0].startswith("teacher t.pt:") and texts[1].startswith("t.pt (the teacher itself):") and texts[0] != texts[1]


def test_norm_shares_equal_a_loop_over_every_query_and_key(tiny_bert):
    """Kobayashi et al.'s ||alpha_ij f(x_j)||, with f(x_j) = the head's value vector times its slice of W_O, by loops."""
    from cgf_bert.analysis.norms import KINDS, norm_shares
    from cgf_bert.approx.softmax import softmax_spec
    from cgf_bert.model.bert import build_model

    torch.manual_seed(0)
    model = build_model(str(tiny_bert), softmax_spec("cgf")).eval().double()
    ids = torch.tensor([[2, 7, 8, 3, 9, 3, 0], [2, 10, 11, 12, 3, 13, 3]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    got = norm_shares(model, [batch], torch.device("cpu"), cls_id=2, sep_id=3)
    out = model(**batch, needs=("attentions", "values"))
    heads, rows = model.bert.config.num_attention_heads, int(mask.sum())
    want = {"weight": torch.zeros(2, heads, 3, dtype=torch.float64), "norm": torch.zeros(2, heads, 3, dtype=torch.float64)}
    kind_of = lambda t: 0 if t == 2 else 1 if t == 3 else 2  # noqa: E731
    for layer in range(2):
        wo = model.bert.encoder.layer[layer].attention.output.dense.weight.double()
        for b in range(2):
            for h in range(heads):
                dh = out["values"][layer].shape[-1]
                for i in range(7):
                    if not mask[b, i]:
                        continue
                    w, n = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
                    for j in range(7):
                        if not mask[b, j]:
                            continue
                        a = out["attentions"][layer][b, h, i, j]
                        f = wo[:, h * dh:(h + 1) * dh] @ out["values"][layer][b, h, j]
                        w[kind_of(int(ids[b, j]))] += a
                        n[kind_of(int(ids[b, j]))] += (a * f).norm()
                    want["weight"][layer, h] += w / w.sum() / rows
                    want["norm"][layer, h] += n / n.sum() / rows
    for what in want:
        torch.testing.assert_close(got[what], want[what], rtol=1e-9, atol=1e-12)
    assert len(KINDS) == 3 and torch.allclose(got["norm"].sum(-1), torch.ones(2, heads, dtype=torch.float64))


def test_attention_norms_runs_end_to_end_and_records_both_models(tiny_bert, tiny_mrpc, tmp_path, monkeypatch):
    import json
    import sys

    from cgf_bert.approx.approximations import Approximations
    from cgf_bert.approx.softmax import softmax_spec
    from cgf_bert.model.bert import build_model
    from cgf_bert.store.checkpoint import save_checkpoint
    from experiments import attention_norms

    torch.manual_seed(0)
    paths = [save_checkpoint(tmp_path / f"{n}.pt", build_model(str(tiny_bert), a), {"model": str(tiny_bert), "seed": 0})
             for n, a in (("teacher", Approximations()), ("student", Approximations(softmax=softmax_spec("cgf"))))]
    monkeypatch.setattr(sys, "argv", ["attention_norms.py", str(paths[1]), "--teacher", str(paths[0]),
                                      "--data-dir", str(tiny_mrpc), "--results-dir", str(tmp_path)])
    attention_norms.main()
    (record,) = tmp_path.glob("analysis/attention_norms-*.json")
    res = json.loads(record.read_text())["results"]
    assert set(res) == {"teacher", "1: cgf c=0.5"}
    for r in res.values():
        norm = torch.tensor(r["norm"], dtype=torch.float64)
        assert norm.shape == (2, 4, 3) and torch.allclose(norm.sum(-1), torch.ones(2, 4, dtype=torch.float64))
