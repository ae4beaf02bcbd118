"""Argparse flags generated from the frozen config dataclasses, and the scripts' error handling.

A plain field is one ``--flag`` whose value is checked against the field's range when the
arguments are parsed. Two fields are values built from a group of flags, read from their
registries so that a new variant or loss term needs no change here:
- the approximations: per replaced op (softmax, GELU, LayerNorm, pooler) ``--OP NAME``, one
  flag per parameter its kinds declare (``--OP-PARAM``; the softmax's also bare, ``--coeff``; a
  flag the chosen kind does not declare is an error), and ``--OP-layers I=SPEC ...``;
- the distillation objective: the preset ``--alpha/--temperature/--beta`` plus ``--loss NAME=WEIGHT``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import runpy
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Callable

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import EXACT, Approximations
from cgf_bert.approx.polyexp import PolyExp
from cgf_bert.approx.softmax import POLY_PARAMS
from cgf_bert.approx.spec import OPS, Spec, op
from cgf_bert.objective import LOSSES, LossTerm, kd_preset
from cgf_bert.registry import Param
from cgf_bert.store.atomic import check_writable
from cgf_bert.train import losses  # noqa: F401  (registers the loss terms that --loss names)


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: a bad option is one line on stderr, ``PROG: error: MESSAGE``, and
    exit code 2, before any work starts. The usage block argparse prints above the message
    is left to ``--help``, which prints it in full."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)  # keeps the docstring's commands
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if "prog" not in kw and spec is not None and sys.argv[0].endswith("__main__.py"):
            kw["prog"] = f"python -m {spec.name.removesuffix('.__main__')}"  # not '__main__.py' (python -m benchmarks)
        super().__init__(*args, **kw)
        self.checks: list[Callable[[argparse.Namespace], Any]] = []  # run on the parsed args; a CgfBertError is a parse error
        self.add_argument("--verbose", action="store_true",
                          help="show the libraries' warnings (pyarrow's, transformers'...), hidden by default")
        self.add_argument("-q", "--quiet", action="store_true", help="print only the final result: no progress bars, no notes")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if not parsed.verbose:
            quiet_libraries()
        if parsed.quiet:
            quiet_progress()
        for check in (*self.checks, writable_outputs):
            try:
                check(parsed)
            except CgfBertError as e:
                self.error(str(e))
        return parsed, rest

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def _get_values(self, action, arg_strings):
        # '--opt=--': argparse drops the '--' as a separator and stores [] without calling the type;
        # the option's own type judges it instead (a number's refuses it, a path's takes it).
        if action.nargs is None and arg_strings == ["--"]:
            return self._get_value(action, "--")
        return super()._get_values(action, arg_strings)


def quiet_libraries() -> None:
    """Hide warnings raised outside this package (pyarrow's FutureWarning at every distillation
    start, transformers' notices): the progress bars and the epoch lines are the output."""
    warnings.filterwarnings("ignore", module=r"^(?!cgf_bert|experiments|__main__)")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


OUTPUT_FOLDERS = {"results_dir": "--results-dir", "log_dir": "--log-dir"}  # folders a script writes into, by dest


def writable_outputs(parsed: argparse.Namespace) -> None:
    """Every output folder a script or experiment module was given can be created and written, checked
    when the arguments are parsed: a record is never lost at the end of hours of work."""
    folders = {flag: getattr(parsed, dest) for dest, flag in OUTPUT_FOLDERS.items() if getattr(parsed, dest, None)}
    check_writable({}, folders)


QUIET = False  # set by -q: the scripts' progress notes (``note``) are off


def note(*args, **kw) -> None:
    """A progress note of a script (not its result): printed unless ``-q``."""
    if not QUIET:
        print(*args, **kw, flush=True)


def quiet_progress() -> None:
    """``-q``: every progress bar and epoch line off (whatever its caller asked), only errors logged."""
    from tqdm import std

    global QUIET
    QUIET = True
    if not getattr(std.tqdm.__init__, "quiet", False):
        init = std.tqdm.__init__

        def silent(self, *args, **kw):
            kw["disable"] = True
            init(self, *args, **kw)

        silent.quiet = True
        std.tqdm.__init__ = silent
        std.tqdm.write = classmethod(lambda cls, *args, **kw: None)  # the epoch lines go out through tqdm.write
    logging.getLogger().setLevel(logging.ERROR)


def _type(param: Param) -> Callable[[str], Any]:
    """An argparse ``type`` that converts and range-checks, so a bad value fails at parse time
    (argparse prefixes the option: ``argument --lr: must be finite and > 0, got 'nan'``)."""

    def parse(text: str):
        if not param.accepts(text):
            raise argparse.ArgumentTypeError(f"must be {param.range_text()}, got {text!r}")
        return param.check(text)

    parse.__name__ = param.type.__name__  # argparse names the type in its own messages
    parse.param = param  # what the option accepts, for tests and tools that walk a parser
    return parse


def number(kind: type, name: str, *, min: float | None = None, max: float | None = None, above: float | None = None):
    """The argparse ``type`` of a numeric option that no config field holds (``--seeds``,
    ``--coeffs``): ``kind`` (int or float), finite, within the bounds."""
    return _type(Param(name, kind, None, "", min, max, above))


def field_type(cls, name: str) -> Callable[[str], Any]:
    """The argparse ``type`` of config field ``name`` (``--seeds`` takes what ``--seed`` takes)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return _type(_field_param(f, typing.get_type_hints(cls)[name]))


class Interval(argparse.Action):
    """``--opt LO HI``, repeatable: two numbers (each checked by the option's ``type``) with
    LO < HI, checked at parse time; the option's value is the list of (LO, HI) pairs."""

    def __init__(self, option_strings, dest, nargs=2, **kw):
        super().__init__(option_strings, dest, nargs=2, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        lo, hi = values
        if not lo < hi:
            raise argparse.ArgumentError(self, f"takes LO HI with LO < HI, got {lo:g} {hi:g}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (lo, hi)])


def poly_exp(text: str) -> PolyExp:
    """An argparse ``type``: 'DEGREE,LO,HI,SQUARINGS' (e.g. 8,-32,32,5) -> the polynomial exp,
    each part checked as cgf_poly declares it, and LO < HI."""
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"takes DEGREE,LO,HI,SQUARINGS (e.g. 8,-32,32,5), got {text!r}")
    declared = {p.name: p for p in POLY_PARAMS}
    names = ("degree", "exp_lo", "exp_hi", "squarings")
    for name, part in zip(names, parts):
        if not declared[name].accepts(part):
            raise argparse.ArgumentTypeError(f"{name} must be {declared[name].range_text()}, got {part!r} in {text!r}")
    degree, lo, hi, squarings = (declared[n].check(part) for n, part in zip(names, parts))
    if lo >= hi:
        raise argparse.ArgumentTypeError(f"takes DEGREE,LO,HI,SQUARINGS with LO < HI, got {text!r}")
    return PolyExp(degree, lo, hi, squarings)


def _parsed(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a parser of the package that raises CgfBertError."""

    def parse(text: str):
        try:
            return fn(text)
        except CgfBertError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = fn.__name__.lstrip("_")
    return parse


def _field_param(f: dataclasses.Field, kind: type) -> Param:
    m = f.metadata
    return Param(f.name, kind, f.default, m["help"], m.get("min"), m.get("max"), m.get("above"))


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), only: tuple[str, ...] = (), **defaults) -> None:
    """One ``--flag`` per dataclass field (or a group, for the softmax and the objective);
    ``skip`` leaves fields out, ``only`` keeps just those."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only and f.name not in only):
            continue
        default = defaults.get(f.name, f.default)
        if "cli" in f.metadata:
            SPECIAL[f.metadata["cli"]].add(parser, default)
            continue
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
        kw: dict[str, Any] = {"default": default, "help": f"{f.metadata['help']} (default: %(default)s)"}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        elif base in (int, float):
            kw["type"], kw["metavar"] = _type(_field_param(f, base)), f.name.upper()
        else:
            kw["type"], kw["metavar"] = base, f.name.upper()
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """Build a frozen ``cls`` from parsed args (fields absent from ``args`` keep defaults)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            continue
        if "cli" in f.metadata:
            if SPECIAL[f.metadata["cli"]].present(args):
                values[f.name] = SPECIAL[f.metadata["cli"]].build(args)
        elif f.name in vars(args):
            values[f.name] = getattr(args, f.name)
    return cls(**{**values, **overrides})


# ---------------------------------------------------------------- the approximations


def op_params(op_name: str) -> dict[str, tuple[list[Param], list[str]]]:
    """Every parameter some kind of op ``op_name`` declares: its declarations and the kinds declaring it."""
    out: dict[str, tuple[list[Param], list[str]]] = {}
    for kind in op(op_name).kinds.values():
        for p in kind.params:
            decl, kinds = out.setdefault(p.name, ([], []))
            decl.append(p)
            kinds.append(kind.name)
    return out


def _flag(op_name: str, param: str) -> str:
    """'--softmax-coeff', '--gelu-degree': each op's parameters in its own namespace."""
    return f"--{op_name}-{param.replace('_', '-')}"


# The softmax parameters that had bare flags before other ops were replaceable keep them
# (``--coeff``, ``--degree``, ...): committed plans, records' commands and the README use them.
LEGACY_BARE = {"softmax": ("coeff", "degree", "exp_lo", "exp_hi", "squarings", "shift", "power")}


class ApproxFlags:
    """Per op: ``--OP NAME``, one flag per parameter its kinds declare (``--OP-PARAM``; the
    softmax's also bare), and ``--OP-layers I=SPEC ...`` where the op is per layer -> ``Approximations``.

    A parameter is range-checked by the chosen kind's own declaration (two kinds may declare
    one name with different ranges), and one the chosen kind does not declare is an error: both
    at parse time (``ArgumentParser.parse_known_args`` builds the value once to check it)."""

    @staticmethod
    def add(parser: argparse.ArgumentParser, default: Approximations | None) -> None:
        for name in EXACT.specs():  # softmax, gelu, layernorm, pooler
            ApproxFlags._add_op(parser, OPS[name], None if default is None else default.specs()[name])
        parser.set_defaults(_approx_default=default)
        if isinstance(parser, ArgumentParser):
            parser.checks.append(lambda args: ApproxFlags.build(args) if ApproxFlags.present(args) else None)

    @staticmethod
    def _add_op(parser, o, default: Spec | None) -> None:
        g = parser.add_argument_group(f"{o.title} ({o.name})", f"what replaces the {o.title}, its parameters"
                                      + (" and per-layer overrides" if o.per_layer else ""))
        names = "; ".join(f"{k}: {v.doc.rstrip('.')}" for k, v in sorted(o.kinds.items()))
        g.add_argument(f"--{o.name}", dest=o.name, default=None if default is None else default.name, choices=sorted(o.kinds),
                       help=f"{names} (default: %(default)s)")
        for pname, (decls, kinds) in op_params(o.name).items():
            bare = "--" + pname.replace("_", "-")
            # One flag per name: the kinds of an op that share a parameter name share its type and
            # range (defaults and help may differ), so argparse checks it whichever kind is chosen.
            if len({(d.type, d.min, d.max, d.above) for d in decls}) > 1:
                raise CgfBertError(f"{o.name} kinds {kinds} declare {pname!r} with different types or ranges; rename one")
            kw = {"type": _type(decls[0])}
            ranges = "; ".join(f"{k}: {d.range_text()}, default {d.default:g}" for k, d in zip(kinds, decls))
            legacy = pname in LEGACY_BARE.get(o.name, ())
            also = f"; also {bare}" if legacy else ""
            g.add_argument(_flag(o.name, pname), dest=f"{o.name}_{pname}", metavar=pname.upper(), help=f"{decls[0].help} ({ranges}{also})", **kw)
            if legacy:  # its own action, so that an error names the flag as typed
                g.add_argument(bare, dest=f"{o.name}_{pname}", help=argparse.SUPPRESS, **kw)
        if o.per_layer:
            g.add_argument(f"--{o.name}-layers", dest=f"{o.name}_layers", nargs="+", type=_parsed(_layer(o.name)), metavar="I=SPEC",
                           default=[], help="layer I runs SPEC instead, e.g. 5=exact (layers count from 0)")

    @staticmethod
    def present(args: argparse.Namespace) -> bool:
        return "_approx_default" in vars(args) and args._approx_default is not None or ApproxFlags.given(args) != {}

    @staticmethod
    def given(args: argparse.Namespace) -> dict[str, bool]:
        """The ops named or parametrised on the command line."""
        out = {}
        for name in OPS:
            params = [k for k in op_params(name) if getattr(args, f"{name}_{k}", None) is not None]
            if getattr(args, name, None) is not None or params or getattr(args, f"{name}_layers", None):
                out[name] = True
        return out

    @staticmethod
    def overrides(args: argparse.Namespace) -> dict[str, Spec]:
        """The specs of the ops given on the command line only (``validate.py``: the rest is the checkpoint's)."""
        built = ApproxFlags.build(args)
        return {name: built.specs()[name] for name in ApproxFlags.given(args)}

    @staticmethod
    def build(args: argparse.Namespace, base: Approximations | None = None) -> Approximations:
        """The approximations the flags name: the parser's default (or ``base``), each op given replaced."""
        default: Approximations = base or args._approx_default or EXACT
        specs = {name: ApproxFlags._build_op(args, name, default.specs()[name]) for name in OPS}
        return Approximations(**specs)

    @staticmethod
    def _build_op(args: argparse.Namespace, name: str, default: Spec) -> Spec:
        kind_name = getattr(args, name, None) or default.name
        params = {k: getattr(args, f"{name}_{k}") for k in op_params(name) if getattr(args, f"{name}_{k}", None) is not None}
        if params and getattr(args, name, None) is None and args._approx_default is None:
            raise CgfBertError(f"{name} parameters ({', '.join(_flag(name, k) for k in params)}) need --{name} with them")
        same = default.name == kind_name  # start from the default's values
        layers = dict(getattr(args, f"{name}_layers", None) or []) or (dict(default.layers) if same else {})
        try:
            return Spec.make(name, kind_name, layers=layers, **{**(default.values if same else {}), **params})
        except CgfBertError as e:
            raise CgfBertError(f"--{name} {kind_name}: {e}") from None


def _layer(op_name: str) -> Callable[[str], tuple[int, Spec]]:
    def layer(text: str) -> tuple[int, Spec]:
        index, eq, spec = text.partition("=")
        if not eq or not index.strip().isdigit():
            raise CgfBertError(f"--{op_name}-layers takes I=SPEC (e.g. 5=exact), got {text!r}")
        return int(index), Spec.parse(op_name, spec)

    layer.__name__ = f"{op_name}_layer"
    return layer


# ---------------------------------------------------------------- the objective


class ObjectiveFlags:
    """``--alpha/--temperature/--beta`` (the reference preset) and ``--loss NAME=WEIGHT`` -> terms."""

    PRESET = (
        Param("alpha", float, 0.5, "weight of the logit-KD term; CE gets 1 - alpha", min=0.0, max=1.0),
        Param("temperature", float, 2.0, "KD temperature T (the KL term is scaled by T^2)", above=0.0),
        Param("beta", float, 10.0, "weight of the per-layer hidden-state MSE (0 turns it off)", min=0.0),
    )

    @staticmethod
    def add(parser: argparse.ArgumentParser, default) -> None:
        g = parser.add_argument_group("distillation objective", "(1 - alpha) CE + alpha T^2 KL + beta hidden MSE, plus any --loss terms")
        for p in ObjectiveFlags.PRESET:
            g.add_argument("--" + p.name, type=_type(p), default=p.default, metavar=p.name.upper(), help=f"{p.help} (default: %(default)s)")
        names = "; ".join(f"{k}: {v.doc}" for k, v in sorted(LOSSES.items()) if k not in ("ce", "kd", "hidden_mse"))
        g.add_argument("--loss", action="append", type=_parsed(_term), default=[], metavar="NAME=WEIGHT",
                       help=f"add a term, repeatable; NAME=WEIGHT[,param=value...]. Terms: {names or 'none beyond the preset'}")

    @staticmethod
    def present(args: argparse.Namespace) -> bool:
        return "alpha" in vars(args)

    @staticmethod
    def build(args: argparse.Namespace) -> tuple[LossTerm, ...]:
        return kd_preset(args.alpha, args.temperature, args.beta) + tuple(args.loss)  # --loss terms, parsed


def _term(text: str) -> LossTerm:
    head, *rest = text.split(",")
    name, eq, weight = head.partition("=")
    params = dict(item.split("=", 1) for item in rest if "=" in item)
    if not eq or len(params) != len(rest):
        raise CgfBertError(f"--loss takes NAME=WEIGHT[,param=value...], got {text!r}")
    return LossTerm.make(name.strip(), weight, **params)


SPECIAL = {"approx": ApproxFlags, "objective": ObjectiveFlags}


class _Built(Exception):
    """Raised in place of parsing by ``script_parser``: carries the parser."""


def script_parser(path: str | Path) -> argparse.ArgumentParser:
    """The parser the script at ``path`` builds, taken at its ``parse_args`` call: the script's
    imports and its ``main`` run up to there and nothing after. Flags meant for a script (a
    plan's runs) are read with the script's own parser, never a copy of it. Not thread-safe."""
    real, argv = argparse.ArgumentParser.parse_args, sys.argv

    def grab(self, *args, **kw):
        raise _Built(self)

    argparse.ArgumentParser.parse_args = grab
    sys.argv = [str(path)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except _Built as built:
        return built.args[0]
    finally:
        argparse.ArgumentParser.parse_args, sys.argv = real, argv
    raise CgfBertError(f"{path} parses no arguments")


def parse_for(parser: argparse.ArgumentParser, args: list[str], where: str) -> argparse.Namespace:
    """``args`` parsed by ``parser``; a refusal is a CgfBertError that says ``where`` (not an exit)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        raise CgfBertError(f"{where}: {err.getvalue().strip()}") from None


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's ``main``: a CgfBertError is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except CgfBertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
