"""v6 steering for real (pool.prefixes6): client namespace → connector (NAT service) → origin, IPv6 on
every link. One node (as the tailnet directory lists it, with its tailnet IPv4 and IPv6) has one
mapping per domain; its v6 pool address (the mirror of the v4 one) is steered to the domain's real
IPv6 address, its v4 pool address to the real IPv4 one. Needs root, ``ip``, libnftables, conntrack.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from appconnector.pool.addresses import DualSpace
from tests.nat.netns import (
    CLIENTS,
    CLIENTS6,
    CONNECTORS6,
    HERE,
    ORIGIN,
    ORIGIN6,
    ORIGIN6_B,
    ORIGIN_B,
    POOL,
    POOL6,
    Driver,
    Topology,
    read_json_line,
    wait_for,
)
from tests.nat.test_dataplane import ENV, client, driver, nft, pytestmark  # noqa: F401  (the same skips)

NODE = "node-cli1"
CLI1, CLI1_6 = CLIENTS["cli1"], CLIENTS6["cli1"]
SPACE = DualSpace([POOL], [POOL6])
ENV6 = {**ENV, "pool_prefixes6": POOL6}


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology().create()
    origin = t.spawn("origin", sys.executable, str(HERE / "origin.py"), ORIGIN, ORIGIN_B, ORIGIN6, ORIGIN6_B)
    assert origin.stdout is not None
    assert origin.stdout.readline().strip() == "ready"
    yield t
    t.destroy()


def v6_of(address: str) -> str:
    mirrored = SPACE.to_v6(int(ipaddress.IPv4Address(address)))
    assert mirrored is not None
    return str(ipaddress.IPv6Address(mirrored))


def driver6(topo: Topology, **opts: Any) -> Driver:
    return driver(topo, env=ENV6, nodes={NODE: [CLI1, CLI1_6]}, **opts)


def _ct6(topo: Topology, pool6: str) -> int:
    out = topo.run_in("conn1", "conntrack", "-L", "-f", "ipv6", "-s", CLI1_6, "-d", pool6, check=False)
    return sum(1 for line in out.stdout.splitlines() if pool6 in line)


def test_tcp_udp_icmpv6_through_a_v6_pool_address_and_v4_from_the_same_client(topo: Topology) -> None:
    d = driver6(topo)
    try:
        r = d.call("checkout", node=NODE, domain="dual.example", targets=[ORIGIN, ORIGIN6])
        assert r["installed"]
        a4, a6 = r["address"], v6_of(r["address"])
        got = client(topo, "cli1", "http", a6)
        assert got["ok"], (got, nft(topo, "conn1", "list", "table", "inet", "appconnector"))
        # DNATed to the real IPv6 and masqueraded to the connector's uplink IPv6
        assert got["body"].startswith(f"origin {ORIGIN6} from {CONNECTORS6['conn1'][1]}"), got
        assert client(topo, "cli1", "udp", a6, "hello")["reply"] == f"echo {ORIGIN6} hello"
        assert client(topo, "cli1", "icmp", a6)["ok"]
        # the same client, the same mapping, over IPv4
        assert client(topo, "cli1", "http", a4)["body"].startswith(f"origin {ORIGIN} from 198.51.100.11")
        assert client(topo, "cli1", "udp", a4, "hi")["reply"] == f"echo {ORIGIN} hi"
        assert CLI1_6 in nft(topo, "conn1", "list", "map", "inet", "appconnector", "steer6")
    finally:
        d.stop()


def test_v6_pool_address_of_a_v4_only_service_is_rejected_at_once(topo: Topology) -> None:
    d = driver6(topo)
    try:
        a4 = d.call("checkout", node=NODE, domain="v4only.example", targets=[ORIGIN_B])["address"]
        assert client(topo, "cli1", "http", a4)["body"].startswith(f"origin {ORIGIN_B}")
        got = client(topo, "cli1", "connect", v6_of(a4))
        assert not got["ok"] and got["errno"] == "ECONNREFUSED", got  # TCP reset, not a timeout
        assert got["seconds"] < 2.5, got  # generous: the client's own timeout is 5 s
        err = client(topo, "cli1", "udperr", v6_of(a4))
        assert not err["ok"] and err["errno"] != "timeout", err  # ICMPv6 admin-prohibited
        # the leader's refresh adds an IPv6 target later: the same v6 address starts to work
        d.call("set_targets", domain="v4only.example", targets=[ORIGIN_B, ORIGIN6_B])
        d.call("ready")  # the NAT worker installs the change after the apply
        assert client(topo, "cli1", "udp", v6_of(a4), "now")["reply"] == f"echo {ORIGIN6_B} now"
    finally:
        d.stop()


def test_v6_flows_touch_their_mapping_and_forget_purges_their_conntrack(topo: Topology) -> None:
    d = driver6(topo, seen_interval=1.0, conntrack_interval=1.0, touch_refresh=0.0)
    try:
        a4 = d.call("checkout", node=NODE, domain="touch6.example", targets=[ORIGIN, ORIGIN6])["address"]
        a6 = v6_of(a4)
        topo.run_in("conn1", "conntrack", "-F", check=False)  # earlier tests' flows to the same address
        t0 = d.call("lookup", node=NODE, domain="touch6.example")["last_used"]
        holder = topo.spawn("cli1", sys.executable, str(HERE / "client.py"), "hold", a6, "4")
        # only v6 traffic flows: the v6 seen set / conntrack dump must name the v4 mapping
        wait_for(lambda: d.call("lookup", node=NODE, domain="touch6.example")["last_used"] > t0, 10,
                 lambda: f"a touch from v6 traffic: {d.call('status')}")
        assert read_json_line(holder, 15)["replies"] > 5
        assert client(topo, "cli1", "udp", a6, "x", "40006")["reply"] == f"echo {ORIGIN6} x"
        assert _ct6(topo, a6) >= 1
        d.call("forget", nodes=[NODE])
        wait_for(lambda: _ct6(topo, a6) == 0, 5, lambda: f"v6 conntrack entries to go: {d.log()[-2000:]}")
        d.call("ready")
        assert CLI1_6 not in nft(topo, "conn1", "list", "map", "inet", "appconnector", "steer6")
    finally:
        d.stop()
