"""The package table of DESIGN.md, enforced: every appmult import points down.

Walks the AST of every module under ``appmult/``, function bodies included, and fails on

(a) an import of an appmult package that the importing package may not use, and
(b) an import of another package's private module (``_name``) or private name.

A function-local import is not a way around the table: it is checked like any other.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

import appmult

ROOT = Path(appmult.__file__).parent

PACKAGES = {"hdl", "sim", "lut_gen", "tb", "nn", "train", "methods", "explore", "flows", "cli"}

# package -> packages it may import (besides itself and the base modules).
ALLOWED = {
    "base": set(),
    "hdl": set(),
    "sim": {"hdl"},
    "lut_gen": set(),
    "tb": {"hdl", "lut_gen"},
    "nn": {"lut_gen"},
    "train": set(),
    "methods": {"lut_gen", "nn", "train"},
    "explore": {"hdl", "sim", "lut_gen"},
    "flows": {"hdl", "sim", "lut_gen", "tb", "nn", "train", "methods", "explore"},
    "cli": PACKAGES | {"demo"},
    "demo": PACKAGES,
}


def room(parts: tuple[str, ...]) -> str:
    """The room of a module given its dotted path below ``appmult`` (``("nn", "layers")`` -> ``nn``)."""
    if parts and parts[0] in PACKAGES | {"demo"}:
        return parts[0]
    if parts and parts[0] == "__main__":
        return "cli"  # `python -m appmult` is the command line
    return "base"  # the base modules, and names of the root package such as __version__


def _resolve(module: str, node: ast.ImportFrom | ast.Import, alias: ast.alias) -> list[tuple[str, ...]]:
    """Dotted targets (below appmult) of one import, with the imported name last where it may be a module."""
    pkg = module.split(".")
    if isinstance(node, ast.Import):
        name = alias.name.split(".")
        return [tuple(name[1:])] if name[0] == "appmult" else []
    if node.level:
        # `module` is the importing module's dotted name; a relative import climbs from its package.
        base = pkg[:-node.level] if node.level <= len(pkg) else []
        target = base + (node.module.split(".") if node.module else [])
    else:
        target = node.module.split(".") if node.module else []
        if not target or target[0] != "appmult":
            return []
        target = ["appmult"] + target[1:]
    if not target or target[0] != "appmult":
        return []
    return [tuple(target[1:]) + (alias.name,)]


def violations(source: str, module: str) -> list[str]:
    """Rule violations of one module's source; ``module`` is its dotted name (``appmult.nn.layers``)."""
    tree = ast.parse(source)
    mine = room(tuple(module.split(".")[1:]))
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for alias in node.names:
            for target in _resolve(module, node, alias):
                if not target:
                    continue
                theirs = room(target)
                if theirs not in (mine, "base") and theirs not in ALLOWED.get(mine, set()):
                    problems.append(f"{module}:{node.lineno}: {mine} may not import {theirs} "
                                    f"(appmult.{'.'.join(target)})")
                    continue
                if theirs != mine and any(p.startswith("_") and not p.startswith("__") for p in target):
                    problems.append(f"{module}:{node.lineno}: private appmult.{'.'.join(target)} "
                                    f"imported from another package")
    return problems


# Function-local imports of another appmult package, allowed only where the import time
# matters and named here with the reason. The command line (cli, demo) imports lazily
# everywhere so that `appmult --help` starts at once.
LOCAL_IMPORTS_ALLOWED = {
    # Config modules the CLI reads its defaults from: they must not import torch at import
    # time, but validate names (models, data sets, grad modes) defined next to torch code.
    "appmult.flows.retrain_config",
    "appmult.flows.assign_config",
    "appmult.flows.explore_config",
}


def local_imports(source: str, module: str) -> list[str]:
    """Function-local imports of another appmult package (a way around import-time order)."""
    mine = room(tuple(module.split(".")[1:]))
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    for target in _resolve(module, node, alias):
                        if target and room(target) not in (mine, "base"):
                            found.append(f"{module}:{node.lineno}: function-local import of "
                                         f"appmult.{'.'.join(target)}")
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] + ["__init__"]
        out.append(("appmult." + ".".join(parts), path))
    return out


def test_every_module_respects_the_package_table():
    problems = []
    for name, path in modules():
        problems += violations(path.read_text(encoding="utf-8"), name)
    assert not problems, "\n".join(problems)


def test_function_local_imports_only_where_named():
    problems = []
    for name, path in modules():
        if room(tuple(name.split(".")[1:])) in ("cli", "demo") or name in LOCAL_IMPORTS_ALLOWED:
            continue
        problems += local_imports(path.read_text(encoding="utf-8"), name)
    assert not problems, "\n".join(problems)


def test_function_local_import_is_found():
    source = "def f():\n    from ..sim import synthesize\n"
    assert local_imports(source, "appmult.explore.planted") == [
        "appmult.explore.planted:2: function-local import of appmult.sim.synthesize"]
    assert local_imports("def f():\n    from .registry import FAMILIES\n", "appmult.hdl.planted") == []


def test_every_package_is_in_the_table():
    rooms = {room(tuple(name.split(".")[1:])) for name, _ in modules()}
    assert rooms <= set(ALLOWED), rooms - set(ALLOWED)


@pytest.mark.parametrize("module, source, message", [
    # An upward import hidden in a function body, as `hdl/mac.py` once had.
    ("appmult.hdl.planted", """
        def lut_of(m):
            from ..tb.runner import pack_lanes
            return pack_lanes
        """, "appmult.hdl.planted:3: hdl may not import tb (appmult.tb.runner.pack_lanes)"),
    ("appmult.nn.planted", "import appmult.hdl\n", "appmult.nn.planted:1: nn may not import hdl (appmult.hdl)"),
    ("appmult.lut_gen.planted", """
        def f():
            from appmult.sim import synthesize
        """, "appmult.lut_gen.planted:3: lut_gen may not import sim (appmult.sim.synthesize)"),
    ("appmult.codes", "from .nn import ApproxConfig\n", "appmult.codes:1: base may not import nn"),
    ("appmult.flows.planted", "from ..hdl._base import Multiplier\n",
     "appmult.flows.planted:1: private appmult.hdl._base.Multiplier imported from another package"),
    ("appmult.flows.planted", "from ..nn.functional import _pair\n",
     "appmult.flows.planted:1: private appmult.nn.functional._pair imported from another package"),
])
def test_planted_violation_is_caught(module, source, message):
    found = violations(textwrap.dedent(source), module)
    assert any(p.startswith(message) for p in found), found


@pytest.mark.parametrize("module, source", [
    ("appmult.flows.planted", "from ..tb import run_mac\nfrom ..nn import ApproxConv2d\n"),
    ("appmult.hdl.planted", "from ..codes import wrap_value\nfrom ._base import Multiplier\n"),
    ("appmult.methods.planted", "def f():\n    from ..train import fit\n"),
    ("appmult.nn.planted", "import torch\nfrom numba import njit\n"),
])
def test_allowed_imports_pass(module, source):
    assert violations(source, module) == []


def test_planted_module_in_a_temporary_tree_fails(tmp_path):
    """The walk over files finds a violating module written to disk (not just a source string)."""
    pkg = tmp_path / "appmult" / "hdl"
    pkg.mkdir(parents=True)
    bad = pkg / "planted.py"
    bad.write_text("def f():\n    from ..lut_gen.lutfile import LutFile\n    return LutFile\n")
    assert violations(bad.read_text(), "appmult.hdl.planted") == [
        "appmult.hdl.planted:2: hdl may not import lut_gen (appmult.lut_gen.lutfile.LutFile)"]
