"""The layout holds: imports point down the floors, no import cycle, no function over 60 lines, the public API.

The floors are those of docs/architecture.md; a module may import from its own floor only inside its own
package (``models.vae`` from ``models.base``), and from lower floors freely. Imports inside functions
count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

import fastshower

SRC = Path(fastshower.__file__).parent

#: floor of each module or package (the longest matching prefix wins); keep in step with docs/architecture.md
FLOORS: dict[str, int] = {
    "fastshower._version": 0,
    "fastshower.errors": 0,
    "fastshower.config": 1,
    "fastshower.energy": 1,
    "fastshower.geometry": 1,
    "fastshower.domain": 2,
    "fastshower.io": 2,
    "fastshower.montecarlo": 3,
    "fastshower.data": 3,
    "fastshower.models": 3,
    "fastshower.validate": 3,
    "fastshower.runs": 4,
    "fastshower.sampling": 5,
    "fastshower.training": 5,
    "fastshower.deploy": 6,
    "fastshower.distillation": 6,
    "fastshower.refinement": 6,
    "fastshower.generation": 7,
    "fastshower.fastsim_model": 7,
    "fastshower.airshower": 8,
    "fastshower.demo": 9,
    "fastshower.cli": 10,
    "fastshower": 10,  # the package itself: it re-exports the public API
    "fastshower.__main__": 11,
}
MAX_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob("*.py"))}


def _imports(name: str, tree: ast.Module, is_package: bool) -> set[str]:
    """fastshower modules imported anywhere in ``tree`` (relative imports resolved; TYPE_CHECKING blocks skipped)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    base = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fastshower"))
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                root = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                mod = f"{root}.{mod}" if mod else root
            if mod.startswith("fastshower"):
                out.add(mod)
    return out


def _floor(module: str) -> int:
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        key = ".".join(parts[:k])
        if key in FLOORS:
            return FLOORS[key]
    raise KeyError(f"{module} has no floor: add it to FLOORS and docs/architecture.md")


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    packages = {_module_name(p) for p in SRC.rglob("__init__.py")}
    return {name: _imports(name, tree, name in packages) - {name} for name, tree in mods.items()}


def test_every_module_has_a_floor(graph: dict[str, set[str]]) -> None:
    for name in graph:
        _floor(name)


def test_imports_point_down(graph: dict[str, set[str]]) -> None:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            up = _floor(dst) > _floor(src)
            sideways = _floor(dst) == _floor(src) and _package(dst) != _package(src)
            if up or sideways:
                bad.append(f"{src} (floor {_floor(src)}) imports {dst} (floor {_floor(dst)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    # resolve "from fastshower.x import name" where x is a package to the package's own module
    edges = {src: {d for d in dsts if d in graph} for src, dsts in graph.items()}
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state[nxt] == 1:
                return [*stack[stack.index(nxt):], nxt]
            if state[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state[node] == 0:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


def test_no_long_function() -> None:
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_public_api_resolves() -> None:
    assert sorted(fastshower.__all__) == sorted(["__version__", *fastshower._API])
    for name in fastshower.__all__:
        assert getattr(fastshower, name) is not None
    assert fastshower.generate is importlib.import_module("fastshower.generation").generate
    assert (SRC / "py.typed").is_file()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastshower.nope  # noqa: B018


def test_every_user_error_derives_from_the_base() -> None:
    """Every exception class defined in src/ derives from FastshowerError (CLI: one line, exit status 2)."""
    from fastshower.errors import FastshowerError

    for name in _modules():
        if name.endswith("__main__"):  # importing it runs the CLI
            continue
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == name:
                assert issubclass(obj, FastshowerError), f"{name}.{obj.__name__} does not derive from FastshowerError"
