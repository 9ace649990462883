"""The package's layers: imports flow toward the pure core, and the import graph has no cycle.

Every import counts, including ones inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "art_ray_metrics"

# rank of each layer: a module may import its own layer or a lower one, never a higher one
RANKS = {
    "errors": 0,
    "core": 1,
    "config": 1,
    "spend": 2,
    "builder": 3,
    "durable": 3,
    "export": 4,
    "distributed": 5,
    "integrations": 6,
    "art": 6,
    "ops": 7,
    "testing": 8,
    "__init__": 9,
    "__main__": 9,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Modules of this package that ``path`` imports, resolved to module names."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("art_ray_metrics")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("art_ray_metrics"):
                continue
            for alias in node.names:  # `from pkg import module` names a module
                sub = f"{mod}.{alias.name}"
                found.add(sub if _exists(sub) else mod)
    return {m for m in found if m != me and _exists(m)}


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    base = PACKAGE.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


@functools.cache
def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_layer_is_ranked() -> None:
    """A new subpackage must be given its place in the layering."""
    assert {_layer(m) for m in _graph()} <= set(RANKS)


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_flow_toward_the_core(module: str) -> None:
    """No module imports from a layer above its own."""
    mine = RANKS[_layer(module)]
    upward = [m for m in _graph()[module] if RANKS[_layer(m)] > mine]
    assert not upward, f"{module} imports {upward} from a higher layer"


def test_import_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is not a cycle between layers
            if nxt.startswith(node + ".") and node.count(".") == 0:
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_core_is_pure() -> None:
    """core/ imports only the standard library, msgpack, numpy and itself (and errors)."""
    import sys

    allowed = {"msgpack", "numpy", "__future__"}
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "art_ray_metrics":
                    assert name.startswith(("art_ray_metrics.core", "art_ray_metrics.errors")), (
                        f"{path.name} imports {name}"
                    )
                else:
                    assert top in sys.stdlib_module_names or top in allowed, (
                        f"{path.name} imports {name}"
                    )
