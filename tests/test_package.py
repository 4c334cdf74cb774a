"""The package as users get it: one import name, no import circles, an install that lives next to
other people's ``data`` and ``train`` packages.

The import graph is read from the source (``ast``), not by importing: every ``import`` /
``from ... import`` statement of a module counts, at module level *and* inside functions, because a
function-level import only delays a circle (the two this test was written for, flows.cliutil <->
flows.config and train.config <-> train.losses, each had one side inside a function). Imports through
``importlib.import_module`` strings (lazy package faces) are not statements and are not counted.
``from pkg import name`` depends on the submodule ``pkg.name`` when that is a module, else on ``pkg``.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def package_modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the distribution (``tailforge.x.y`` -> its source file), from pyproject's mapping."""
    conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = conf.get("package-dir", {})
    mods = {}
    for pkg in conf["packages"]:
        folder = root / dirs.get(pkg, pkg.replace(".", "/"))
        for f in sorted(folder.glob("*.py")):
            mods[pkg if f.name == "__init__.py" else f"{pkg}.{f.stem}"] = f
    return mods


def module_imports(name: str, path: Path, known) -> dict[str, int]:
    """Modules of the package that ``name`` imports -> line of the first such import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                out.setdefault(t, node.lineno)
    return out


def import_graph(root: Path = REPO) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    mods = package_modules(root)
    return {m: module_imports(m, p, mods) for m, p in mods.items()}, mods


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a closed path ``a -> b -> ... -> a``) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package has ~60 modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # shortest way back to the start, inside the group (breadth first)
        start = min(group)
        prev = {start: None}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    cycles.append(path[::-1] + [start])
                    queue = []
                    break
                if w in group and w not in prev:
                    prev[w] = v
                    queue.append(w)
    return cycles


def describe(cycle: list[str], graph, mods, root: Path = REPO) -> str:
    steps = [f"{a} ({mods[a].relative_to(root).as_posix()}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps) + f" -> {cycle[-1]}"


def test_the_package_has_no_import_circles():
    graph, mods = import_graph()
    assert "tailforge" in mods and "tailforge.eval.filter" in mods and len(mods) > 30
    assert graph["tailforge.flows.cli"], "the walk found no imports at all: the parser is broken"
    cycles = find_cycles(graph)
    assert not cycles, "import circles (move what both sides need to the lower module):\n" + "\n".join(
        describe(c, graph, mods) for c in cycles)


def test_the_cycle_finder_names_a_planted_circle(tmp_path):
    """The checker itself: a function-level import closing a circle is found and named with its lines."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackages = ["tailforge", "tailforge.a"]\n'
                                             '[tool.setuptools.package-dir]\ntailforge = "pkg"\n"tailforge.a" = "a"\n')
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "__init__.py").write_text("from . import low  # the face\n")
    (tmp_path / "a" / "low.py").write_text("def f():\n    from tailforge.a.high import g\n    return g\n")
    (tmp_path / "a" / "high.py").write_text("from .low import f\n")
    graph, mods = import_graph(tmp_path)
    assert graph["tailforge.a"] == {"tailforge.a.low": 1}
    cycles = find_cycles(graph)
    assert cycles == [["tailforge.a.high", "tailforge.a.low", "tailforge.a.high"]]
    assert describe(cycles[0], graph, mods, tmp_path) == ("tailforge.a.high (a/high.py:1) -> tailforge.a.low (a/low.py:2) "
                                                "-> tailforge.a.high")
