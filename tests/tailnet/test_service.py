"""TailnetService: the object the app wires, against the stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from appconnector import config
from appconnector.metrics import REGISTRY
from appconnector.tailnet.api import TailnetUnavailable
from appconnector.tailnet.cluster import Action
from appconnector.tailnet.localapi import LocalAPIClient
from appconnector.tailnet.service import TailnetService
from appconnector.tailnet.settings import TailnetSettings
from tests.tailnet.helpers import TAG, base_state, run, started, wait_for


def _cfg(sock: str, **env: str) -> config.Config:
    base = {"APPCONNECTOR_TAILNET_LOCALAPI_SOCKET": sock, "APPCONNECTOR_CLUSTER_TAG": TAG,
            "APPCONNECTOR_CLUSTER_STATE_DIR": str(Path(sock).parent / "state"),
            "APPCONNECTOR_CLUSTER_SECRET_FILE": "/dev/null", "APPCONNECTOR_DNS_UPSTREAM": "192.0.2.53"}
    base.update(env)
    return config.load(None, env=base)


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


def test_service_start_advertises_and_identifies(tmp_path: Path) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        state = base_state("delta")
        state["prefs"] = {"AdvertiseRoutes": ["192.168.1.0/24"]}
        s = await started(sock, state)
        svc = TailnetService(TailnetSettings.from_config(_cfg(sock)), enable_raft_filter=False)
        try:
            await svc.start()
            assert s.prefs["AdvertiseRoutes"] == ["192.168.1.0/24", "100.64.1.0/24"]
            assert _gauge("appconnector_tailnet_routes_wanted") == _gauge("appconnector_tailnet_routes_advertised") == 1
            assert svc.raft_address() == "100.100.0.1:6270"
            assert svc.members() == ["100.100.0.1:6270", "100.100.0.2:6270"]
            node = await svc.identity.whois("100.101.0.10")
            assert node is not None and node.node == "nClientA"
            checks = {k: f() for k, f in svc.checks().items()}
            assert all(ok for ok, _ in checks.values()), checks
            # an operator replaces the advertised routes (`tailscale set --advertise-routes=...`):
            # ours come back, theirs stay
            await wait_for(lambda: bool(s._watchers), what="watch connected")
            await LocalAPIClient(sock).patch_prefs({"AdvertiseRoutes": ["10.7.0.0/16"], "AdvertiseRoutesSet": True})
            await wait_for(lambda: s.prefs["AdvertiseRoutes"] == ["10.7.0.0/16", "100.64.1.0/24"],
                           what="pool route advertised again")
            # with Raft state of its own a member resumes, whatever answers
            d = await svc.discover_cluster(has_state=True)
            assert d.action is Action.RESUME
            await svc.withdraw_routes()
            assert s.prefs["AdvertiseRoutes"] == ["10.7.0.0/16"]
            # withdrawn on purpose (a removed member): nothing is wanted, so the routes alert stays quiet
            assert _gauge("appconnector_tailnet_routes_wanted") == _gauge("appconnector_tailnet_routes_advertised") == 0
        finally:
            await svc.stop()
            await s.stop()
    run(body())


def test_service_without_tailscaled_fails_clearly(tmp_path: Path) -> None:
    async def body() -> None:
        svc = TailnetService(TailnetSettings.from_config(_cfg(str(tmp_path / "absent.sock"))), enable_raft_filter=False)
        with pytest.raises(TailnetUnavailable) as ei:
            await svc.start()
        assert "absent.sock" in str(ei.value)
    run(body())
