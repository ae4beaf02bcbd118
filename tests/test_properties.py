"""Property-based tests (hypothesis) of the edges: every script's and experiment module's
parser against arbitrary option values, the MRPC TSV reader against arbitrary bytes and
malformed rows, and the CGF softmax against random scores and masks."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgf_bert import CgfBertError, cli
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.approx.spec import OPS, Spec
from cgf_bert.config import DistillConfig, TrainConfig
from cgf_bert.data.glue import read_mrpc_tsv

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"
# Every command a user runs: the step scripts, the experiment modules and the benchmarks.
TARGETS = [*(f"{s}.py" for s in ("finetune", "distill", "validate", "summarize")),
           *sorted(f"experiments.{p.stem}" for p in (FINETUNING / "experiments").glob("*.py") if p.stem != "__init__"),
           "benchmarks.__main__", "benchmarks.steps"]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- the parsers


class _Parsed(Exception):
    """Raised in place of parsing: carries the parser a script's main built."""


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def parser_of(target: str) -> argparse.ArgumentParser:
    """The parser ``target`` builds, taken at its parse_args call (its main runs up to there)."""
    if target not in _PARSERS:
        real = argparse.ArgumentParser.parse_args

        def grab(self, *args, **kw):
            raise _Parsed(self)

        argparse.ArgumentParser.parse_args = grab
        old_argv = sys.argv
        try:
            sys.argv = [target]
            if target.endswith(".py"):
                runpy.run_path(str(FINETUNING / target), run_name="__main__")
            else:
                with warnings.catch_warnings():  # runpy: benchmarks.steps was imported by benchmarks.__main__ already
                    warnings.simplefilter("ignore", RuntimeWarning)
                    runpy.run_module(target, run_name="__main__", alter_sys=False)
            raise AssertionError(f"{target} never parsed its arguments")
        except _Parsed as got:
            _PARSERS[target] = got.args[0]
        finally:
            argparse.ArgumentParser.parse_args = real
            sys.argv = old_argv
    return _PARSERS[target]


def numeric_options(parser) -> list[argparse.Action]:
    return [a for a in parser._actions if hasattr(a.type, "param")]


def base_argv(parser, skip: argparse.Action) -> list[str]:
    """Positionals and required options filled with placeholders (parsing never opens them)."""
    argv = []
    for a in parser._actions:
        if a is skip:
            continue
        if not a.option_strings:
            argv.append("x.pt")
        elif a.required:
            argv += [a.option_strings[0], str(a.choices[0]) if a.choices else "x"]
    return argv


def parse(parser, argv) -> tuple[int, argparse.Namespace | None, str]:
    """(exit code, namespace, stderr) of parsing ``argv``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return 0, parser.parse_args(argv), err.getvalue()
        except SystemExit as e:
            return e.code, None, err.getvalue()


@pytest.mark.parametrize("target", TARGETS)
def test_every_numeric_option_is_range_checked(target):
    """No option takes a bare int or float: each is finite and in a stated range at parse time."""
    parser = parser_of(target)
    bare = [a.option_strings or a.dest for a in parser._actions if a.type in (int, float)]
    assert not bare, f"{target}: numeric options without a range check: {bare}"


def approx_param(action) -> tuple[str, str] | None:
    """(op, parameter) of an op's parameter flag (dest 'softmax_coeff'), else None."""
    op_name, _, param = action.dest.partition("_")
    return (op_name, param) if op_name in OPS and param in cli.op_params(op_name) else None


def _values():
    floats = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    ints = st.integers(-(2**70), 2**70).map(str)
    odd = st.sampled_from(["nan", "-inf", "1e309", "-0", "0", "1", "0.5", "1.0", "2**3", "0x10", " 7", "1_0", "", "²", "1e-320"])
    return st.one_of(floats, ints, odd, st.text(max_size=6))


@pytest.mark.parametrize("target", [t for t in TARGETS if t not in ("summarize.py", "experiments.replot", "experiments.reprice")])  # these take no number
@FAST
@given(data=st.data())
def test_option_values_are_accepted_into_a_valid_config_or_refused_in_one_line(target, data):
    parser = parser_of(target)
    options = numeric_options(parser)
    action = data.draw(st.sampled_from(options), label="option")
    value = data.draw(_values(), label="value")
    param = action.type.param
    flag = action.option_strings[0] if action.option_strings else None
    argv = base_argv(parser, action)
    op_param = approx_param(action)
    if op_param:  # an op's parameter goes with a kind that declares it
        argv += [f"--{op_param[0]}", cli.op_params(op_param[0])[op_param[1]][1][0]]
    count = {None: 1, "?": 1, "*": 1, "+": 1}.get(action.nargs, action.nargs)
    values = [value] + [data.draw(_values(), label="second value")] * (count - 1)  # nargs=2 is LO HI
    # "--opt=value": a value starting with '-' is still this option's value
    argv += [f"{flag}={value}"] if count == 1 else [flag, *values]
    code, ns, err = parse(parser, argv)
    lines = err.strip().splitlines()
    if count > 1 and any(v.startswith("-") and not parser._negative_number_matcher.match(v) for v in values):
        # argparse reads a separate '-1e+16' as an option (only -1 and -1.5 pass as numbers): a clean refusal still
        assert code == 2 and lines == [f"{parser.prog}: error: argument {flag}: expected {count} arguments"], err
        return
    bad = next((v for v in values if not param.accepts(v)), None)
    if bad is not None:
        assert code == 2, f"{target} {flag} {values} was accepted"
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"{parser.prog}: error: argument {flag}") and repr(bad) in lines[0], lines[0]
        assert param.range_text() in lines[0], lines[0]
        return
    want = [param.check(v) for v in values]
    if count == 2 and not want[0] < want[1]:  # the one cross-value rule of a pair: LO < HI
        assert code == 2 and lines == [f"{parser.prog}: error: argument {flag}: takes LO HI with LO < HI, got {want[0]:g} {want[1]:g}"], err
        return
    if code == 2 and op_param:  # a value in range that does not go with the kind's others (lo < hi): refused as parsed
        kind = cli.op_params(op_param[0])[op_param[1]][1][0]
        with pytest.raises(CgfBertError) as refused:
            Spec.make(op_param[0], kind, **{op_param[1]: param.check(values[0])})
        assert lines == [f"{parser.prog}: error: --{op_param[0]} {kind}: {refused.value}"], err
        return
    assert code == 0, err
    got = getattr(ns, action.dest)
    got = got[-1] if isinstance(action, (argparse._AppendAction, cli.Interval)) else got  # the last of a repeatable option
    assert got == (want[0] if action.nargs in (None, "?") else tuple(want) if count == 2 else want), (got, want)
    want = want[0]
    # accepted values build a valid config wherever the options are a config's fields
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if fields & set(vars(ns)):
        cfg = build_or_refuse(TrainConfig, ns)
        if cfg and action.dest in fields:
            assert getattr(cfg, action.dest) == want
        if cfg and op_param:
            assert cfg.approx.specs()[op_param[0]].values[op_param[1]] == want
    if cli.ObjectiveFlags.present(ns):
        assert build_or_refuse(DistillConfig, ns).terms  # the objective's terms build (their own checks pass)


def build_or_refuse(cls, ns):
    """The config the parsed options build; or, where a value in range does not go with the
    others (cgf_poly's exp_lo at or above exp_hi), None after checking that the script's
    run_main refuses it in one line with exit 2, before any work."""
    try:
        return cli.config_from_args(cls, ns)
    except CgfBertError:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            cli.run_main(lambda: cli.config_from_args(cls, ns))
        assert e.value.code == 2 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
        assert err.getvalue().startswith("error: bad polynomial exp"), err.getvalue()  # the one such pair today
        return None


def test_a_bad_value_is_one_line_and_exit_2_in_a_real_run(tmp_path):
    """End to end in a process of its own: exit 2 before any work, one line, nothing written."""
    import subprocess

    p = subprocess.run([sys.executable, "finetune.py", "--softmax", "cgf", "--coeff", "nan", "--results-dir", str(tmp_path)],
                       cwd=FINETUNING, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr == "finetune.py: error: argument --coeff: must be finite and >= 0, got 'nan'\n", p.stderr
    assert not any(tmp_path.iterdir())


def test_help_still_shows_usage_and_every_option():
    text = parser_of("finetune.py").format_help()
    assert text.startswith("usage: ") and "--softmax-coeff COEFF" in text and "also --coeff" in text
    assert "python finetune.py --softmax exact" in text
    for op_name in ("softmax", "gelu", "layernorm", "pooler"):  # every replaceable op has its group
        assert f"--{op_name} {{" in text


# ---------------------------------------------------------------- the TSV reader

HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
_field = st.text(st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)), max_size=12)


def _read(tmp_path, data: bytes, labeled=True):
    path = tmp_path / "x.tsv"
    path.write_bytes(data)
    try:
        return read_mrpc_tsv(path, labeled=labeled), None
    except CgfBertError as e:
        return None, str(e)


@FAST
@given(data=st.binary(max_size=300), labeled=st.booleans())
def test_tsv_reader_on_arbitrary_bytes_reads_every_line_or_names_file_and_line(tmp_path, data, labeled):
    cols, err = _read(tmp_path, data, labeled)
    path = str(tmp_path / "x.tsv")
    if err is not None:
        assert err.startswith(f"{path}:"), err
        where = err[len(path) + 1:].split(":", 1)[0]
        assert where.isdigit() or err == f"{path}: no data rows", err
        return
    lines = io.StringIO(data.decode("utf-8-sig"), newline="").readlines()
    assert len(cols["idx"]) == len(lines) - 1  # every line after the header became a row: none skipped


@FAST
@given(rows=st.lists(st.tuples(st.sampled_from("01"), _field, _field, _field, _field), min_size=1, max_size=8),
       bad=st.integers(0, 7), damage=st.sampled_from(["drop_tab", "extra_tab", "label", "blank", "bad_utf8"]), bom=st.booleans(),
       crlf=st.booleans())
def test_tsv_reader_names_the_line_of_a_malformed_row(tmp_path, rows, bad, damage, bom, crlf):
    lines = ["\t".join(r) for r in rows]
    bad %= len(lines)
    eol = "\r\n" if crlf else "\n"
    good = (("\ufeff" if bom else "") + eol.join([HEADER, *lines]) + eol).encode()
    cols, err = _read(tmp_path, good)
    assert err is None, err
    assert cols["label"] == [int(r[0]) for r in rows] and cols["sentence1"] == [r[3] for r in rows] and cols["sentence2"] == [r[4] for r in rows]
    broken = {"drop_tab": lines[bad].replace("\t", " ", 1), "extra_tab": lines[bad] + "\tx", "label": "2" + lines[bad][1:],
              "blank": "", "bad_utf8": lines[bad] + "\udcff"}[damage]
    text = ("\ufeff" if bom else "") + eol.join([HEADER, *lines[:bad], broken, *lines[bad + 1:]]) + eol
    data = text.encode("utf-8", "surrogateescape")  # bad_utf8: a lone byte 0xff at the end of the broken line
    cols, err = _read(tmp_path, data)
    assert err is not None and err.startswith(f"{tmp_path / 'x.tsv'}:{bad + 2}: "), (err, bad)


def test_tsv_reader_refuses_what_int_and_int32_cannot_hold(tmp_path):
    for first, why in (("²", "index must be an integer"), ("2147483648", "index must be an integer")):
        _, err = _read(tmp_path, f"index\ta\tb\tc\td\n{first}\t1\t2\ts\tt\n".encode(), labeled=False)
        assert err == f"{tmp_path / 'x.tsv'}:2: index must be an integer from 0 to 2^31 - 1, got {first!r}", err
    _, err = _read(tmp_path, f"{HEADER}\n1\t1\t2\t{'x' * 200_000}\tt\n".encode())
    assert err.startswith(f"{tmp_path / 'x.tsv'}:2: field larger than field limit"), err


# ---------------------------------------------------------------- the CGF softmax


@st.composite
def scores_and_mask(draw, dtype=torch.float32, bound=1e4):
    b, h, q, k = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 12))
    floats = st.floats(width=32, allow_nan=False, allow_infinity=False) if bound is None else st.floats(-bound, bound, width=32)
    values = draw(st.lists(floats, min_size=b * h * q * k, max_size=b * h * q * k))
    s = torch.tensor(values, dtype=dtype).reshape(b, h, q, k)  # (B, H, Q, K)
    lengths = draw(st.lists(st.integers(1, k), min_size=b, max_size=b))  # every row has a valid key, as in BERT
    valid = (torch.arange(k)[None] < torch.tensor(lengths)[:, None])[:, None, None, :]  # (B, 1, 1, K)
    return s, valid


def _cgf(coeff):
    return softmax_spec("cgf", coeff=coeff)


@FAST
@given(sm=scores_and_mask(), junk=st.floats(width=32, allow_nan=False, allow_infinity=False), coeff=st.floats(0.0, 4.0))
def test_cgf_masked_keys_are_exactly_zero_and_masked_scores_do_not_matter(sm, junk, coeff):
    s, valid = sm
    p = _cgf(coeff)(s, valid)
    assert (p.masked_select(~valid.expand_as(p)) == 0).all()
    # what a masked position holds (an additive -1e38, anything) changes nothing
    assert torch.equal(_cgf(coeff)(s.masked_fill(~valid, junk), valid), p)


@FAST
@given(sm=scores_and_mask(dtype=torch.float64, bound=100.0), shift=st.floats(-1e3, 1e3), coeff=st.floats(0.05, 4.0))
def test_cgf_is_shift_invariant(sm, shift, coeff):
    s, valid = sm
    torch.testing.assert_close(_cgf(coeff)(s + shift, valid), _cgf(coeff)(s, valid), rtol=1e-9, atol=1e-12)


@FAST
@given(sm=scores_and_mask(bound=None), coeff=st.floats(0.5, 4.0))
def test_cgf_outputs_are_finite_for_finite_scores(sm, coeff):
    """exp(x - c var) <= exp(n / 4c) (x_i^2 <= n var): finite in float32 for n <= 12, c >= 0.5,
    whatever the scores; a variance that overflows gives 0, not nan."""
    s, valid = sm
    assert torch.isfinite(_cgf(coeff)(s, valid)).all()


@pytest.mark.parametrize("row", [
    [-3.4e38, -2.9e32, -3.4e38],  # the row total overflows to -inf: the mean must not
    [3.4e38, -3.4e38, -3.4e38],  # the mean is finite, but s - mu overflows to +inf
])
@pytest.mark.parametrize("masked", [False, True])
def test_cgf_rows_near_the_float32_limit_give_zeros_not_nan(row, masked):
    """Rows hypothesis found: their variance is inf in float32, so every probability is 0; the
    gradient is finite too (the forward's 0s times anything)."""
    s = torch.tensor(row, dtype=torch.float32).reshape(1, 1, 1, 3).requires_grad_()
    valid = torch.ones(1, 1, 1, 3, dtype=torch.bool) if masked else None
    p = _cgf(0.5)(s, valid)
    assert torch.equal(p, torch.zeros_like(p))
    p.sum().backward()
    assert torch.isfinite(s.grad).all()


@FAST
@given(sm=scores_and_mask(bound=50.0), coeff=st.floats(0.0, 2.0))
def test_cgf_runs_in_float32_inside_bf16_autocast(sm, coeff):
    s, valid = sm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p32 = _cgf(coeff)(s, valid)
        p16 = _cgf(coeff)(s.bfloat16(), valid)
    assert p32.dtype == torch.float32 and p16.dtype == torch.bfloat16
    assert torch.equal(p32, _cgf(coeff)(s, valid))  # autocast changed nothing: float32 inside
    assert torch.equal(p16, _cgf(coeff)(s.bfloat16().float(), valid).bfloat16())  # computed in float32, rounded once
