"""Route advertisement never wipes others' routes; the tailscale package stays optional."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appconnector import config
from appconnector.config import ConfigError
from appconnector.tailnet.localapi import LocalAPIClient
from appconnector.tailnet.routes import (
    RouteAdvertiser,
    RouteApprover,
    RouteRecord,
    auto_approvers_hint,
    control_credentials,
    union_routes,
    without_routes,
)
from appconnector.tailnet.settings import TailnetSettings
from tests.tailnet.helpers import base_state, run, started

REPO = Path(__file__).resolve().parents[2]


def test_union_and_without_are_pure() -> None:
    assert union_routes(None, ["100.64.1.0/24"]) == ["100.64.1.0/24"]
    assert union_routes(["10.0.0.0/8", "100.64.1.0/24"], ["100.64.1.0/24"]) == ["10.0.0.0/8", "100.64.1.0/24"]
    assert without_routes(["10.0.0.0/8", "100.64.1.0/24"], ["100.64.1.0/24"]) == ["10.0.0.0/8"]
    assert without_routes(None, ["100.64.1.0/24"]) == []


def test_advertise_keeps_other_routes_and_withdraw_removes_only_ours(tmp_path: Path) -> None:
    async def body() -> None:
        state = base_state()
        state["prefs"] = {"AdvertiseRoutes": ["192.168.7.0/24", "0.0.0.0/0", "::/0"]}
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, state)
        try:
            adv = RouteAdvertiser(LocalAPIClient(sock), ["100.64.1.0/24", "100.64.2.0/24"],
                                  RouteRecord(tmp_path / "record.json"))
            got = await adv.advertise()
            assert s.prefs["AdvertiseRoutes"] == ["192.168.7.0/24", "0.0.0.0/0", "::/0",
                                                   "100.64.1.0/24", "100.64.2.0/24"]
            assert got == s.prefs["AdvertiseRoutes"]
            patches = sum(1 for m, _ in s.requests if m == "PATCH")
            await adv.advertise()  # already there: no write
            assert sum(1 for m, _ in s.requests if m == "PATCH") == patches
            # someone else adds a route after us; our withdraw keeps it
            s.prefs["AdvertiseRoutes"] = [*s.prefs["AdvertiseRoutes"], "172.16.0.0/12"]
            await adv.withdraw()
            assert s.prefs["AdvertiseRoutes"] == ["192.168.7.0/24", "0.0.0.0/0", "::/0", "172.16.0.0/12"]
        finally:
            await s.stop()
    run(body())


def test_withdraw_takes_back_only_the_routes_we_added(tmp_path: Path) -> None:
    """A pool route the operator advertised before we came stays on withdraw; a route recorded by an
    earlier run (a crash) is still ours; a route recorded but no longer in the pool is withdrawn at the
    next advertise; with no record, withdraw does not even ask tailscaled."""
    async def body() -> None:
        state = base_state()
        state["prefs"] = {"AdvertiseRoutes": ["192.168.7.0/24", "100.64.1.0/24"]}
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, state)
        record = RouteRecord(tmp_path / "record.json")
        try:
            adv = RouteAdvertiser(LocalAPIClient(sock), ["100.64.1.0/24", "100.64.2.0/24"], record)
            await adv.advertise()
            assert s.prefs["AdvertiseRoutes"] == ["192.168.7.0/24", "100.64.1.0/24", "100.64.2.0/24"]
            assert record.load() == ["100.64.2.0/24"], "the operator's pool route is not recorded as ours"
            # a crash: the next run finds its route still advertised and keeps it recorded
            again = RouteAdvertiser(LocalAPIClient(sock), ["100.64.1.0/24", "100.64.2.0/24"], record)
            await again.advertise()
            assert record.load() == ["100.64.2.0/24"]
            assert await again.withdraw() == ["100.64.2.0/24"]
            assert s.prefs["AdvertiseRoutes"] == ["192.168.7.0/24", "100.64.1.0/24"]
            assert record.load() == [] and not record.path.exists()
            asked = len(s.requests)
            assert await again.withdraw() == []
            assert len(s.requests) == asked, "nothing recorded: tailscaled is not asked"
            # pool.prefixes changed from .2 to .3: the old recorded route is ours and goes
            await again.advertise()
            moved = RouteAdvertiser(LocalAPIClient(sock), ["100.64.3.0/24"], record)
            await moved.advertise()
            assert s.prefs["AdvertiseRoutes"] == ["192.168.7.0/24", "100.64.1.0/24", "100.64.3.0/24"]
            assert record.load() == ["100.64.3.0/24"]
        finally:
            await s.stop()
    run(body())


def test_route_record_survives_garbage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    record = RouteRecord(tmp_path / "record.json")
    record.path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert record.load() == []
    assert any("ignoring the route record" in r.getMessage() for r in caplog.records)
    record.save(["100.64.1.7/24", "100.64.1.0/24"])
    assert record.load() == ["100.64.1.0/24"]
    assert record.path.stat().st_mode & 0o777 == 0o600


def test_approver_without_credentials_stays_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Approval may come from autoApprovers: the approver says nothing; RouteServing warns only when the
    route is really not served (test_route_serving.py)."""
    cfg = config.load(None, env={})
    approver = RouteApprover(TailnetSettings.from_config(cfg), ["100.64.1.0/24"])
    with caplog.at_level(logging.WARNING):
        assert run(approver.approve("nSELF")) is False
    assert not caplog.records
    assert '"100.64.1.0/24": ["tag:appconnector"]' in auto_approvers_hint("", ["100.64.1.0/24"])


def test_control_credentials_validation(tmp_path: Path) -> None:
    assert control_credentials(TailnetSettings.from_config(config.load(None, env={}))) is None
    key = tmp_path / "key"
    key.write_text("tskey-api-xyz\n")
    key.chmod(0o644)
    cfg = config.load(None, env={"APPCONNECTOR_TAILNET_API_KEY_FILE": str(key)})
    with pytest.raises(ConfigError, match="chmod 600") as ei:  # a key others can read has leaked
        control_credentials(TailnetSettings.from_config(cfg))
    assert ei.value.key == "tailnet.api_key_file"
    key.chmod(0o600)
    assert control_credentials(TailnetSettings.from_config(cfg)) == {"api_key": "tskey-api-xyz"}
    cfg = config.load(None, env={"APPCONNECTOR_TAILNET_OAUTH_CLIENT_ID": "k123"})
    with pytest.raises(ConfigError) as ei:
        control_credentials(TailnetSettings.from_config(cfg))
    assert ei.value.key == "tailnet.oauth_secret_file"
    cfg = config.load(None, env={"APPCONNECTOR_TAILNET_API_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError) as ei:
        control_credentials(TailnetSettings.from_config(cfg))
    assert ei.value.key == "tailnet.api_key_file"


# The tailscale package (control-API route approval) is optional at run time: a process without it
# imports and runs everything else, and only a configured credential asks for it (exit 2 naming the key).
_WITHOUT_TAILSCALE = "import sys; sys.modules['tailscale'] = None  # import tailscale → ImportError\n"


def test_the_product_runs_without_the_tailscale_package(tmp_path: Path) -> None:
    code = _WITHOUT_TAILSCALE + (
        "import pkgutil, importlib, appconnector\n"
        "for m in pkgutil.walk_packages(appconnector.__path__, 'appconnector.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('imported', len(sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         check=False)
    assert res.returncode == 0 and "imported" in res.stdout, res.stderr[-2000:]


def test_a_credential_without_the_tailscale_package_is_a_config_error(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("tskey-api-xyz\n")
    key.chmod(0o600)  # a key others can read is refused before anything else
    code = _WITHOUT_TAILSCALE + "from appconnector.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    env.update(APPCONNECTOR_TAILNET_API_KEY_FILE=str(key), APPCONNECTOR_DNS_UPSTREAM="192.0.2.53:53")
    res = subprocess.run([sys.executable, "-c", code, "check-config"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=60, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "tailnet.api_key_file" in res.stderr and "pip install tailscale" in res.stderr
    # with the package present the same config is valid
    res = subprocess.run([sys.executable, "-m", "appconnector.cli", "check-config"], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
