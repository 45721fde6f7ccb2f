"""The package's import graph, read from the source (ast): no cycles, and no layer imports one above it.

Layers, bottom to top (each package's ``__init__`` docstring says the same):
scaling, utils < nn < data < weights < training < estimators < jobs < cli < the top-level package.
Function-level (lazy) imports count like module-level ones: a lazy import upwards is still an upward import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "effsk"

LAYERS = [
    ("effsk.scaling", "effsk.utils", "effsk._version"),
    ("effsk.nn",),
    ("effsk.data",),
    ("effsk.weights",),
    ("effsk.training",),
    ("effsk.estimators",),
    ("effsk.jobs",),
    ("effsk.cli",),
    ("effsk", "effsk.__main__"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _layer(module: str) -> int:
    best, depth = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer; add it to LAYERS in {__file__}")
    return best


def _imports(module: str) -> set[str]:
    """effsk modules that ``module`` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(target)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer_and_every_package_says_what_it_owns():
    for module, path in MODULES.items():
        _layer(module)
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc.split()) >= 12, f"{module}/__init__.py needs a docstring saying what it owns"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(module):
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports higher layers: " + ", ".join(
        f"{t} (layer {_layer(t)})" for t in upward
    )


def test_no_import_cycles():
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_upward_and_circular_imports(tmp_path):
    # The checks above must be able to fail: feed them a graph with a known violation.
    assert _layer("effsk.nn.efficientnet") < _layer("effsk.training.loop")
    graph_before = dict(GRAPH)
    try:
        GRAPH["effsk.nn.efficientnet"] = GRAPH["effsk.nn.efficientnet"] | {"effsk.training.loop"}
        with pytest.raises(AssertionError, match="imports higher layers"):
            test_no_module_imports_a_layer_above_its_own("effsk.nn.efficientnet")
        GRAPH["effsk.training.loop"] = GRAPH["effsk.training.loop"] | {"effsk.training.optim"}
        GRAPH["effsk.training.optim"] = GRAPH["effsk.training.optim"] | {"effsk.training.loop"}
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(graph_before)
