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
import dataclasses
import logging
import sys
import typing
from typing import Any, Callable

from . import CgfBertError
from .losses import LOSSES, LossTerm, kd_preset
from .registry import Param
from .softmax import SOFTMAXES, SoftmaxSpec


def _type(param: Param) -> Callable[[str], Any]:
    """An argparse ``type`` that converts and range-checks, so a bad value fails at parse time."""

    def parse(text: str):
        try:
            return param.check(text)
        except CgfBertError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = param.type.__name__  # argparse names the type in its own messages
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
        g.add_argument("--softmax-layers", nargs="+", metavar="I=SPEC", default=[],
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
        layers = dict(_layer(text) for text in args.softmax_layers) or (dict(default.layers) if same else {})
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
        g.add_argument("--loss", action="append", default=[], metavar="NAME=WEIGHT",
                       help=f"add a term, repeatable; NAME=WEIGHT[,param=value...]. Terms: {names or 'none beyond the preset'}")

    @staticmethod
    def present(args: argparse.Namespace) -> bool:
        return "alpha" in vars(args)

    @staticmethod
    def build(args: argparse.Namespace) -> tuple[LossTerm, ...]:
        return kd_preset(args.alpha, args.temperature, args.beta) + tuple(_term(t) for t in args.loss)


def _term(text: str) -> LossTerm:
    head, *rest = text.split(",")
    name, eq, weight = head.partition("=")
    params = dict(item.split("=", 1) for item in rest if "=" in item)
    if not eq or len(params) != len(rest):
        raise CgfBertError(f"--loss takes NAME=WEIGHT[,param=value...], got {text!r}")
    return LossTerm.make(name.strip(), weight, **params)


SPECIAL = {"softmax": SoftmaxFlags, "objective": ObjectiveFlags}


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
