"""The v6 pool (pool.prefixes6) is advertised beside the v4 one, through the LocalAPI stand-in, without
wiping anyone else's routes; node records keep their tailnet IPv6 (what v6 steering keys on)."""

from __future__ import annotations

from pathlib import Path

from appconnector.tailnet.nodeinfo import from_peer_status, from_tailcfg_node
from appconnector.tailnet.service import TailnetService
from appconnector.tailnet.settings import TailnetSettings
from tests.tailnet.helpers import base_state, run, started
from tests.tailnet.test_service import _cfg

POOL6 = "fd7a:115c:a1e0:a99c:1::/80"


def test_v6_pool_route_is_advertised_beside_the_v4_one_and_withdrawn_alone(tmp_path: Path) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        state = base_state("delta")
        state["prefs"] = {"AdvertiseRoutes": ["192.168.1.0/24", "2001:db8:7::/48"]}
        s = await started(sock, state)
        settings = TailnetSettings.from_config(_cfg(sock, APPCONNECTOR_POOL_PREFIXES6=POOL6))
        svc = TailnetService(settings, enable_raft_filter=False)
        try:
            await svc.start()
            assert s.prefs["AdvertiseRoutes"] == ["192.168.1.0/24", "2001:db8:7::/48", "100.64.1.0/24", POOL6]
            await svc.withdraw_routes()
            assert s.prefs["AdvertiseRoutes"] == ["192.168.1.0/24", "2001:db8:7::/48"]
        finally:
            await svc.stop()
            await s.stop()
    run(body())


def test_node_records_carry_the_tailnet_ipv6() -> None:
    node = from_tailcfg_node({"StableID": "n1", "Name": "a.ts.net.",
                              "Addresses": ["100.101.0.2/32", "fd7a:115c:a1e0::2/128"]})
    peer = from_peer_status({"ID": "n1", "DNSName": "a.ts.net.", "TailscaleIPs": ["100.101.0.2", "fd7a:115c:a1e0::2"]})
    assert node is not None and peer is not None
    assert node.ipv4 == peer.ipv4 == ("100.101.0.2",)
    assert node.ipv6 == peer.ipv6 == ("fd7a:115c:a1e0::2",)
