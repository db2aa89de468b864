"""The house of layers: every module imports only its own layer and the layers below it, no layer has an import
cycle, a head family imports no other family, and nothing but the plugin registry imports by name.

Parsed from the source (every import, the ones inside functions too), so a new upward import fails here before it
can make a change ripple. The layers, from the bottom:
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "cache")

#: (layer, the module prefixes in it), bottom first; a module belongs to the longest prefix that names it
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("base", ("pipeline", "pipeline.errors", "pipeline.fsutil", "pipeline.registry", "pipeline.runtime",
              "pipeline.configio", "pipeline.reporting", "pipeline.tracking", "pipeline.plugins")),
    ("config", ("pipeline.config",)),
    ("cache", ("cache",)),
    ("data", ("pipeline.data",)),
    ("features", ("pipeline.features",)),
    ("core", ("pipeline.core",)),
    ("head families", ("pipeline.heads",)),
    ("engine", ("pipeline.evaluation",)),
    ("commands", ("stages",)),
)
#: the only module that imports modules by name (the registries' discovery of built-ins and installed plugins)
DISCOVERY = "pipeline.plugins"


def _modules() -> Dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> Set[str]:
    """Every project module `module` imports at run time (from x import y counts y where y is a module)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: Set[str] = set()
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
                   for inner in ast.walk(node)}  # annotations only: never run, so never a cycle
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import pipeline.core.train` names the module; trim attributes
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES and name != module:
                out.add(name)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def layer_of(module: str) -> int:
    best = max(((len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def family_of(module: str) -> str:
    """The head family package a module belongs to ('' outside pipeline/heads/<family>/)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["pipeline", "heads"] else ""


def test_every_module_has_a_layer():
    assert len(MODULES) > 40
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_nothing_above_its_layer(module):
    mine = layer_of(module)
    upward = sorted(f"{name} ({LAYERS[layer_of(name)][0]})" for name in GRAPH[module] if layer_of(name) > mine)
    assert not upward, f"{module} ({LAYERS[mine][0]}) imports above its layer: {', '.join(upward)}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the whole graph: every component is a single module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_a_head_family_imports_no_other_family_and_the_contract_none():
    for module, names in GRAPH.items():
        if module.startswith("pipeline.heads."):
            others = {family_of(n) for n in names if family_of(n)} - {family_of(module)}
            assert not others, f"{module} imports the head family {sorted(others)}"


def test_only_the_registry_imports_by_name():
    for module, path in MODULES.items():
        if module != DISCOVERY:
            text = path.read_text()
            assert "import_module(" not in text and "__import__(" not in text, \
                f"{module} imports by name: register an entry in {DISCOVERY} instead"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The oracle is not vacuous: a core module importing the engine, even inside a function, is caught."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from pipeline.evaluation.engine import cross_validate\n")
    names = _imports("pipeline.core.probe", path)
    assert names == {"pipeline.evaluation.engine"}
    assert layer_of("pipeline.evaluation.engine") > layer_of("pipeline.core.probe")


def test_every_module_has_one_job_in_at_most_500_lines():
    long = {module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, f"split these modules by job: {long}"
