"""The shape of the code: no import cycles among sgdnoise's modules (deferred imports inside
functions count too: they hide a cycle, they do not remove it), and the analysis reads
MLflow without importing the training side: from sgdnoise it takes the contract only."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(base: Path, package: str) -> dict[str, Path]:
    return {_module_name(p, base): p for p in sorted((base / package).rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of `known` that the file imports, at any depth of its code."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from pkg import mod` imports pkg and, where it is a module, pkg.mod.
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` imports a.b.c, its packages too
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_sgdnoise_modules() -> None:
    modules = _modules(SRC, "sgdnoise")
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    # A package's __init__ that imports its own submodule is not a cycle between modules.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name and t.startswith(name + "."))}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_analysis_imports_nothing_from_sgdnoise_but_the_contract() -> None:
    known = set(_modules(SRC, "sgdnoise"))
    used = {
        name: {t for t in _imports(path, name, known) if t.startswith("sgdnoise")}
        for name, path in _modules(REPO, "analysis").items()
    }
    assert {n: u for n, u in used.items() if u - {"sgdnoise", "sgdnoise.contract"}} == {}
    assert any("sgdnoise.contract" in u for u in used.values())  # the check sees imports
