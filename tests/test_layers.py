"""The product's imports point the way docs/design.md §2 says: low-level parts know nothing of the
parts above them, and no module reaches another through a string (importlib), where neither readers
nor the type checker can follow it."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "appconnector"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _imports(path: Path) -> set[str]:
    """Every product module ``path`` imports, at the top or inside a function (``from appconnector
    import metrics`` counts as ``appconnector.metrics``)."""
    found: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("appconnector.") and _exists(m)}


def _exists(module: str) -> bool:
    base = PACKAGE.parent.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


@functools.cache
def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# (importer prefix, imported prefix, imports still allowed inside it, why)
NEVER = [
    ("appconnector.kernel", "appconnector", (), "kernel/ is the shared low-level binding: the standard library only"),
    ("appconnector.periodic", "appconnector", (), "the background-round loop is generic"),
    ("appconnector.errors", "appconnector", (), "ConfigError sits below everything that raises it"),
    ("appconnector.secrets_file", "appconnector.config", (), "config.py reads secret files through it"),
    ("appconnector.tailnet", "appconnector.nat", (), "the Raft-port filter uses kernel/, not NAT"),
    ("appconnector.tailnet", "appconnector.dns", (), "DNS consumes tailnet.api, not the other way round"),
    ("appconnector.tailnet", "appconnector.pool.replica", (), "membership is typed against a protocol"),
    ("appconnector.dns", "appconnector.tailnet", ("appconnector.tailnet.api", "appconnector.tailnet.standalone"),
     "DNS sees the tailnet through its contracts"),
    ("appconnector.nat", "appconnector.tailnet", ("appconnector.tailnet.api",),
     "NAT sees the tailnet through its contracts"),
]


@pytest.mark.parametrize("importer,imported,allowed,why", NEVER, ids=[f"{a}->{b}" for a, b, _, _ in NEVER])
def test_imports_point_down(importer: str, imported: str, allowed: tuple[str, ...], why: str) -> None:
    wrong = sorted(f"{src} imports {dst}" for src, dsts in _graph().items() if _under(src, importer)
                   for dst in dsts if _under(dst, imported) and not _under(dst, *allowed)
                   and not _under(dst, importer))
    assert not wrong, f"{why}: {wrong}"


def test_no_modules_import_each_other_in_a_circle() -> None:
    graph = _graph()
    circles = set()
    for start in graph:  # a path back to ``start``: a circle through it (the graph is small)
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start and len(path) > 1:
                    circles.add(" -> ".join(sorted(path)))
                elif nxt not in seen and nxt in graph:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert not circles, sorted(circles)


def test_the_rule_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The checker itself: a function-level import counts (so a lazy import cannot hide an arrow)."""
    src = tmp_path / "lazy.py"
    src.write_text("def f() -> None:\n    from appconnector.dns import loops\n    import appconnector.periodic\n")
    assert _imports(src) == {"appconnector.dns", "appconnector.dns.loops", "appconnector.periodic"}


def test_no_module_imports_another_by_name_string() -> None:
    """``importlib.import_module("appconnector....")`` hides an arrow; only the command line may use it,
    to start the app (its top, nothing depends on it)."""
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(_tree(path)):
            if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str) and node.args[0].value.startswith("appconnector")
                    and isinstance(node.func, ast.Attribute | ast.Name)
                    and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
                    in ("import_module", "__import__")):
                hidden.append(f"{_module(path)} -> {node.args[0].value}")
    assert hidden == ["appconnector.cli -> appconnector.app"], hidden
