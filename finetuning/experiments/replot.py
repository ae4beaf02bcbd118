"""Redraw an experiment's figure from its JSON record, no model loaded: the drawing code changes, the
measurements stay. The record's kind is its file name's prefix (``hessian-20261201-172836.json`` is a
``hessian`` record); the PNG goes where the record says it is (its "plot" or "figure" key), or
beside the record with the same stem when it names none.

    cd finetuning
    python -m experiments.replot ../results/analysis/hessian-20261201-172836.json
    python -m experiments.replot ../results/experiments/*.json     # a kind it does not draw is named, the rest drawn

attention_analysis (ranges, KL, maps) needs the model run again; summary.md's paired_deltas.png is
redrawn by ``python summarize.py``.
"""

import importlib
import json
import re
import sys
from pathlib import Path

from cgf_bert import CgfBertError
from cgf_bert.cli import ArgumentParser, run_main
from cgf_bert.store.provenance import REPO_ROOT

# kind -> "module:function(record, png_path)", the adapter beside each kind's drawing code; imported
# when a record of that kind is drawn (the experiment modules bring torch and the data stack with them)
ADAPTERS = {
    "encrypted_inference": "experiments.encrypted_inference:replot",
    "hessian": "experiments.hessian:replot",
    "attention_norms": "experiments.attention_norms:replot",
    "polynomial_student": "experiments.polynomial_student:replot",
    "poly_swap": "experiments.poly_swap:replot",
    "loss_ablation": "cgf_bert.report.compare:replot_loss_ablation",
    "variant_compare": "cgf_bert.report.compare:replot_variant_compare",
    "layer_sensitivity": "experiments.layer_sensitivity:replot",
    "kernel_view": "experiments.kernel_view:replot",
    "coeff_sweep": "cgf_bert.report.compare:replot_coeff_sweep",
    "layer_probes": "experiments.layer_probes:replot",
    "exact_vs_cgf": "experiments.exact_vs_cgf:replot",
}


def _lazy(target: str):
    module, _, name = target.partition(":")
    return lambda record, path: getattr(importlib.import_module(module), name)(record, path)


REGISTRY = {kind: _lazy(target) for kind, target in ADAPTERS.items()}


def kind_of(path: Path) -> str:
    """'hessian' of 'hessian-20261201-172836.json': the name before the timestamp."""
    m = re.match(r"(.+?)-\d{8}-\d{6}", path.stem)
    if not m:
        raise CgfBertError(f"{path}: no KIND-YYYYMMDD-HHMMSS name, so no kind to draw it by")
    return m.group(1)


class _MissingField(KeyError):
    """A key the record lacks (not a KeyError of the drawing code itself, which stays a traceback)."""


class _Record(dict):
    """A record's objects as read: a missing key raises ``_MissingField``."""

    def __missing__(self, key):
        raise _MissingField(key)


def png_path(record: dict, path: Path) -> Path:
    """Where the record's figure lives: its "plot" or "figure" key (repository-relative as written), else beside it."""
    named = record.get("plot") or record.get("figure")
    return REPO_ROOT / named if named else path.with_suffix(".png")


def replot(path: str | Path) -> Path:
    """Redraw the figure of the record at ``path`` in place; a CgfBertError says why it cannot be."""
    path = Path(path)
    kind = kind_of(path)
    if kind not in REGISTRY:
        raise CgfBertError(f"{path}: no figure is drawn from {kind} records; known kinds: {', '.join(sorted(REGISTRY))}")
    try:
        record = json.loads(path.read_text(), object_hook=_Record)
    except (OSError, ValueError) as e:  # missing, unreadable or not JSON: named, not a traceback
        raise CgfBertError(f"{path}: not a readable JSON record ({e.__class__.__name__}: {e})") from None
    try:
        return REGISTRY[kind](record, png_path(record, path))
    except _MissingField as e:  # a record from before its figure needed this, or another kind's
        raise CgfBertError(f"{path}: the record holds no {e.args[0]!r}, which its {kind} figure needs; not redrawn") from None


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("records", nargs="+", metavar="RECORD.json", help="experiment records whose figures to redraw")
    args = p.parse_args()
    failed = 0
    for record in args.records:  # one record that cannot be drawn stops none of the others
        try:
            print(f"redrew {replot(record)}")
        except CgfBertError as e:
            print(f"not redrawn: {e}", file=sys.stderr)
            failed += 1
    if failed:
        raise CgfBertError(f"{failed} of {len(args.records)} records not redrawn (each said why above)")


if __name__ == "__main__":
    run_main(main)
