"""The package's architecture as a rule: each sub-package imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "finetuning" / "cgf_bert"

# Lowest first. A unit (a sub-package, or a top-level module) may import from its own unit and
# from units of lower layers; units of one layer never import each other.
LAYERS = (
    ("cgf_bert",),  # the error type
    ("cgf_bert.registry",),  # registries and declared parameters
    ("cgf_bert.approx",),  # the replacement functions and their specs: no transformers, no I/O
    ("cgf_bert.data",),  # tasks and their data
    ("cgf_bert.objective",),  # distillation objectives as data
    ("cgf_bert.config",),  # a run's recipe as values
    ("cgf_bert.model",),  # BERT with the replaced operations
    ("cgf_bert.store",),  # what a run leaves behind
    ("cgf_bert.report",),  # tables and plots from the records
    ("cgf_bert.fhe",),  # encryption: context, slot operations, packing, circuits
    ("cgf_bert.train",),  # the training stack
    ("cgf_bert.analysis",),  # looking inside trained checkpoints (the kernel view fine-tunes to compare)
    ("cgf_bert.hub",),  # students that leave the toolkit: export and its check
    ("cgf_bert.cli",),  # the scripts' flags, over everything
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}

# The one arrow up, on purpose: ``import cgf_bert`` must register the exported students' model type
# with transformers (``AutoModelForSequenceClassification.from_pretrained(folder)`` after it), so the
# package's __init__ imports model.hf, after defining the error type everything below imports.
ALLOWED = {("cgf_bert", "cgf_bert.model")}  # from cgf_bert.model import hf


def unit_of(module: str) -> str:
    """'cgf_bert.train.engine' -> 'cgf_bert.train'; 'cgf_bert.config' -> 'cgf_bert.config'."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def module_name(path: Path, root: Path = PKG.parent) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def imports(path: Path, root: Path = PKG.parent) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, inside functions too; relative imports resolved."""
    tree = ast.parse(path.read_text())
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            mod = ".".join(filter(None, [base, node.module or ""]))
            if node.module is None:  # from . import x: x is a module of the package
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


MODULES = sorted(PKG.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    assert {unit_of(module_name(p)) for p in MODULES} <= set(LAYER)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_flow_one_way(path):
    own = unit_of(module_name(path))
    bad = []
    for line, mod in imports(path):
        if not mod.startswith("cgf_bert"):
            continue
        other = unit_of(mod)
        if other != own and LAYER[other] >= LAYER[own] and (module_name(path), mod) not in ALLOWED:
            bad.append(f"{path.relative_to(PKG)}:{line} imports {mod} ({other} is not below {own})")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_forbidden_arrow(tmp_path):
    """The walk sees imports inside functions and relative ones: a report module reaching train fails."""
    fake = tmp_path / "cgf_bert" / "report" / "tables.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("import numpy\n\ndef f():\n    from ..train import engine\n")
    (_, numpy), (line, mod) = imports(fake, root=tmp_path)
    assert (numpy, line, mod) == ("numpy", 4, "cgf_bert.train")
    assert LAYER[unit_of(mod)] > LAYER[unit_of(module_name(fake, tmp_path))]


@pytest.mark.parametrize("path", sorted((PKG / "approx").rglob("*.py")), ids=lambda p: p.name)
def test_approx_has_no_transformers_and_no_io(path):
    mods = {m.split(".")[0] for _, m in imports(path)}
    assert not mods & {"transformers", "datasets", "json", "pathlib", "os"}, mods
    assert "open(" not in path.read_text()


def test_every_sub_package_says_what_it_owns():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, init
