"""The package's layering: imports point one way, and reading results needs no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import patronus

ROOT = Path(patronus.__file__).parent


def _top_level(module: str) -> str:
    """`patronus.sweep.cell` -> `sweep`; the unit the layering is about."""
    return module.split(".")[1]


def _import_graph() -> dict[str, set[str]]:
    """Top-level part -> the other top-level parts its modules import (at any depth in the file)."""
    graph: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        part = rel.parts[0].removesuffix(".py")
        if part in ("__init__", "__main__"):
            continue
        graph.setdefault(part, set())
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("patronus.") and _top_level(name) != part:
                    graph[part].add(_top_level(name))
    return graph


def test_no_import_cycles_between_top_level_parts():
    graph = _import_graph()
    assert {"nft", "defenses", "attacks", "sweep", "evaluation", "models", "world"} <= set(graph)
    visiting, done, cycles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in visiting:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        visiting.add(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_lower_layers_do_not_reach_up():
    graph = _import_graph()
    # The bottom of the data flow knows nothing of what is built on it.
    for low in ("errors", "config", "io", "imaging", "provenance", "training", "world"):
        assert not graph[low] - {"errors", "io", "imaging", "config", "world"}, (low, graph[low])
    assert not graph["nft"] & {"defenses", "attacks", "sweep", "evaluation", "report"}  # component-agnostic
    assert not graph["attacks"] & {"defenses", "sweep", "evaluation", "report"}
    assert not graph["evaluation"] & {"defenses", "attacks", "sweep", "report"}
    assert not graph["defenses"] & {"sweep", "report", "demo", "cli"}


def test_reading_results_imports_no_torch():
    code = ("import sys, patronus.report, patronus.sweep.results, patronus.sweep.layout; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "print(bad[:3]); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, f"report / sweep results import torch: {run.stdout} {run.stderr[-500:]}"
