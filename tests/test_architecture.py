"""The package's import graph, read from the source: no cycles, and imports point down the layers.

Every ``import``/``from ... import`` statement counts, at module level and inside functions
(a function-level import is still a dependency, only a later one).  The layers and what each
may import are the Architecture map of README.md.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import networkx as nx
import pytest

import fxcompile

PACKAGE = Path(fxcompile.__file__).parent

# layer -> the layers it may import (besides itself and fxcompile.errors, which every layer may use)
ALLOWED = {
    "core": set(),
    "frontend": {"core"},
    "runtime": {"core"},
    "passes": {"core", "frontend", "runtime"},
    "deploy": {"core", "frontend", "passes", "runtime"},
    "reports": {"core", "passes", "runtime"},
    "training": {"core", "frontend", "passes", "runtime", "reports", "experiments", "compiler"},
    "experiments": {"core", "frontend", "passes", "runtime", "training", "deploy", "reports", "compiler", ""},
}
FORBIDDEN_FOR_CAPTURE_AND_PASSES = {"training", "deploy", "reports", "experiments"}


def _module_name(path: Path, package: Path) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: Path) -> dict[str, Path]:
    return {_module_name(p, package): p for p in package.rglob("*.py")}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom, modules) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = importer.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    if base.split(".")[0] != importer.split(".")[0]:
        return []
    # "from pkg import sub" imports the submodule when there is one, else a name of pkg
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(package: Path = PACKAGE) -> nx.DiGraph:
    """module -> modules of the same package it imports (module- and function-level)."""
    modules = _modules(package)
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, is_package, node, modules)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == package.name]
            else:
                continue
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    g.add_edge(name, target)
    return g


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_is_read_from_the_source():
    g = import_graph()
    # a negative control for the reader: edges the package certainly has
    assert g.has_edge("fxcompile.core.formats", "fxcompile.core.quantizer")
    assert g.has_edge("fxcompile.deploy.export", "fxcompile.deploy.lower")
    assert g.has_edge("fxcompile.cli", "fxcompile.training.train")  # a function-level import
    assert len(g) > 40


def test_no_import_cycles():
    cycles = list(itertools.islice(nx.simple_cycles(import_graph()), 5))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down_the_layers(layer):
    g = import_graph()
    bad = []
    for module in g:
        if _layer(module) != layer:
            continue
        for target in g.successors(module):
            other = _layer(target)
            if other in (layer, "errors") or other in ALLOWED[layer]:
                continue
            bad.append(f"{module} imports {target}")
    assert not bad, f"{layer} may import only {sorted(ALLOWED[layer] | {'errors'})}: " + "; ".join(bad)


def test_core_and_capture_and_passes_stay_below_the_rest():
    assert ALLOWED["core"] == set()
    for layer in ("frontend", "passes"):
        assert not ALLOWED[layer] & FORBIDDEN_FOR_CAPTURE_AND_PASSES


def test_a_function_level_cycle_is_found(tmp_path):
    """The reader sees imports inside functions and relative imports of submodules."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    g = import_graph(pkg)
    assert g.has_edge("pkg.a", "pkg.sub.b") and g.has_edge("pkg.sub.b", "pkg.a")
    assert list(nx.simple_cycles(g))
