"""Argparse flags generated from the frozen config dataclasses, and the scripts' error handling.

A plain field is one ``--flag`` whose value is checked against the field's range when the
arguments are parsed. Two fields are values built from a group of flags, read from their
registries so that a new variant or loss term needs no change here:
- the softmax spec: ``--softmax NAME``, one flag per parameter any softmax declares (a flag
  the chosen softmax does not declare is an error), and ``--softmax-layers I=SPEC ...``;
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
from pathlib import Path
from typing import Any, Callable

from . import CgfBertError
from .losses import LOSSES, LossTerm, kd_preset
from .polyexp import PolyExp
from .registry import Param
from .softmax import POLY_PARAMS, SOFTMAXES, SoftmaxSpec


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

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


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


# ---------------------------------------------------------------- the softmax spec


def softmax_params() -> dict[str, tuple[Param, list[str]]]:
    """Every parameter some softmax declares, with the kinds that declare it."""
    out: dict[str, tuple[Param, list[str]]] = {}
    for kind in SOFTMAXES.values():
        for p in kind.params:
            out.setdefault(p.name, (p, []))[1].append(kind.name)
    return out


class SoftmaxFlags:
    """``--softmax``, the parameters' flags and ``--softmax-layers`` -> a ``SoftmaxSpec``."""

    @staticmethod
    def add(parser: argparse.ArgumentParser, default: SoftmaxSpec | None) -> None:
        g = parser.add_argument_group("attention softmax", "the softmax of every layer, its parameters, and per-layer overrides")
        names = "; ".join(f"{k}: {v.doc}" for k, v in sorted(SOFTMAXES.items()))
        g.add_argument("--softmax", default=None if default is None else default.name, choices=sorted(SOFTMAXES),
                       help=f"{names} (default: %(default)s)")
        for name, (p, kinds) in softmax_params().items():
            g.add_argument("--" + name.replace("_", "-"), dest=f"softmax_{name}", type=_type(p), metavar=name.upper(),
                           help=f"{p.help} ({', '.join(kinds)}; default {p.default:g})")
        g.add_argument("--softmax-layers", nargs="+", type=_parsed(_layer), metavar="I=SPEC", default=[],
                       help="layer I runs SPEC instead, e.g. 5=exact or 0=cgf:coeff=0.65 (layers count from 0)")
        parser.set_defaults(_softmax_default=default)

    @staticmethod
    def present(args: argparse.Namespace) -> bool:
        return getattr(args, "softmax", None) is not None

    @staticmethod
    def build(args: argparse.Namespace) -> SoftmaxSpec:
        default: SoftmaxSpec | None = args._softmax_default
        given = {n: getattr(args, f"softmax_{n}") for n in softmax_params() if getattr(args, f"softmax_{n}", None) is not None}
        same = default is not None and default.name == args.softmax  # start from the default's values
        layers = dict(args.softmax_layers) or (dict(default.layers) if same else {})  # (index, spec) pairs
        return SoftmaxSpec.make(args.softmax, layers=layers, **{**(default.values if same else {}), **given})


def _layer(text: str) -> tuple[int, SoftmaxSpec]:
    index, eq, spec = text.partition("=")
    if not eq or not index.strip().isdigit():
        raise CgfBertError(f"--softmax-layers takes I=SPEC (e.g. 5=exact), got {text!r}")
    return int(index), SoftmaxSpec.parse(spec)


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


SPECIAL = {"softmax": SoftmaxFlags, "objective": ObjectiveFlags}


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
