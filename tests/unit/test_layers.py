"""The package's imports point down, never in a circle, and take no private names from another module.

Floors, top to bottom: the entry points (main, harness, bootstrap, cli) → api (the wire) → node (the
management node's start-up) → the services (compute, storage, network, plugins) → core → db → wire
(the node ↔ agent contract). The host agent is a
house of its own that shares only ``nimbostack.wire`` with the management side. Every import counts,
those under ``TYPE_CHECKING`` and inside functions too: a circle hidden there is still a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "nimbostack"

FLOORS = {
    "wire": 0,
    "db": 1,
    "core": 2,
    "compute": 3,
    "storage": 3,
    "network": 3,
    "plugins": 3,
    "node": 4,
    "api": 5,
    "web": 5,
    "bootstrap": 6,
    "cli": 6,
    "main": 7,
    "harness": 7,
    "units": 6,
}
# entry points that choose at run time what to load (the agent or the server): their imports
# inside functions are deferred loading, not a way around a circle
LAZY_LOADERS = {"nimbostack.main"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of this package that an imported dotted name lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str, int, bool]]:
    """(imported module, name taken from it or '', line, inside a function) for each import."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name)
                    if target:
                        out.append((target, "", child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    if full in MODULES:
                        out.append((full, "", child.lineno, in_function))
                    elif (target := _resolve(base)) is not None:
                        out.append((target, alias.name, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def _floor(module: str) -> tuple[str, int]:
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else "main"
    # a plugin's host agent part (plugins/<name>/agent.py, and host/ with what runs on the host)
    # belongs to the agent's house
    if part == "agent" or (part == "plugins" and len(parts) > 3 and parts[3] in ("agent", "host")):
        return "agent", -1
    return part, FLOORS.get(part, FLOORS["bootstrap"])


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_floor() -> None:
    unknown = {m for m in MODULES if m != "nimbostack" and _floor(m)[0] not in FLOORS and _floor(m)[0] != "agent"}
    assert not unknown, f"give these a floor in FLOORS: {sorted(unknown)}"


def test_imports_point_down() -> None:
    upward = []
    for module, imports in GRAPH.items():
        room, floor = _floor(module)
        for target, _, line, _ in imports:
            if target == "nimbostack":
                continue
            t_room, t_floor = _floor(target)
            if room == "agent" or t_room == "agent":
                # the agent and the management side share the wire contract only; main starts either
                ok = room == t_room or t_room == "wire" or room == "main"
            else:
                ok = t_floor <= floor
            if not ok:
                upward.append(f"{MODULES[module].relative_to(SRC)}:{line} {module} -> {target}")
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    edges = {m: {t for t, _, _, _ in imps if t != m and t != "nimbostack"} for m, imps in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
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
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_private_names_across_modules() -> None:
    taken = [
        f"{MODULES[module].relative_to(SRC)}:{line} takes {name} from {target}"
        for module, imports in GRAPH.items()
        for target, name, line, _ in imports
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not taken, "private names imported from another module:\n" + "\n".join(taken)


def test_no_imports_inside_functions() -> None:
    """Of the package's own modules: an import in a function is how a circle hides."""
    hidden = [
        f"{MODULES[module].relative_to(SRC)}:{line} imports {target}"
        for module, imports in GRAPH.items()
        if module not in LAZY_LOADERS
        for target, _, line, in_function in imports
        if in_function
    ]
    assert not hidden, "imports inside functions:\n" + "\n".join(hidden)


@pytest.mark.parametrize("module", ["nimbostack.compute.vm", "nimbostack.api.app"])
def test_the_checker_sees_imports(module: str) -> None:
    """The checks above would pass on a graph they failed to read: make sure they read one."""
    assert any(t.startswith("nimbostack.core") for t, _, _, _ in GRAPH[module])


BENCH = SRC.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if p.name != "__init__.py"))
def test_benchmarks_need_only_the_package(script: str) -> None:
    """A newcomer runs them in the venv ``scripts/up`` makes, which has no pytest and no tests/."""
    tree = ast.parse((BENCH / script).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not roots & {"tests", "pytest", "conftest"}, f"{script} imports test code: {roots}"
    # and it starts from anywhere: nothing found through the current directory or a path it adds
    done = subprocess.run(
        [sys.executable, "-I", str(BENCH / script), "--help"], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
