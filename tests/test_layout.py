"""The package's layering: imports point one way, no module imports itself back, and reading
results needs no torch."""

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


def _module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the patronus modules it imports, for every module in the package.

    What counts as an edge: every `import` statement in the file, wherever it stands: at the
    top, inside a function (a lazy import) or under `if TYPE_CHECKING:`, absolute or relative.
    `from a.b import c` is an edge to the module `a.b.c` when there is one, else to `a.b` (its
    `__init__`). Not counted: the parent packages' `__init__` modules that Python runs before
    a submodule (every module would otherwise sit on a cycle through its own package), and
    imports by name in strings (`importlib.import_module`, `DEFENSES`)."""
    files = {_module_of(f, root): f for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, f in files.items():
        package = module if f.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[module] = {e for e in edges if e in files and e != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one node (Tarjan), each one a cycle or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_anywhere_in_the_package():
    """Not between parts, not between two files of one part, not through a lazy or a
    type-checking import."""
    graph = _module_graph()
    assert {"patronus.attacks.config", "patronus.attacks.registry", "patronus.attacks.kinds"} <= set(graph)
    assert "patronus.attacks.kinds" in graph["patronus.attacks.config"]  # edges are found
    cycles = _cycles(graph)
    assert not cycles, "import cycles among: " + "; ".join(", ".join(c) for c in cycles)


def test_the_cycle_finder_sees_lazy_type_checking_and_relative_imports(tmp_path):
    pkg = tmp_path / "patronus"
    (pkg / "part").mkdir(parents=True)
    for f in ("__init__.py", "part/__init__.py", "low.py"):
        (pkg / f).write_text("")
    (pkg / "part" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from patronus.part.b import B\n")
    (pkg / "part" / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "part" / "c.py").write_text("from patronus import low\nfrom ..part import a\n")
    graph = _module_graph(pkg)
    assert graph["patronus.part.c"] == {"patronus.low", "patronus.part.a"}
    assert _cycles(graph) == [["patronus.part.a", "patronus.part.b"]]


def test_only_the_front_ends_import_the_public_api():
    """`patronus.api` sits on top of the layers: the package root (lazily), the CLI and the demo use it."""
    graph = _module_graph()
    users = sorted(m for m, edges in graph.items() if "patronus.api" in edges)
    assert set(users) <= {"patronus", "patronus.cli", "patronus.demo"}, users


def test_importing_patronus_imports_no_torch():
    code = ("import sys, patronus; patronus.__version__; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'diffusers'))); "
            "print(bad[:3]); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, f"import patronus pulls in torch: {run.stdout} {run.stderr[-500:]}"


def test_lower_layers_do_not_reach_up():
    graph = _import_graph()
    # The bottom of the data flow knows nothing of what is built on it.
    bottom = {"errors", "version", "io", "imaging", "config", "modelcard", "world"}
    for low in ("errors", "version", "config", "io", "imaging", "modelcard", "provenance", "training", "world"):
        assert not graph[low] - bottom, (low, graph[low])
    assert not graph["nft"] & {"defenses", "attacks", "sweep", "evaluation", "report"}  # component-agnostic
    assert not graph["attacks"] & {"defenses", "sweep", "evaluation", "report"}
    assert not graph["evaluation"] & {"defenses", "attacks", "sweep", "report"}
    assert not graph["defenses"] & {"sweep", "report", "demo", "cli"}


def test_reading_results_imports_no_torch():
    code = ("import sys, patronus.report, patronus.sweep.results, patronus.sweep.layout, patronus.modelcard; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "print(bad[:3]); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, f"report / sweep results import torch: {run.stdout} {run.stderr[-500:]}"
