"""The shipped config file documents every key with its default; the systemd unit verifies; logs are
structured."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from appconnector import config, logs
from tests.ops.helpers import REPO

SAMPLE = REPO / "config" / "appconnector.toml"


def test_sample_config_covers_every_key_with_defaults() -> None:
    raw = tomllib.loads(SAMPLE.read_text())
    keys = config.config_keys()
    assert set(raw) == set(keys), "one table per section"
    for section, names in keys.items():
        assert set(raw[section]) == set(names), f"[{section}] lists every key"
    loaded = config.load(SAMPLE, env={})
    assert replace(loaded, source="x") == replace(config.load(None, env={}), source="x"), \
        "every value in the sample is the default"


def test_sample_config_comments_every_key() -> None:
    lines = SAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            assert lines[i - 1].startswith("#"), f"key without a comment above it: {line}"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("needs systemd-analyze (Debian package systemd)")
    unit = (REPO / "systemd" / "appconnector.service").read_text()
    for must in ("After=network-online.target tailscaled.service", "StateDirectory=appconnector",
                 "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE", "Restart=on-failure"):
        assert must in unit
    exe = REPO / ".venv" / "bin" / "appconnector"
    if not exe.exists():
        pytest.skip("needs the venv's appconnector script (./dev deps)")
    (tmp_path / "appconnector.service").write_text(unit.replace("/usr/local/bin/appconnector", str(exe)))
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "appconnector.service")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stderr


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_structured_logs(fmt: str) -> None:
    buf = io.StringIO()
    logs.setup("info", fmt, stream=buf)
    try:
        logging.getLogger("appconnector.test").info("checked out %s", "100.64.1.5",
                                                      extra={"node": "nA", "domain": "github.com"})
        logging.getLogger("appconnector.test").debug("hidden")
    finally:
        logging.getLogger().handlers.clear()
    line = buf.getvalue().strip()
    assert "\n" not in line and "hidden" not in line
    if fmt == "json":
        doc = json.loads(line)
        assert doc["msg"] == "checked out 100.64.1.5" and doc["node"] == "nA" and doc["level"] == "info"
    else:
        assert 'msg="checked out 100.64.1.5"' in line and "node=nA" in line and "domain=github.com" in line
        assert line.startswith("ts=")


def test_bad_log_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        logs.setup("loud", "kv")
    with pytest.raises(ValueError):
        logs.setup("info", "xml")
