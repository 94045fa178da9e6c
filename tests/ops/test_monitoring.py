"""docs/prometheus/alerts.yml and docs/grafana/appconnector.json: valid for promtool, alerts firing as
documented, a runbook line each, and every metric they name exported by a running connector."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.helpers import REPO, free_port, http, stop_group, wait_until
from tests.ops.test_run import standalone_config

ALERTS = REPO / "docs" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "docs" / "grafana" / "appconnector.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian's prometheus; ./dev deps)")
METRIC = re.compile(r"\bappconnector_[a-z0-9_]+")


def _alerts() -> list[tuple[str, str]]:
    """(alert name, runbook annotation) of each rule, in order (no YAML parser needed: promtool
    checks the structure; this reads the two fields the docs must match)."""
    text = ALERTS.read_text()
    names = re.findall(r"^\s*- alert: (\w+)$", text, re.M)
    runbooks = re.findall(r'^\s*runbook: "([^"]*)"$', text, re.M)
    assert len(names) == len(runbooks), "one runbook annotation per alert"
    return list(zip(names, runbooks, strict=True))


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def _promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False)


@needs_promtool
def test_alert_rules_pass_promtool_and_fire_as_documented() -> None:
    res = _promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0 and f"SUCCESS: {len(_alerts())} rules found" in res.stdout, res.stdout + res.stderr
    # tests/ops/alerts_test.yml: no leader, NAT off only when configured, routes, pool, SERVFAIL, divergence
    res = _promtool("test", "rules", "alerts_test.yml", cwd=REPO / "tests" / "ops")
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses expressions of rule files: each query becomes a recording rule, with Grafana's
    # variables given concrete values
    exprs = [e.replace("$__rate_interval", "5m").replace("$instance", ".*") for e in _dashboard_exprs()
             if not e.startswith("label_values(")]
    assert len(exprs) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    res = _promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_a_runbook_line_in_operations_md() -> None:
    ops = (REPO / "docs" / "operations.md").read_text()
    assert len(_alerts()) >= 7
    for name, runbook in _alerts():
        assert runbook == f"docs/operations.md#{name.lower()}", name
        assert re.search(rf'^\| <a id="{name.lower()}"></a>`{name}` \|.+\|.+\|$', ops, re.M), \
            f"{name}: no runbook row in docs/operations.md"


def _exported(text: str) -> set[str]:
    """Every sample name /metrics can carry, from its TYPE lines (a labelled metric with no children
    yet has its TYPE line but no samples) and its samples."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "counter":
                names.add(name.removesuffix("_total") + "_total")
            elif kind == "histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_metric_the_rules_and_dashboard_name_is_exported_by_a_running_connector(tmp_path: Path) -> None:
    http_port = free_port()
    cfg = standalone_config(tmp_path, free_port(), free_port(), http_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    proc = subprocess.Popen([sys.executable, "-m", "appconnector.cli", "run", "--config", str(cfg)], cwd=REPO,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, f"run exited: {proc.communicate()[1][-2000:]}"
            try:
                return http(f"http://127.0.0.1:{http_port}/healthz")[0] == 200
            except OSError:
                return False
        wait_until(up, 60, "the connector to answer /healthz")
        code, text = http(f"http://127.0.0.1:{http_port}/metrics")
        assert code == 200
        exported = _exported(text)
        named = set(METRIC.findall(ALERTS.read_text()))
        named |= {m for e in _dashboard_exprs() for m in METRIC.findall(e)}
        assert len(named) >= 30
        missing = sorted(named - exported)
        assert not missing, f"named by the rules or the dashboard but not exported: {missing}"
    finally:
        stop_group(proc)
