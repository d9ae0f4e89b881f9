"""The layer rule of docs/architecture.md, read from the source (ast): every import of every module of
ours, at any depth of the file (function-level imports included), must point down the layer table,
and the module graph must have no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "data_prep", "pipeline", "tune", "benchmarks")
# package -> the packages of ours it must not import (flows: none at all; flows' third-party rule,
# torch only, is tests/unit/flows/test_purity.py).
FORBIDDEN = {
    "flows": {"data_prep", "pipeline", "tune", "benchmarks"},
    "data_prep": {"flows", "pipeline", "tune", "benchmarks"},
    "pipeline": {"tune", "benchmarks"},
    "tune": {"benchmarks"},
    "benchmarks": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that ``name`` imports: ``from pkg import sub`` counts as ``pkg.sub`` when
    that is a module, else as ``pkg`` (its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of ours imports a.b.c (or its package)
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_packages_and_their_imports():
    graph = import_graph()
    assert {"flows", "flows.model", "pipeline.loop", "tune.spec", "data_prep.storage"} <= set(graph)
    assert "pipeline.config" in graph["pipeline.train_state"]  # an edge the code surely has
    assert "flows.objective" in graph["pipeline.step"] or "flows" in graph["pipeline.step"]


def test_no_upward_imports():
    bad = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        for target in sorted(targets)
        if target.split(".")[0] in FORBIDDEN[name.split(".")[0]]
    ]
    assert bad == [], "imports against the layer rule (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
