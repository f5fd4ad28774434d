"""The package map the README draws is the one the code has: which package may import which, no import cycle,
`core` (and the toy world) without Ray, and function-level imports only for optional dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "toyworld", "actors", "learner", "reward_service", "serve", "job")
MODULES = ("weight_sync", "launch")

# who may import whom (top-level units; every unit may import itself). launch.py, the CLI, wires them all.
ALLOWED = {
    "core": set(),
    "toyworld": {"core"},
    "weight_sync": set(),
    "reward_service": {"core"},
    "serve": {"core", "learner"},  # learner.checkpointing: a replica following a run reads its checkpoints
    "actors": {"core", "reward_service", "weight_sync"},
    "learner": {"core", "weight_sync"},
    "job": {"core", "actors", "learner", "reward_service", "serve"},
    "launch": {"core", "toyworld", "actors", "learner", "reward_service", "serve", "job", "weight_sync"},
}


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the project (tests and benchmarks excluded)."""
    found = {m: REPO / f"{m}.py" for m in MODULES}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name belongs to (`a.b.c` -> the longest project module prefix)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def module_imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], list[str]]:
    """(project modules imported at module level, function-level import lines without an 'optional' note)."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    in_functions = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    edges, unexplained = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if id(node) in in_functions:
            if "optional" not in lines[node.lineno - 1]:
                unexplained.append(f"{path.relative_to(REPO)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module else []
        edges |= {m for m in map(lambda n: _resolve(n, modules), names) if m is not None}
    return edges, unexplained


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = project_modules()
    graph, unexplained = {}, []
    for name, path in modules.items():
        edges, bad = module_imports(path, modules)
        graph[name] = edges - {name}
        unexplained += bad
    return graph, unexplained


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_acyclic_and_follows_the_package_map():
    graph, _ = import_graph()
    assert "core.model.wan" in graph and "toyworld.evaluate" in graph and "weight_sync" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    wrong = sorted(f"{a} imports {b}" for a, edges in graph.items() for b in edges
                   if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]])
    assert not wrong, "imports the package map does not allow (docs/architecture.md):\n" + "\n".join(wrong)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_function_level_imports_are_only_for_optional_dependencies():
    _, unexplained = import_graph()
    assert not unexplained, ("function-level imports hide structure; import at module level, or say on the line why "
                             "the dependency is optional:\n" + "\n".join(unexplained))


def test_every_module_imports_in_a_fresh_interpreter_and_core_without_ray():
    """All modules import in one fresh interpreter; `core` and the toy world, imported first, pull in no Ray."""
    names = sorted(project_modules(), key=lambda m: (m.split(".")[0] not in ("core", "toyworld"), m))
    code = ("import importlib, sys\n"
            f"names = {names!r}\n"
            "for name in names:\n"
            "    if name.split('.')[0] not in ('core', 'toyworld'):\n"
            "        bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'deepspeed'))\n"
            "        assert not bad, f'core or toyworld imported {bad[:5]}'\n"
            "        break\n"
            "    importlib.import_module(name)\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
