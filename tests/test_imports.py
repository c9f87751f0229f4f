"""The house rules of the import graph, read from the source (imports inside functions
included): no import cycle, no private name imported across top-level folders, and the
pipeline never imports the engines or the benchmarks except from its command line (the
`attnseg.pipeline.cli` package)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("kernels", "pipeline", "engines", "bench")


def _modules() -> dict[str, Path]:
    mods = {}
    for folder in FOLDERS:
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            mods[".".join(["attnseg", folder, *parts])] = f
    return mods


def _imports(mods: dict[str, Path]):
    """(importer, imported module, imported name or None) for every import of attnseg code."""
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")
                    keep = len(base) - node.level + (path.name == "__init__.py")
                    target = ".".join(base[:keep] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    yield mod, (sub if sub in mods else target), alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield mod, alias.name, None


def _graph():
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, target, name in _imports(mods):
        if target in mods and target != mod:
            edges[mod].add(target)
            if name and name.startswith("_") and target.split(".")[1] != mod.split(".")[1]:
                private.append(f"{mod} imports {name} from {target}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    edges, _ = _graph()
    assert len(edges) > 40  # the source was found
    assert _cycles(edges) == []


def test_no_private_name_crosses_a_top_level_folder():
    assert _graph()[1] == []


def test_pipeline_imports_engines_and_bench_only_from_its_command_line():
    edges, _ = _graph()
    upward = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts
                    if m.startswith("attnseg.pipeline.")
                    and not (m + ".").startswith("attnseg.pipeline.cli.")
                    and t.split(".")[1] in ("engines", "bench"))
    assert upward == []


def test_the_checks_see_a_cycle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
