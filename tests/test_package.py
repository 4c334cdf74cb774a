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
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
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


def test_stages_import_data_freely_and_nothing_imports_flows():
    """DESIGN.md's layering: ``data`` at the bottom imports no other stage; ``flows`` wires everything and no
    stage imports it back."""
    graph, mods = import_graph()
    wrong = []
    for a, targets in graph.items():
        for b, line in targets.items():
            upward = b.startswith("tailforge.flows") and not a.startswith("tailforge.flows")
            sideways = a.startswith("tailforge.data") and not b.startswith("tailforge.data")
            if upward or sideways:
                wrong.append(f"{a} ({mods[a].relative_to(REPO).as_posix()}:{line}) imports {b}")
    assert not wrong, "\n".join(wrong)


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


# --------------------------------------------------------------------------- a plain (non-editable) install

CHECK = """
import sys
import data, train                      # someone else's top-level packages of those names
import tailforge, tailforge.data, tailforge.train

assert data.WHO == "dummy data", data.__file__
assert train.WHO == "dummy train", train.__file__
for module in (tailforge, tailforge.data, tailforge.train):
    assert module.__file__.startswith(sys.argv[1]), module.__file__ + " is not the installed copy"
assert "balanced_softmax" in tailforge.train.LOSSES and tailforge.data.RunDir
print("ok")
"""


def copy_sources(dst: Path) -> Path:
    """What a build reads (pyproject, README, the mapped folders), so the build never writes into the repo."""
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    for folder in sorted({d.split("/")[0] for d in conf["package-dir"].values()}):
        if not (dst / folder).exists():
            shutil.copytree(REPO / folder, dst / folder, ignore=skip)
    return dst


def venv_on_this_environment(venv: Path, env: dict) -> tuple[Path, Path]:
    """A venv that sees this interpreter's packages (torch & co., pip, setuptools: nothing is downloaded).

    Not ``--system-site-packages``: run from inside a virtualenv, ``python -m venv`` builds on the *base*
    interpreter, so that flag shows the base's packages, not this environment's (a fresh ``python3 -m venv``
    with ``pip install -e '.[dev]'`` holds torch and a setuptools that builds wheels; the base may hold
    neither). A ``.pth`` file adds this interpreter's site folders after the new venv's own instead
    (``site.addsitedir``, so their ``.pth`` files count too). Returns (python, its site-packages)."""
    import site

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  env=env, capture_output=True, text=True, check=True).stdout.strip())
    ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (purelib / "_this_environment.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in ours if os.path.isdir(d)) + "\n")
    return py, purelib


@pytest.mark.skipif(os.name == "nt", reason="venv layout (bin/) of POSIX")
def test_a_plain_install_adds_one_import_name_and_lives_next_to_packages_named_data_and_train(tmp_path):
    setuptools = pytest.importorskip("setuptools", reason="the offline build (--no-build-isolation) needs "
                                     "setuptools (`pip install -e '.[dev]'` installs it)")
    builds_wheels = tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1)
    if not builds_wheels and importlib.util.find_spec("wheel") is None:  # a venv with ensurepip's setuptools
        pytest.skip(f"this environment's setuptools {setuptools.__version__} has no bdist_wheel (70.1 has): "
                    "`pip install -e '.[dev]'` (as `make test` does) installs one")
    (tmp_path / "src").mkdir()
    src = copy_sources(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    venv = tmp_path / "venv"
    py, site = venv_on_this_environment(venv, env)
    build = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                            str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr

    (dist,) = site.glob("tailforge-*.dist-info")
    record = [line.split(",")[0] for line in (dist / "RECORD").read_text().splitlines() if line]
    top = {p.split("/")[0] for p in record if not p.startswith("..") and not p.split("/")[0].endswith(".dist-info")}
    assert top == {"tailforge"}, f"the distribution installs more than one top-level name: {sorted(top)}"
    assert (dist / "top_level.txt").read_text().split() == ["tailforge"]
    outside = [p for p in record if p.startswith("..")]
    assert len(outside) == 1 and outside[0].endswith("/bin/tailforge"), outside  # the console script, only
    assert "tailforge/flows/default.yaml" in record  # the embedded default config travels with the code

    elsewhere = tmp_path / "elsewhere"  # not the repo: its data/ and train/ folders must not be on the path
    for name in ("data", "train"):
        (elsewhere / name).mkdir(parents=True)
        (elsewhere / name / "__init__.py").write_text(f'WHO = "dummy {name}"\n')
    env["PYTHONPATH"] = str(elsewhere)
    check = subprocess.run([str(py), "-c", CHECK, str(site)], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stdout + check.stderr
    cli = subprocess.run([str(venv / "bin" / "tailforge"), "--help"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0 and "usage: tailforge" in cli.stdout, cli.stdout + cli.stderr
