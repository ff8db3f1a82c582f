"""The house's shape holds: imports between pipeline's modules, and between its folders, flow one way
(no circles, lazy imports inside functions included), and no production module imports a test or
pipeline.testing (the fixtures the quickstart and the tests use)."""

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports() -> dict[str, set[str]]:
    """{module: the pipeline (and tests) modules it imports, anywhere in its code}."""
    found = defaultdict(set)
    for path in (REPO / "pipeline").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "pipeline" else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found[module] |= {n for n in names if n.split(".")[0] in ("pipeline", "tests")}
    return found


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def folder(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])  # pipeline.X: a folder, or a top-level module


def test_modules_import_one_way():
    edges = {m: {d for d in deps if d.startswith("pipeline.")} for m, deps in imports().items()}
    modules = set(edges) | {d for deps in edges.values() for d in deps}
    edges = {m: {d if d in modules else d.rsplit(".", 1)[0] for d in deps} - {m} for m, deps in edges.items()}
    assert circles(edges) == []


def test_folders_import_one_way():
    edges = defaultdict(set)
    for module, deps in imports().items():
        edges[folder(module)] |= {folder(d) for d in deps if d.startswith("pipeline.")} - {folder(module), "pipeline"}
    assert circles(edges) == []


def test_no_production_module_imports_a_test_or_a_fixture():
    bad = {m: sorted(d for d in deps if d.startswith(("tests", "pipeline.testing")))
           for m, deps in imports().items() if not m.startswith("pipeline.testing")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
