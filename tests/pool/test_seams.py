"""The pool's seams, checked on the source: the replicated state machine is a pure core (no clock, no
randomness, no metrics, no logging: the replica counts and logs what it reports), the pool does not
reach back into the config (only ``pool/settings.py`` derives its settings from it), and nothing in
the product imports the test harness (``tests/member.py``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "appconnector"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _roots(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_the_state_machine_reads_no_clock_no_randomness_and_neither_counts_nor_logs() -> None:
    imported = _imports(PACKAGE / "pool" / "state.py")
    forbidden_roots = {"time", "datetime", "random", "secrets", "uuid", "os", "logging", "prometheus_client"}
    assert not _roots(imported) & forbidden_roots, sorted(imported)
    assert not any(m.startswith(("appconnector.metrics", "appconnector.config", "appconnector.logs"))
                   for m in imported), sorted(imported)
    # and not through what it imports: a fresh interpreter that loads it has loaded none of them
    probe = ("import sys, appconnector.pool.state as s; "
             "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('logging', 'random', 'secrets', 'uuid', 'datetime', 'prometheus_client') "
             "or m in ('appconnector.metrics', 'appconnector.config'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.split() == [], loaded


def test_the_pool_derives_its_settings_from_the_config_in_one_place() -> None:
    reaching = sorted(p.name for p in (PACKAGE / "pool").glob("*.py")
                      if p.name != "settings.py" and "appconnector.config" in _imports(p))
    assert reaching == [], f"pool modules importing appconnector.config: {reaching}"


def test_the_member_harness_is_not_in_the_product_and_the_product_does_not_import_it() -> None:
    importing = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "tests" in _roots(_imports(p)))
    assert importing == [], importing
    # the harness's switches (pysyncobj unguarded, a planted wrong state machine) ship nowhere
    shipping = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                      if '"--no-guard"' in p.read_text() or '"--broken"' in p.read_text())
    assert shipping == [], shipping
