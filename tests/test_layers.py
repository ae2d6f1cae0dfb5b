"""The package's layers import downward only, function-level imports included.

Imports are read from the source (``ast``), so an import hidden inside a function to dodge a
cycle counts like any other.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import stkd_dist

ROOT = Path(stkd_dist.__file__).parent

# the data flow, lowest first: a layer may import only layers before it (and itself)
LAYERS = [
    "serving",  # the teacher service: server, client, label cache
    "labels",  # teachers of a student: naming, checking, replicas, label sources
    "train",  # trainers on Ray Train
    "pipeline",  # stages of distill and sweep
    "commands",  # the CLI's commands
]


def _module(path: Path) -> str:
    return ".".join(("stkd_dist", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(
        ".__init__"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every ``stkd_dist`` module ``path`` imports, at any depth of its code
    (``from package import module`` counts as importing the module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in modules] or [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules}
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py") if "proto_gen" not in p.parts}
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in modules.items():
        graph[mod] = {m for m in _imports(path, set(modules)) if m != mod}
    return graph


def _layer(module: str) -> str | None:
    part = module.split(".")[1] if "." in module else ""
    return part if part in LAYERS else None


def test_layers_import_downward_only() -> None:
    wrong = []
    for mod, deps in _graph().items():
        mine = _layer(mod)
        if mine is None:
            continue
        for dep in deps:
            theirs = _layer(dep)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_module_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
