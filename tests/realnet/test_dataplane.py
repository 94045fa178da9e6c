"""What a user of the tailnet sees: an app name resolved through MagicDNS (their own tailscaled's
100.100.100.100, split DNS to the connectors' pool DNS address) gives a pool address, and the origin
answers on it over TCP, UDP and ICMP through real WireGuard and the connector's kernel steering."""

from __future__ import annotations

import ipaddress

from tests.faults.upstream import targets_of
from tests.realnet.tailnet import POOL, UPLINK, Tailnet, wait_for


def test_client_reaches_the_origin_through_magicdns(shared: Tailnet) -> None:
    cl1 = shared.nodes["cl1"]
    assert "nameserver 100.100.100.100" in cl1.resolv_conf()  # the client's own tailscaled took over DNS
    addr = cl1.pool_address("web.app.test")
    assert ipaddress.ip_address(addr) in ipaddress.ip_network(POOL)
    body = cl1.http(addr)
    origin, _, via = body.strip().removeprefix("origin ").partition(" from ")
    assert origin in targets_of("web.app.test"), body  # the real address the upstream gave for the name
    assert via.startswith(f"{UPLINK}."), body            # through a connector (it masquerades what it steers)
    assert cl1.udp(addr, b"hello").startswith(f"echo {origin} hello".encode())
    assert wait_for(lambda: cl1.ping(addr), 15, f"ICMP echo reply from {addr}")


def test_second_client_gets_its_own_mapping(shared: Tailnet) -> None:
    cl1, cl2 = shared.nodes["cl1"], shared.nodes["cl2"]
    a1, a2 = cl1.pool_address("other.app.test"), cl2.pool_address("other.app.test")
    assert cl2.http(a2).startswith("origin ")
    assert cl1.http(a1).startswith("origin ")
    code, doc = shared.nodes["c1"].http_get("/pool?limit=1000", admin=True)
    assert code == 200, code
    rows = {(m["node"], m["address"]) for m in doc["mappings"] if m["domain"].rstrip(".") == "other.app.test"}
    assert rows == {(cl1.stable_id(), a1), (cl2.stable_id(), a2)}  # one mapping per node, keyed by its StableID
