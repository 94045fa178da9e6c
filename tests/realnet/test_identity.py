"""Identity is what the real control plane says (tailscaled's whois): a client's mappings are keyed by
its StableID (headscale's are decimal), whois carries its user and a connector's tags; a source the
control plane does not know gets REFUSED."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.rcode

from appconnector.tailnet.localapi import LocalAPIClient
from tests.realnet.tailnet import POOL_DNS, TAG, UPLINK, Tailnet, resolve_in, sh


def test_mappings_and_whois_carry_the_control_planes_identity(shared: Tailnet) -> None:
    c1, c2, cl1 = shared.nodes["c1"], shared.nodes["c2"], shared.nodes["cl1"]
    cl1.pool_address("web.app.test")
    sid = cl1.stable_id()
    assert sid.isdigit(), sid  # headscale's StableIDs are decimal node IDs
    code, doc = c1.http_get("/pool?limit=1000", admin=True)
    assert code == 200
    assert sid in {m["node"] for m in doc["mappings"]}

    async def ask() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        api = LocalAPIClient(c1.socket)
        return await api.whois(cl1.ip4()), await api.whois(c2.ip4())
    client, peer = asyncio.run(ask())
    assert client is not None and peer is not None
    assert client["Node"]["StableID"] == sid
    assert not client["Node"].get("Tags")
    assert client["UserProfile"]["LoginName"].startswith("alice")
    assert peer["Node"]["Tags"] == [TAG]
    assert peer["Node"]["StableID"] == c2.stable_id()


def test_a_source_the_control_plane_does_not_know_is_refused(shared: Tailnet) -> None:
    c1 = shared.nodes["c1"]
    origin = shared.ns("origin")  # on the connectors' uplink, not a tailnet node
    sh("ip", "-n", origin, "route", "replace", f"{POOL_DNS}/32", "via", c1.uplink or "")
    try:
        rcode, addrs = resolve_in(origin, "web.app.test", POOL_DNS)
    finally:
        sh("ip", "-n", origin, "route", "del", f"{POOL_DNS}/32", check=False)
    assert rcode == dns.rcode.REFUSED and not addrs, (rcode, addrs)
    assert c1.uplink and c1.uplink.startswith(UPLINK)
