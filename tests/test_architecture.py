"""The architecture, checked on the source: the job layer sits on top, nothing below reaches up, and no two of
zsadbench's modules import each other in a circle.

The import graph is read from the source files (every ``import`` statement, also inside functions; imports under
``if TYPE_CHECKING:`` are left out because they never run), with methods/ and datasets/ mapped into the zsadbench
namespace as the package installs them. ``python -m pytest tests/test_architecture.py -v`` is the command that
proves the rules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"zsadbench": ROOT / "zsadbench", "zsadbench.methods": ROOT / "methods",
           "zsadbench.datasets": ROOT / "datasets"}
JOB_LAYER = ("zsadbench.jobs", "zsadbench.tracking", "zsadbench.runs", "zsadbench.report", "zsadbench.cli", "mlflow")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for file in folder.rglob("*.py"):
            parts = file.relative_to(folder).with_suffix("").parts
            if package == "zsadbench" and parts[0] in ("methods", "datasets"):
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = file
    return out


def _runtime_imports(tree: ast.AST, module: str) -> Iterator[str]:
    """Yields the modules a file imports at run time (TYPE_CHECKING blocks skipped, relative imports resolved)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for other in node.orelse:
                yield from _runtime_imports(other, module)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        yield from _runtime_imports(node, module)


def import_graph() -> dict[str, set[str]]:
    """Returns module -> the zsadbench modules (and external top-level packages) it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        targets = set()
        for imported in _runtime_imports(ast.parse(file.read_text()), name):
            if imported.startswith("zsadbench"):
                while imported not in modules and "." in imported:  # `from pkg import name` names an attribute
                    imported = imported.rsplit(".", 1)[0]
                if imported in modules and imported != name:
                    targets.add(imported)
            else:
                targets.add(imported.split(".")[0])
        graph[name] = targets
    return graph


GRAPH = import_graph()


def reachable(start: str) -> dict[str, list[str]]:
    """Returns every module ``start`` imports directly or indirectly, with one import chain leading to it."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        for nxt in GRAPH.get(current, ()):
            if nxt not in chains:
                chains[nxt] = [*chains[current], nxt]
                todo.append(nxt)
    return chains


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize(("sources", "forbidden"), [
    (("zsadbench.methods", "zsadbench.clip", "zsadbench.detector", "zsadbench.training"), JOB_LAYER),
    (("zsadbench.evaluation", "zsadbench.metrics"), (*JOB_LAYER, "zsadbench.methods")),
    (("zsadbench.datasets",), ("zsadbench.methods", *JOB_LAYER)),
])
def test_lower_layers_never_reach_the_job_layer(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    violations = [" -> ".join(chain) for module in GRAPH if _in(module, sources)
                  for target, chain in reachable(module).items() if _in(target, forbidden)]
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


def test_metrics_import_no_torch() -> None:
    assert not [c for t, c in reachable("zsadbench.metrics").items() if t == "torch"]


def _sibling(module: str) -> str:
    """Returns the direct child of zsadbench a module belongs to (zsadbench.clip.text -> zsadbench.clip)."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycles_between_modules() -> None:
    siblings: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        if module == "zsadbench":
            continue
        for target in targets:
            if target.startswith("zsadbench.") and _sibling(target) != _sibling(module):
                siblings.setdefault(_sibling(module), set()).add(_sibling(target))
    cycles = []
    for start in siblings:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in siblings.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:10])


def test_the_graph_is_read_from_the_source() -> None:
    """The checks above are not vacuous: known imports are seen, a planted circle is found."""
    assert "zsadbench.evaluation" in GRAPH["zsadbench.jobs"]
    assert "zsadbench.clip.backbone" in reachable("zsadbench.methods.winclip")
    assert "zsadbench.detector" in GRAPH["zsadbench.methods.musc"]
    planted = ast.parse("def f():\n    from zsadbench.jobs import run\n")
    assert "zsadbench.jobs" in set(_runtime_imports(planted, "zsadbench.detector"))
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from zsadbench.jobs import run\n")
    assert "zsadbench.jobs" not in set(_runtime_imports(guarded, "zsadbench.detector"))
