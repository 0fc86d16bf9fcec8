"""The package's layout, read from its source: no import cycles, no private names across
modules, the worker reached only through its entry points, and modules of one job's size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "evalq"
# Modules that may import from `evalq.worker`: the commands that start a worker.
STARTS_A_WORKER = ("evalq.cli",)
MAX_LINES = 650
MAX_LINES_OF = {"evalq.worker.service": 500}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in `module`, functions included."""
    path = MODULES[module]
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if path.name != "__init__.py":
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return [(target, name, line) for target, name, line in found if target in MODULES]


GRAPH = {module: {target for target, _, _ in _imports(module)} - {module} for module in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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
                components.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return components


def test_the_layout_check_sees_the_package() -> None:
    assert {"evalq", "evalq.schemas", "evalq.worker.service", "evalq.gateway.service"} <= set(MODULES)
    assert "evalq.schemas" in GRAPH["evalq.lifecycle"]


def test_no_import_cycles_counting_imports_inside_functions() -> None:
    assert _cycles() == []


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, name, line in _imports(module)
        if name and name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_only_the_commands_that_start_a_worker_import_from_the_worker_package() -> None:
    reaching = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if not module.startswith("evalq.worker")
        and not any(module == s or module.startswith(s + ".") for s in STARTS_A_WORKER)
        for target in targets
        if target.startswith("evalq.worker")
    )
    assert reaching == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_does_one_job(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES_OF.get(module, MAX_LINES), f"{module} has {lines} lines"


def test_the_gateway_and_the_worker_never_import_each_other() -> None:
    crossing = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        for a, b in (("evalq.gateway", "evalq.worker"), ("evalq.worker", "evalq.gateway"))
        if module.startswith(a) and target.startswith(b)
    )
    assert crossing == []
