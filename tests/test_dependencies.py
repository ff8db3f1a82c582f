"""Runtime dependencies are what the pipeline itself imports: every third-party module that a
module of pipeline/ imports comes from a distribution [project].dependencies names (or, for
--quantization, its extra), and what only the tests, the fault harness and the benchmarks use
(psutil, moto, pytest, ...) stays in their extras."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=~!; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def pipeline_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the pipeline/ files that import it (inside functions too)."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for m in modules:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top != "pipeline":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_module_pipeline_imports_is_a_declared_runtime_dependency():
    declared = names(PROJECT["dependencies"]) | names(PROJECT["optional-dependencies"]["quantization"])
    providers = importlib.metadata.packages_distributions()
    undeclared = {m: files for m, files in pipeline_imports().items()
                  if not {d.lower().replace("_", "-") for d in providers.get(m, [m])} & declared}
    assert not undeclared, f"pipeline/ imports modules no runtime dependency provides: {undeclared}"


def test_the_fault_harness_dependencies_are_extras_not_runtime():
    runtime, extras = names(PROJECT["dependencies"]), PROJECT["optional-dependencies"]
    assert "psutil" not in runtime and "psutil" not in pipeline_imports()
    assert {"psutil", "moto"} <= names(extras["faults"]) and {"psutil", "moto"} <= names(extras["test"])
    assert not {"pytest", "moto", "duckdb", "matplotlib"} & runtime
