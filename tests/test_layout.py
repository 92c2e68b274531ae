"""The package layout holds: imports flow analysis -> planner -> reports -> application layer, never back.

Each .py under analysis/, planner/, reports/ and quantplan/ is parsed with ``ast`` (nothing is
imported), its absolute and relative imports are resolved to ``quantplan.*`` module names, and
so are the module names in lazy tables and ``importlib.import_module("quantplan....")`` calls
(string constants naming a ``quantplan`` module). Adding e.g. ``from quantplan.planner import
plan`` to analysis/table.py makes ``test_import_direction`` fail, naming the file and the import.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import CHILD_ENV, REPO

#: folder in the repository -> the package it is installed as
ROOMS = {"analysis": "quantplan.analysis", "planner": "quantplan.planner", "reports": "quantplan.reports",
         "quantplan": "quantplan"}
#: a string constant that names a quantplan module (lazy tables, importlib.import_module)
_MODULE_NAME = re.compile(r"quantplan(\.[A-Za-z_]\w*)+")


def application_layer() -> set[str]:
    """quantplan itself and every quantplan/*.py module: they compose the rooms (quantplan.common excepted)."""
    return {"quantplan"} | {f"quantplan.{p.stem}" for p in (REPO / "quantplan").glob("*.py") if p.stem != "__init__"}


def module_files() -> dict[str, Path]:
    """Module name -> file, for every .py of the rooms and the application layer (symlinks not followed)."""
    found = {}
    for folder, package in ROOMS.items():
        for root, dirs, files in os.walk(REPO / folder):  # quantplan/analysis etc. are links to the rooms: skipped
            dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink() and d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = Path(root) / name
                    parts = path.relative_to(REPO / folder).with_suffix("").parts
                    parts = parts[:-1] if parts[-1] == "__init__" else parts
                    found[".".join((package, *parts))] = path
    return found


def imports_of(module: str, path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` counts ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            found.add(node.value)
    return found


def _within(name: str, packages: set[str]) -> bool:
    """``name`` is one of ``packages`` or inside one (the top package ``quantplan`` counts only as itself)."""
    return any(name == p or (p != "quantplan" and name.startswith(p + ".")) for p in packages)


def forbidden_for(module: str) -> set[str]:
    """The packages/modules ``module`` must not import, by the room it lives in."""
    app = application_layer()
    if _within(module, {"quantplan.analysis"}):
        return {"quantplan.planner", "quantplan.reports"} | app
    if _within(module, {"quantplan.planner"}):
        return {"quantplan.reports"} | app
    if _within(module, {"quantplan.reports"}):
        return app
    if _within(module, {"quantplan.common"}):
        return {"quantplan.analysis", "quantplan.planner", "quantplan.reports"} | app
    return set()


def violations() -> list[str]:
    """'file: imports name' for every import against the direction analysis -> planner -> reports -> app."""
    bad = []
    for module, path in sorted(module_files().items()):
        forbidden = forbidden_for(module)
        for name in sorted(imports_of(module, path)):
            if _within(name, forbidden):
                bad.append(f"{path.relative_to(REPO)}: imports {name}")
    return bad


def test_walker_sees_imports():
    """Self-check: the walker finds known imports (absolute, relative, lazy-table strings) and names the rooms."""
    files = module_files()
    assert {"quantplan.analysis.table", "quantplan.planner.plan", "quantplan.reports.compare", "quantplan.cli",
            "quantplan.common.lazy", "quantplan.analysis"} <= set(files)
    assert not [m for m in files if m.startswith(("quantplan.quantplan", "quantplan.analysis.analysis"))]
    assert "quantplan.common.lazy" in imports_of("quantplan.analysis", files["quantplan.analysis"])
    assert "quantplan.analysis.analyze" in imports_of("quantplan.analysis", files["quantplan.analysis"])  # lazy table
    assert {"quantplan.cli", "quantplan.pipeline", "quantplan.compare_cli"} <= application_layer()
    assert "quantplan.common" not in application_layer()
    # the checks themselves catch what they are for
    assert _within("quantplan.planner.plan", forbidden_for("quantplan.analysis.table"))
    assert _within("quantplan.pipeline", forbidden_for("quantplan.reports.run"))
    assert not _within("quantplan.analysis.table", forbidden_for("quantplan.planner.plan"))


def test_relative_imports_resolve(tmp_path):
    """``from ..planner import plan`` inside analysis/x.py resolves to quantplan.planner.plan, and is refused."""
    path = tmp_path / "x.py"
    path.write_text("from . import table\nfrom .formats import NF4\nfrom ..planner import plan\n"
                    "import importlib\nimportlib.import_module('quantplan.reports.compare')\n")
    found = imports_of("quantplan.analysis.x", path)
    assert {"quantplan.analysis.table", "quantplan.analysis.formats", "quantplan.planner.plan",
            "quantplan.reports.compare"} <= found
    refused = {n for n in found if _within(n, forbidden_for("quantplan.analysis.x"))}
    assert refused == {"quantplan.planner", "quantplan.planner.plan", "quantplan.reports.compare"}


def test_import_direction():
    """analysis imports neither planner, reports nor the application layer; planner not reports nor the
    application layer; reports not the application layer; quantplan.common no room at all."""
    assert violations() == []


def test_no_bare_room_imports():
    """Nothing imports the old top-level names ``analysis``, ``planner``, ``reports`` (tests and benchmarks too)."""
    files = dict(module_files())
    for folder in ("tests", "benchmarks"):
        files.update({f"{folder}.{p.stem}": p for p in (REPO / folder).glob("*.py")})
    bare = [f"{path.relative_to(REPO)}: imports {name}" for module, path in sorted(files.items())
            for name in sorted(imports_of(module, path)) if name.split(".")[0] in {"analysis", "planner", "reports"}]
    assert bare == []


def _python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=CHILD_ENV, capture_output=True, text=True,
                          timeout=120)


def test_public_api_imports_and_plan_needs_no_torch():
    """``from quantplan import ...`` gives the five verbs; ``plan`` alone loads pandas, not torch."""
    done = _python("import sys, quantplan\n"
                   f"assert quantplan.__file__.startswith({str(REPO)!r}), quantplan.__file__\n"
                   "from quantplan import plan\n"
                   "assert callable(plan), plan\n"
                   "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
                   "from quantplan import analyze, export, compare, run\n"
                   "assert all(map(callable, (analyze, plan, export, compare, run)))\n"
                   "print('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("room", ["analysis", "planner", "reports"])
def test_bare_room_import_refused_with_the_fix(room):
    """``import analysis`` from the repository root fails, naming ``quantplan.analysis``."""
    done = _python(f"import {room}")
    assert done.returncode != 0
    assert "ImportError" in done.stderr and f"quantplan.{room}" in done.stderr.splitlines()[-1], done.stderr[-2000:]
