"""Argparse flags generated from the frozen config dataclasses, and the scripts' error handling."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any, Callable

from . import CgfBertError


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), **defaults) -> None:
    """One ``--flag`` per dataclass field, with its help, choices and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
        kw: dict[str, Any] = {"default": default, "help": f"{f.metadata['help']} (default: %(default)s)"}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
            kw["metavar"] = f.name.upper() if "choices" not in f.metadata else None
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, dest=f.name, **kw)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """Build a frozen ``cls`` from parsed args (fields absent from ``args`` keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **overrides})


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
