"""Layering of the package: the Flower-free layers stay free of Flower, and no module imports
itself through others (no import cycle, counting imports under ``if TYPE_CHECKING:`` and inside
functions too: a cycle dodged that way is still two modules that need each other)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "flwr_splitms"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

FLOWER_FREE = (
    "flwr_splitms.core",
    "flwr_splitms.local",
    "flwr_splitms.codecs",
    "flwr_splitms.models",
    "flwr_splitms.data",
    "flwr_splitms.config",
    "flwr_splitms.checkpoint",
)


def test_flower_free_modules_do_not_import_flower() -> None:
    code = (
        f"import sys, {', '.join(FLOWER_FREE)}\n"
        "loaded = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# -- the import graph, read statically ----------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import of a package module by another, with where it is and when it runs."""

    source: str
    target: str
    file: str
    line: int
    kind: str  # "runtime", "type-checking" or "function-local"
    via: str = ""  # for an import of a subpackage's module: that module (its package runs first)

    def __str__(self) -> str:
        how = f"{self.kind}, package of {self.via}" if self.via else self.kind
        return f"{self.source} -> {self.target}  ({self.file}:{self.line}, {how})"


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name of every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportVisitor(ast.NodeVisitor):
    """Collects the imports of one module with the context they run in."""

    def __init__(self, module: str, file: str, modules: dict[str, Path]) -> None:
        self.module = module
        self.file = file
        self.package = module if file.endswith("__init__.py") else module.rpartition(".")[0]
        self.modules = modules
        self.kind = "runtime"
        self.found: dict[tuple[str, int, str], Import] = {}

    def _add(self, target: str | None, line: int) -> None:
        if target is None or target == self.module:
            return
        self.found.setdefault(
            (target, line, ""), Import(self.module, target, self.file, line, self.kind)
        )
        # Importing a.b.c first runs a.b's __init__, unless the importer lies inside a.b.
        parts = target.split(".")
        for n in range(2, len(parts)):
            package = ".".join(parts[:n])
            if package in self.modules and not f"{self.module}.".startswith(f"{package}."):
                imp = Import(self.module, package, self.file, line, self.kind, via=target)
                self.found.setdefault((package, line, target), imp)

    def _resolve(self, name: str) -> str | None:
        """The longest package module that ``name`` (a dotted module path) lies in."""
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name or None

    def _in_context(self, kind: str, body: list[ast.stmt]) -> None:
        outer, self.kind = self.kind, kind if self.kind == "runtime" else self.kind
        for stmt in body:
            self.visit(stmt)
        self.kind = outer

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._in_context("function-local", node.body)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._in_context("function-local", node.body)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._in_context("type-checking", node.body)
            self._in_context(self.kind, node.orelse)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                self._add(self._resolve(alias.name), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - node.level + 1]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        if stem.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            submodule = f"{stem}.{alias.name}"  # ``from pkg import submodule``
            self._add(submodule if submodule in self.modules else self._resolve(stem), node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("flwr_splitms.x") with a literal name: an import all the same
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (
            name == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.split(".")[0] == PACKAGE
        ):
            self._add(self._resolve(node.args[0].value), node.lineno)
        self.generic_visit(node)


def package_imports(root: Path = ROOT) -> list[Import]:
    """Every import of a package module by another, runtime, type-checking or function-local."""
    modules = module_names(root)
    found: list[Import] = []
    for name, path in modules.items():
        visitor = _ImportVisitor(name, path.relative_to(root.parent).as_posix(), modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found.extend(visitor.found.values())
    return found


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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

    for v in sorted(set(graph) | {t for ts in graph.values() for t in ts}):
        if v not in index:
            connect(v)
    return sorted(components)


def shortest_cycle(component: list[str], imports: list[Import]) -> list[str]:
    """A shortest import cycle through the component's first module (breadth-first)."""
    members = set(component)
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.source in members and imp.target in members:
            graph[imp.source].add(imp.target)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def describe_cycles(components: list[list[str]], imports: list[Import]) -> str:
    """Each cycle: one path around it, then every import between its modules, file and line."""
    lines = []
    for component in components:
        members = set(component)
        path = " -> ".join(shortest_cycle(component, imports))
        lines.append(f"cycle among {len(component)} modules: {path}")
        for imp in sorted(imports, key=lambda i: (i.source, i.line)):
            if imp.source in members and imp.target in members:
                lines.append(f"    {imp}")
    return "\n".join(lines)


def test_the_import_graph_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Cycles through a function, TYPE_CHECKING, import_module or a package's __init__."""
    files = {
        "__init__.py": "",
        "a.py": "from .b import B\n",
        "b.py": "def f():\n    from . import a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import d\n",
        "sub/__init__.py": "",
        "sub/d.py": "import importlib\nC = importlib.import_module('flwr_splitms.c')\n",
        "sub/e.py": "from flwr_splitms.pkg2.f import F\n",
        "pkg2/__init__.py": "from ..sub import e\n",
        "pkg2/f.py": "import os\nimport flwr_splitms.a\n",
        "g.py": "from flwr_splitms import a\n",  # imported by none: no cycle
    }
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    imports = package_imports(tmp_path / PACKAGE)
    p = f"{PACKAGE}."
    edges = {(i.source.removeprefix(p), i.target.removeprefix(p), i.kind, i.via) for i in imports}
    assert edges == {
        ("a", "b", "runtime", ""),
        ("b", "a", "function-local", ""),
        ("c", "sub.d", "type-checking", ""),
        ("c", "sub", "type-checking", f"{p}sub.d"),  # sub's __init__ runs first
        ("sub.d", "c", "runtime", ""),
        ("sub.e", "pkg2.f", "runtime", ""),
        ("sub.e", "pkg2", "runtime", f"{p}pkg2.f"),
        ("pkg2", "sub.e", "runtime", ""),
        ("pkg2", "sub", "runtime", f"{p}sub.e"),
        ("pkg2.f", "a", "runtime", ""),
        ("g", "a", "runtime", ""),
    }
    cycles = import_cycles(imports)
    assert [[m.removeprefix(p) for m in c] for c in cycles] == [
        ["a", "b"],
        ["c", "sub.d"],
        ["pkg2", "sub.e"],
    ]
    report = describe_cycles(cycles, imports)
    assert "flwr_splitms/b.py:2, function-local" in report
    assert "flwr_splitms/c.py:3, type-checking" in report
    assert "flwr_splitms/sub/e.py:1, runtime, package of flwr_splitms.pkg2.f" in report
    assert "flwr_splitms/pkg2/__init__.py:1, runtime)" in report


def test_package_has_no_import_cycle() -> None:
    imports = package_imports()
    found = import_cycles(imports)
    assert not found, "import cycles in the package:\n" + describe_cycles(found, imports)
