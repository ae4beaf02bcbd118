"""Figures redrawn from their records (``experiments.replot``): each kind from a small record shaped
like the real one, every text inside the canvas; a record without the data its figure needs refused."""

import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text

from cgf_bert import CgfBertError
from cgf_bert.analysis.norms import KINDS
from experiments import replot as R

LONG = ("cgf_poly c=0.5 d=8 [-256,16] k=8, GELU gelu_poly d=128 [-48,48], LayerNorm ln_poly d=64 [0.02,10000] newton=9, "
        "layer 0 ln_poly d=128 [0.1,1e+06] newton=11, pooler tanh_poly d=32 [-6,6]")  # a real label, 170 characters


@pytest.fixture
def outside(monkeypatch):
    """The texts of every figure saved in the test that Agg draws beyond the figure's canvas (a
    saved PNG's tight box would include them, so only the drawing shows them)."""
    bad, save, draw = [], Figure.savefig, Text.draw

    def spy_save(fig, *args, **kw):
        drawn = []

        def spy_draw(text, renderer):
            draw(text, renderer)
            if text.get_visible() and text.get_text().strip():
                drawn.append((text.get_text(), text.get_window_extent(renderer)))

        monkeypatch.setattr(Text, "draw", spy_draw)
        try:
            fig.canvas.draw()
        finally:
            monkeypatch.setattr(Text, "draw", draw)
        box = fig.bbox
        bad.extend(t for t, e in drawn if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1)
        assert drawn, "the spy saw no text drawn"
        return save(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", spy_save)
    return bad


def stage(**counts):
    return {k: dict(counts) for k in ("Q K V", "softmax", "feed-forward", "pooler + classifier")}


def encrypted_inference(tmp_path, layers=2, examples=3):
    def result(label, err):
        ex = {"per_layer": [{"layer": i, "max_abs_error": err * (i + 1)} for i in range(layers)], "max_abs_error": err}
        return {"label": label, "layers": layers, "examples": [dict(ex) for _ in range(examples)],
                "per_example_mean_by_stage": stage(bootstraps=2, seconds=120.0, bootstrap_seconds=300.0, mul=40, square=9)}

    return {"backend": "bootstrap" if layers == 1 else "sim", "plot": str(tmp_path / "ei.png"),
            "results": [result(LONG, 1e-5), result(LONG.replace("newton=11", "newton=12"), 3e-4)]}


def hessian(tmp_path):
    def res(name, top):
        return {"name": name, "top_eigenvalues": [top], "trace": 10 * top, "trace_stderr": top,
                "density": [{"nodes": [-5.0, 0.0, 2.0, top], "weights": [0.1, 0.8, 0.09, 0.01]}]}

    return {"results": [res("teacher", 300.0), res("fully polynomial KD", 800.0)], "plot": str(tmp_path / "h.png")}


def attention_norms(tmp_path):
    rng = np.random.default_rng(0)
    share = lambda: rng.dirichlet([1, 1, 6], size=(3, 4)).tolist()  # noqa: E731  (layers, heads, kinds)
    models = {"teacher": "exact", "1: cgf_poly c=0.5 d=8 [-256,16] k=8": "cgf_poly c=0.5 d=8 [-256,16] k=8", f"2: {LONG}": LONG}
    return {"kinds": list(KINDS), "plot": str(tmp_path / "an.png"),
            "results": {k: {"label": label, "weight": share(), "norm": share()} for k, label in models.items()}}


def polynomial_student(tmp_path):
    approx = lambda ln: {"softmax": {"name": "cgf_poly"}, "gelu": {"name": "gelu_poly"}, "layernorm": {"name": ln},  # noqa: E731
                         "pooler": {"name": "tanh_poly"}}
    rows = [{"approx": approx("exact"), "label": "cgf_poly c=0.5 d=8 [-256,16] k=8", "accuracy": 0.806, "depth": None, "layer_depth": None},
            {"gelu": {"name": "gelu_poly"}, "label": "gelu_poly d=64 [-18,25]", "accuracy": 0.806, "depth": 7, "layer_depth": None},
            {"layernorm": {"name": "ln_affine"}, "label": "ln_affine v=(1,1), layer 0 ln_affine v=(0.3,2.9)", "accuracy": 0.316, "depth": 2,
             "layer_depth": None},
            {"approx": approx("ln_poly"), "label": LONG, "accuracy": 0.806, "depth": None, "layer_depth": 64},
            {"approx": approx("ln_affine"), "label": LONG + "!", "accuracy": 0.316, "depth": None, "layer_depth": 32}]
    name = "checkpoints/20261201-121239-distill-cgfpoly0.5-d8--256_16-k8-b10-attn_out0.1-pretrained-s42.pt"
    return {"checkpoints": {name: {"rows": rows}}, "plot": str(tmp_path / "ps.png")}


def poly_swap(tmp_path):
    row = lambda label, depth, acc: {"label": label, "depth": depth, "accuracy": acc}  # noqa: E731
    return {"checkpoint": "checkpoints/student_kd_s42.pt", "plot": str(tmp_path / "sw.png"),
            "rows": [row("cgf c=0.5", None, 0.797), row("cgf_poly c=0.5 d=8 [-32,32] k=5", 12, 0.336),
                     row("cgf_poly c=0.5 d=8 [-64,16] k=6", 13, 0.797), row("cgf_poly c=0.5 d=8 [-128,16] k=7", 14, 0.797),
                     row("cgf_poly c=0.5 d=4 [-256,16] k=8", 14, 0.797), row("cgf_poly c=0.5 d=8 [-256,16] k=8", 15, 0.797)]}


def settings_rows():
    def row(setting, diffs):
        seeds = [42, 7, 123, 1234, 2026][: len(diffs)]
        return {"setting": setting, "seeds": seeds, "vs_exact": {"seeds": seeds, "diffs": diffs, "mean": float(np.mean(diffs))}}

    return [row("KD beta=10 (pretrained init)", [-1.96, -2.21, 1.23, -0.74, -0.98]),
            row("+ attn_out=0.1", [-1.96, -0.49, 0.74, 0.74, 0.25]),  # two seeds of equal value share a label
            {"setting": "+ nothing on record", "seeds": [], "vs_exact": None}]


def loss_ablation(tmp_path):
    return {"softmax": {"name": "cgf", "coeff": 0.5}, "rows": settings_rows(), "plot": str(tmp_path / "la.png")}


def variant_compare(tmp_path):
    return {"rows": settings_rows() * 3, "plot": str(tmp_path / "vc.png")}


def layer_sensitivity(tmp_path):
    swap = [{"accuracy": a} for a in (0.82, 0.78, 0.80, 0.71)]  # all exact, layer 0, layer 1, every layer
    refs = {"teacher, all exact": 0.82, "teacher, all CGF at eval": 0.71, "CE fine-tune, all exact": 0.82, "CE fine-tune, all CGF": 0.79}
    return {"cgf": {"name": "cgf", "coeff": 0.5}, "swap": swap, "trained": {"0": {"accuracy": [0.80]}, "1": {"accuracy": [0.79]}},
            "references": refs, "plot": str(tmp_path / "ls.png")}


def kernel_view(tmp_path):
    def run(k, ft, kern):
        solved = {"logistic": {"accuracy": kern}, "linearised": {"accuracy": kern + 0.05}}
        return {"k": k, "fine_tune": {"accuracy": ft}, "kernels": {"sgd": solved, "sign": solved}}

    entry = lambda name, f0: {"name": name, "f0_dev_accuracy": f0,  # noqa: E731
                              "runs": [run(16, 0.68, 0.67), run(16, 0.80, 0.70), run(64, 0.82, 0.66)]}
    return {"checkpoints": [entry("teacher", 0.82), entry("student_kd_s42", 0.80)], "figure": str(tmp_path / "kv.png")}


def coeff_sweep(tmp_path, seeds=(42,)):
    rng = np.random.default_rng(1)
    return {"method": "CE", "seeds": list(seeds), "exact_accuracy": [0.82] * len(seeds), "plot": str(tmp_path / "cs.png"),
            "accuracy": {str(c): (0.78 + rng.normal(0, 0.01, len(seeds))).tolist() for c in (0.4, 0.5, 0.6)}}


def layer_probes(tmp_path):
    def entry(name, base):
        layers = [{"layer": i, "nonlinearity": {b: {"linear": 0.05 * (i + 1), "identity": 0.3} for b in ("layer", "attention", "ffn")}}
                  for i in range(3)]
        variants = ([{"probe": "replace", "block": b, "layer": i, "accuracy": base - 0.01 * i} for b in ("layer", "attention", "ffn")
                     for i in range(3)] + [{"probe": "remove", "layer": i, "accuracy": base - 0.1} for i in range(3)]
                    + [{"probe": "swap", "layers": [i, i + 1], "accuracy": base - 0.05} for i in range(2)])
        return {"name": name, "probes": {"baseline": {"accuracy": base}, "layers": layers, "variants": variants}}

    return {"checkpoints": [entry("teacher", 0.82), entry("20261201-190207-distill-cgf0.5-b10-attn_out0.1-pretrained-s0", 0.80)],
            "figures": {"nonlinearity": str(tmp_path / "lp-nonlinearity.png"), "accuracy": str(tmp_path / "lp-accuracy.png")}}


def exact_vs_cgf(tmp_path):
    rows = [{"softmax": {"name": "exact"}, "accuracy": 0.82}] + [{"softmax": {"name": "cgf", "coeff": c}, "accuracy": 0.7 + c / 10}
                                                                   for c in (0.3, 0.5, 0.65, 1.0)]
    return {"swap": {"checkpoint": "teacher.pt", "rows": rows}, "plot": str(tmp_path / "swap.png")}


RECORDS = {f.__name__: f for f in (encrypted_inference, hessian, attention_norms, polynomial_student, poly_swap, loss_ablation,
                                     variant_compare, layer_sensitivity, kernel_view, coeff_sweep, layer_probes, exact_vs_cgf)}


def write(tmp_path, kind: str, record: dict):
    path = tmp_path / f"{kind}-20261201-120000.json"
    path.write_text(json.dumps(record))
    return path


def test_every_kind_of_the_registry_has_a_record_here():
    assert set(RECORDS) == set(R.REGISTRY)


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_each_kind_is_redrawn_at_the_path_its_record_names_with_every_text_inside(tmp_path, outside, kind):
    record = RECORDS[kind](tmp_path)
    png = R.replot(write(tmp_path, kind, record))
    named = record.get("plot") or record.get("figure") or record["figures"]["accuracy"]  # layer_probes: two figures
    assert str(png) == named and png.read_bytes()[:4] == b"\x89PNG"
    assert not outside, f"texts beyond the canvas: {outside}"


@pytest.mark.parametrize("kind, make", [("encrypted_inference", lambda p: encrypted_inference(p, layers=1, examples=1)),
                                        ("coeff_sweep", lambda p: coeff_sweep(p, seeds=(42, 7, 123)))],
                         ids=["one-layer-one-example", "three-seeds"])
def test_the_other_shapes_of_a_figure_fit_too(tmp_path, outside, kind, make):
    assert R.replot(write(tmp_path, kind, make(tmp_path))).exists() and not outside


def test_an_old_exact_vs_cgf_record_is_drawn_where_its_run_put_the_figure(tmp_path):
    record = exact_vs_cgf(tmp_path)
    del record["plot"]
    png = R.replot(write(tmp_path, "exact_vs_cgf", record))
    assert png.name == "swap-20261201-120000.png" and png.exists()


def test_a_record_naming_no_png_is_drawn_beside_itself(tmp_path):
    record = hessian(tmp_path)
    del record["plot"]
    assert R.replot(write(tmp_path, "hessian", record)) == tmp_path / "hessian-20261201-120000.png"


@pytest.mark.parametrize("kind, spoil, message", [
    ("encrypted_inference", lambda r: [ex.pop("per_layer") for res in r["results"] for ex in res["examples"]], "no per-layer errors"),
    ("hessian", lambda r: r["results"][0].pop("density"), "'density'"),
    ("loss_ablation", lambda r: [row.update(vs_exact=None) for row in r["rows"]], "would be empty"),
    ("attention_norms", lambda r: r.update(kinds=["cls", "sep"]), "share kinds"),
])
def test_a_record_without_the_data_its_figure_needs_is_refused(tmp_path, kind, spoil, message):
    record = RECORDS[kind](tmp_path)
    spoil(record)
    with pytest.raises(CgfBertError, match=message):
        R.replot(write(tmp_path, kind, record))
    assert not list(tmp_path.glob("*.png"))


def test_a_key_error_of_the_drawing_code_is_not_blamed_on_the_record(tmp_path, monkeypatch):
    def buggy(record, path):
        return {}["bins"]  # the adapter's own mistake: a traceback, not "the record holds no 'bins'"

    monkeypatch.setitem(R.REGISTRY, "hessian", buggy)
    path = write(tmp_path, "hessian", RECORDS["hessian"](tmp_path))
    with pytest.raises(KeyError) as e:
        R.replot(path)
    assert not isinstance(e.value, CgfBertError) and e.value.args == ("bins",)


def test_a_kind_with_no_figure_or_a_name_with_no_kind_is_refused(tmp_path):
    with pytest.raises(CgfBertError, match="known kinds: attention_norms"):
        R.replot(write(tmp_path, "attention_analysis", {}))
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(CgfBertError, match="no KIND-YYYYMMDD-HHMMSS name"):
        R.replot(tmp_path / "notes.json")
    with pytest.raises(CgfBertError, match="not a readable JSON record .*FileNotFoundError"):
        R.replot(tmp_path / "hessian-20261201-000000.json")
    (tmp_path / "hessian-20261201-000001.json").write_text("{truncated")
    with pytest.raises(CgfBertError, match="not a readable JSON record .*JSONDecodeError"):
        R.replot(tmp_path / "hessian-20261201-000001.json")


def test_the_command_draws_the_others_and_fails_naming_what_it_could_not(tmp_path, monkeypatch, capsys):
    good = write(tmp_path, "poly_swap", poly_swap(tmp_path))
    monkeypatch.setattr("sys.argv", ["replot", str(good), str(tmp_path / "notes-x.json")])
    with pytest.raises(SystemExit) as e:
        R.run_main(R.main)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and f"redrew {tmp_path / 'sw.png'}" in out and "not redrawn" in err and "1 of 2 records" in err


def test_the_kl_heatmap_of_the_teacher_against_itself_starts_at_zero(tmp_path, monkeypatch):
    from cgf_bert.analysis import range_plots

    figs = []
    monkeypatch.setattr(range_plots, "save", lambda fig, path: figs.append(fig))
    noise = [[-1e-9, 2e-10], [0.0, -3e-10]]  # float noise of a KL that is 0
    range_plots.plot_kl({"layers": [{"kl_heads": [{"mean": v} for v in row]} for row in noise]}, tmp_path / "kl.png", "teacher")
    image = figs[0].axes[0].images[0]
    assert image.norm.vmin == 0.0 and image.norm.vmax >= 1e-4 and float(image.get_array().min()) == 0.0


def test_the_attention_maps_fit_the_canvas(tmp_path, outside):
    from cgf_bert.analysis.range_plots import plot_maps

    maps = torch.softmax(torch.randn(2, 64, 64), -1)
    plot_maps(maps[0], maps[1], [f"tok{i}" for i in range(64)], tmp_path / "m.png", ("teacher: layer 0 head 0", f"{LONG}: layer 0 head 0"))
    assert not outside, outside


def test_the_paired_deltas_plot_fits_the_canvas(tmp_path, outside):
    from test_experiments import fake

    from cgf_bert.report.summary import plot_paired_deltas

    recs = [fake("a", "finetune", "exact", 0.5, 1, 0.80), fake("b", "finetune", "exact", 0.5, 2, 0.82),
            fake("c", "distill", "cgf", 0.5, 1, 0.79, beta=10), fake("d", "distill", "cgf", 0.5, 2, 0.80, beta=10)]
    assert plot_paired_deltas(recs, tmp_path / "p.png").exists() and not outside
