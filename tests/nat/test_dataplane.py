"""The kernel dataplane for real: client namespace → connector namespace (NAT service) → origin namespace.

Needs root, ``ip`` and libnftables; everything happens inside namespaces these tests create.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appconnector.nat.render import TableSpec
from tests.nat.netns import (
    CLIENTS,
    HERE,
    ORIGIN,
    ORIGIN_B,
    POOL,
    TAILNET_IF,
    Driver,
    Topology,
    read_json_line,
    wait_for,
)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces and nftables"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if shutil.which("nft") is None:
        return "needs nftables (nft, libnftables1)"
    try:
        from appconnector.kernel.nftables import Nftables

        Nftables().close()
    except Exception as e:
        return f"needs libnftables: {e}"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]

CLI1, CLI2 = CLIENTS["cli1"], CLIENTS["cli2"]
ENV = {"tailnet_mode": "standalone", "tailnet_interface": TAILNET_IF, "pool_prefixes": POOL,
       "nat_max_mappings": 4096, "cluster_state_dir": "/tmp"}


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology().create()
    origin = t.spawn("origin", sys.executable, str(HERE / "origin.py"), ORIGIN, ORIGIN_B)
    assert origin.stdout is not None
    assert origin.stdout.readline().strip() == "ready"
    yield t
    t.destroy()


def client(topo: Topology, role: str, *args: str) -> dict[str, Any]:
    out = topo.run_in(role, sys.executable, str(HERE / "client.py"), *args, timeout=30).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def driver(topo: Topology, role: str = "conn1", **opts: Any) -> Driver:
    env = {**ENV, **opts.pop("env", {})}
    d = Driver(topo, role, env=env, **opts)
    assert d.hello["enabled"], d.hello
    return d


def nft(topo: Topology, role: str, *args: str) -> str:
    return topo.run_in(role, "nft", *args, check=False).stdout


@pytest.fixture
def conn(topo: Topology) -> Iterator[Driver]:
    d = driver(topo)
    yield d
    if d.proc.poll() is None:
        d.stop()


def test_tcp_udp_icmp_reach_the_real_address(topo: Topology, conn: Driver) -> None:
    r = conn.call("checkout", node=CLI1, domain="example.com", targets=[ORIGIN])
    assert r["installed"], "the mapping must be in the kernel when checkout returns (before DNS answers)"
    pool_ip = r["address"]
    got = client(topo, "cli1", "http", pool_ip)
    assert got["ok"], got
    assert got["body"].startswith(f"origin {ORIGIN} from 198.51.100.11"), got  # masqueraded to conn1
    assert client(topo, "cli1", "udp", pool_ip, "hello")["reply"] == f"echo {ORIGIN} hello"
    assert client(topo, "cli1", "icmp", pool_ip)["ok"]


def test_second_client_gets_its_own_mapping_and_unmapped_is_rejected(topo: Topology) -> None:
    conn = driver(topo, conntrack_interval=1.0)
    try:
        _second_client(topo, conn)
    finally:
        conn.stop()


def _second_client(topo: Topology, conn: Driver) -> None:
    a1 = conn.call("checkout", node=CLI1, domain="one.example", targets=[ORIGIN])["address"]
    a2 = conn.call("checkout", node=CLI1, domain="two.example", targets=[ORIGIN_B])["address"]
    b1 = conn.call("checkout", node=CLI2, domain="two.example", targets=[ORIGIN_B])["address"]
    assert client(topo, "cli1", "http", a2)["body"].startswith(f"origin {ORIGIN_B}")
    assert client(topo, "cli2", "http", b1)["body"].startswith(f"origin {ORIGIN_B}")
    assert b1 == a1  # every node has the whole pool: cli2's first address means two.example for it
    assert client(topo, "cli1", "http", a1)["body"].startswith(f"origin {ORIGIN}")
    # cli2 has no mapping for a2: its packets are rejected in the connector and counted
    before = _counter(topo, "unmapped_rejected")
    assert not client(topo, "cli2", "udp", a2, "nobody")["ok"]
    wait_for(lambda: _counter(topo, "unmapped_rejected") > before, 5, "the reject counter to count cli2's packet")
    wait_for(lambda: conn.call("status")["unmapped_rejects"] > 0, 5, "the unmapped-reject metric")


def _counter(topo: Topology, name: str) -> int:
    out = topo.run_in("conn1", "nft", "-j", "list", "counter", "inet", "appconnector", name).stdout
    return int(next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o))


UNMAPPED = "100.64.1.200"  # a pool address nobody was given
FAST = 1.0  # seconds: a rejected flow fails well inside this; a dropped one would wait for the 5 s timeout


def test_unmapped_pool_traffic_fails_fast_on_every_protocol(topo: Topology) -> None:
    d = driver(topo, conntrack_interval=1.0)
    try:
        before = _counter(topo, "unmapped_rejected")
        tcp = client(topo, "cli2", "connect", UNMAPPED)
        assert tcp["errno"] == "ECONNREFUSED" and tcp["seconds"] < FAST, tcp
        udp = client(topo, "cli2", "udperr", UNMAPPED)
        assert udp["errno"] in ("ECONNREFUSED", "EHOSTUNREACH") and udp["seconds"] < FAST, udp
        ping = client(topo, "cli2", "pingerr", UNMAPPED)
        assert (ping.get("type"), ping.get("code")) == (3, 13), f"want ICMP admin-prohibited: {ping}"
        assert ping["seconds"] < FAST, ping
        assert _counter(topo, "unmapped_rejected") >= before + 3
        wait_for(lambda: d.call("status")["unmapped_rejects"] >= before + 3, 5, "the unmapped-reject metric")
        # a mapped address is still steered, not rejected
        a = d.call("checkout", node=CLI2, domain="fine.example", targets=[ORIGIN])["address"]
        assert client(topo, "cli2", "connect", a)["ok"]
    finally:
        d.stop()


def test_rejects_past_the_rate_limit_are_dropped_and_counted(topo: Topology) -> None:
    # the shipped rate and burst
    spec = TableSpec(interface=TAILNET_IF, pool=(ipaddress.IPv4Network(POOL),), max_mappings=1)
    d = driver(topo, conntrack_interval=1.0)
    try:
        rejected, dropped = _counter(topo, "unmapped_rejected"), _counter(topo, "unmapped")
        t0 = time.monotonic()
        assert client(topo, "cli2", "flood", UNMAPPED, "3000")["sent"] > 0
        elapsed = time.monotonic() - t0
        more_rejected = _counter(topo, "unmapped_rejected") - rejected
        assert _counter(topo, "unmapped") > dropped, "packets past the limit must be dropped and counted"
        assert 0 < more_rejected <= spec.reject_burst + spec.reject_rate * (elapsed + 1), more_rejected
        wait_for(lambda: d.call("status")["unmapped_drops"] > 0, 5, "the unmapped-drop metric")
        # the bucket refills: a client after the flood is refused at once again
        wait_for(lambda: client(topo, "cli2", "connect", UNMAPPED).get("errno") == "ECONNREFUSED", 10,
                 "a reset once the limit has refilled")
    finally:
        d.stop()


def test_changed_target_steers_new_flows_and_existing_flows_keep_theirs(topo: Topology, conn: Driver) -> None:
    a = conn.call("checkout", node=CLI1, domain="moving.example", targets=[ORIGIN])["address"]
    assert client(topo, "cli1", "udp", a, "before", "40010")["reply"] == f"echo {ORIGIN} before"
    conn.call("set_targets", domain="moving.example", targets=[ORIGIN_B])
    assert client(topo, "cli1", "http", a)["body"].startswith(f"origin {ORIGIN_B}")
    # the same 5-tuple is still the old flow (its conntrack entry keeps its NAT)
    assert client(topo, "cli1", "udp", a, "during", "40010")["reply"] == f"echo {ORIGIN} during"


def test_a_full_seen_set_never_stops_steering(topo: Topology) -> None:
    d = driver(topo, env={"nat_max_mappings": 1024})
    try:
        fill = ", ".join(f"10.9.{i // 256}.{i % 256} . 100.64.1.9" for i in range(1024))
        topo.run_in("conn1", "nft", f"add element inet appconnector seen {{ {fill} }}")
        more = topo.run_in("conn1", "nft", "add element inet appconnector seen { 10.10.0.1 . 100.64.1.9 }",
                           check=False)
        assert more.returncode != 0, "the seen set should be full"
        a = d.call("checkout", node=CLI1, domain="full.example", targets=[ORIGIN])["address"]
        got = client(topo, "cli1", "http", a)
        assert got["ok"] and got["body"].startswith(f"origin {ORIGIN}"), got
    finally:
        d.stop()


def test_dns_address_is_a_local_route_while_running(topo: Topology) -> None:
    """Tailscale mode: DNS listens on the pool's reserved first address; it is made local on lo."""
    d = driver(topo, env={"tailnet_mode": "tailscale"})
    try:
        local = topo.run_in("conn1", "ip", "route", "show", "table", "local").stdout
        assert any(line.startswith("local 100.64.1.0 dev lo") and "scope host" in line
                   for line in local.splitlines()), local
    finally:
        d.stop()
    assert "100.64.1.0" not in topo.run_in("conn1", "ip", "route", "show", "table", "local").stdout


def test_table_removed_behind_our_back_is_rebuilt_on_the_next_change(topo: Topology, conn: Driver) -> None:
    a = conn.call("checkout", node=CLI1, domain="kept.example", targets=[ORIGIN])["address"]
    topo.run_in("conn1", "nft", "delete", "table", "inet", "appconnector")
    assert not client(topo, "cli1", "udp", a, "gone")["ok"], "without our table nothing steers"
    b = conn.call("checkout", node=CLI1, domain="next.example", targets=[ORIGIN_B])
    assert b["installed"], "the refused delta must have been followed by a full rebuild"
    assert client(topo, "cli1", "http", a)["body"].startswith(f"origin {ORIGIN}")
    assert client(topo, "cli1", "http", b["address"])["body"].startswith(f"origin {ORIGIN_B}")
    assert not conn.call("status")["out_of_sync"]


def test_restart_rebuilds_and_stop_leaves_only_others_tables(topo: Topology, tmp_path: Path) -> None:
    topo.run_in("conn1", "nft", "add table inet acnat_other; add chain inet acnat_other c; "
                "add rule inet acnat_other c counter accept")
    unrelated = nft(topo, "conn1", "list", "table", "inet", "acnat_other")
    snap = str(tmp_path / "pool.snapshot")
    d = driver(topo, snapshot=snap)
    a = d.call("checkout", node=CLI1, domain="restart.example", targets=[ORIGIN])["address"]
    assert client(topo, "cli1", "http", a)["ok"]
    d.stop()
    assert "appconnector" not in nft(topo, "conn1", "list", "tables"), "stop must remove our table"
    assert nft(topo, "conn1", "list", "table", "inet", "acnat_other") == unrelated
    assert not client(topo, "cli1", "udp", a, "down")["ok"], "nothing steers while the connector is down"
    # a new process rebuilds the table from the pool alone: no checkout needed
    d2 = driver(topo, snapshot=snap)
    try:
        assert d2.call("installed", node=CLI1, address=a)["installed"]
        got = client(topo, "cli1", "http", a)
        assert got["ok"] and got["body"].startswith(f"origin {ORIGIN}"), got
        # a crash leaves the table; the next start replaces it atomically and keeps steering
        d2.kill()
        assert "appconnector" in nft(topo, "conn1", "list", "tables")
        d3 = driver(topo, snapshot=snap)
        assert client(topo, "cli1", "http", a)["ok"]
        d3.stop()
    finally:
        if d2.proc.poll() is None:
            d2.stop()
        topo.run_in("conn1", "nft", "delete", "table", "inet", "acnat_other", check=False)
    assert nft(topo, "conn1", "list", "tables").strip() == ""


def test_standby_steers_from_the_first_packet_after_failover(topo: Topology, tmp_path: Path) -> None:
    """Two connectors mirror one pool (the same commands applied to each member's state); the client's
    subnet route moves to the standby, whose kernel already holds the mapping."""
    c1, c2 = driver(topo, "conn1"), driver(topo, "conn2")
    try:
        a = c1.call("checkout", node=CLI1, domain="failover.example", targets=[ORIGIN])["address"]
        assert c2.call("checkout", node=CLI1, domain="failover.example", targets=[ORIGIN])["address"] == a
        assert client(topo, "cli1", "http", a)["body"].startswith(f"origin {ORIGIN} from 198.51.100.11")
        topo.route_via("conn2")
        # first packet of a new flow through the standby: one UDP datagram, no retry
        assert client(topo, "cli1", "udp", a, "first")["reply"] == f"echo {ORIGIN} first"
        assert client(topo, "cli1", "http", a)["body"].startswith(f"origin {ORIGIN} from 198.51.100.12")
    finally:
        topo.route_via("conn1")
        c1.stop()
        c2.stop()


def test_standby_of_a_raft_cluster_steers_after_failover(topo: Topology, tmp_path: Path) -> None:
    """Two connectors forming a real 2-member Raft cluster across their namespaces: a checkout through
    one is applied by both, and the standby's kernel steers the first packet after the route moves."""
    pytest.importorskip("appconnector.pool.replica", reason="RaftReplica not available")
    members = {"conn1": "100.101.0.11:16270", "conn2": "100.101.0.12:16270"}
    drivers = {}
    try:
        for role, me in members.items():
            raft = {"self": me, "peers": [p for p in members.values() if p != me], "secret": "acnat-test"}
            drivers[role] = driver(topo, role, raft=raft, env={"cluster_state_dir": str(tmp_path / role)})
        wait_for(lambda: any(d.call("status")["leader"] for d in drivers.values()), 20, "a Raft leader")
        c1, c2 = drivers["conn1"], drivers["conn2"]
        a = c1.call("checkout", node=CLI1, domain="raft.example", targets=[ORIGIN], timeout=30)["address"]
        assert client(topo, "cli1", "http", a)["body"].startswith(f"origin {ORIGIN} from 198.51.100.11")
        wait_for(lambda: c2.call("installed", node=CLI1, address=a)["installed"], 10,
                 "the standby to mirror the mapping")
        topo.route_via("conn2")
        assert client(topo, "cli1", "udp", a, "first")["reply"] == f"echo {ORIGIN} first"
        assert client(topo, "cli1", "http", a)["body"].startswith(f"origin {ORIGIN} from 198.51.100.12")
    finally:
        topo.route_via("conn1")
        for d in drivers.values():
            d.stop()


def test_thousand_flows_make_a_handful_of_touches(topo: Topology) -> None:
    d = driver(topo, seen_interval=1.0, touch_refresh=0.0)
    try:
        before = time.time()
        a = d.call("checkout", node=CLI1, domain="busy.example", targets=[ORIGIN])["address"]
        used0 = d.call("lookup", node=CLI1, domain="busy.example")["last_used"]
        base = d.call("status")
        assert base["last_reconcile"] >= before, "the mapping's nftables change is the last reconcile (metric)"
        got = client(topo, "cli1", "flows", a, "1000")
        assert got["replies"] >= 990, got
        wait_for(lambda: d.call("lookup", node=CLI1, domain="busy.example")["last_used"] > used0, 10,
                 "last_used of the mapping to advance")
        # the seen set holds the pair ≤ 3 s; one read per second → at most a few marks, never 1,000
        wait_for(lambda: "busy" not in nft(topo, "conn1", "list", "set", "inet", "appconnector", "seen")
                 and a not in nft(topo, "conn1", "list", "set", "inet", "appconnector", "seen"), 10,
                 "the seen set to expire")
        st = d.call("status")
        assert 1 <= st["touch_calls"] - base["touch_calls"] <= 5, st
        assert 1 <= st["touch_batches"] - base["touch_batches"] <= 5, st
        assert st["seen_reads"] > base["seen_reads"], "each read of the seen set is counted (metric)"
    finally:
        d.stop()


def test_long_flow_is_touched_from_conntrack(topo: Topology) -> None:
    """A flow older than the seen set's memory still marks its mapping as used (conntrack dump)."""
    d = driver(topo, seen_interval=1.0, conntrack_interval=1.0, touch_refresh=0.0)
    try:
        a = d.call("checkout", node=CLI1, domain="long.example", targets=[ORIGIN])["address"]
        holder = topo.spawn("cli1", sys.executable, str(HERE / "client.py"), "hold", a, "7")
        # the seen entry (3 s) expires while the flow goes on; conntrack keeps it visible
        wait_for(lambda: a not in nft(topo, "conn1", "list", "set", "inet", "appconnector", "seen")
                 and d.call("status")["touch_calls"] > 0, 10, "the seen entry to expire")
        t_expired = d.call("lookup", node=CLI1, domain="long.example")["last_used"]
        wait_for(lambda: d.call("lookup", node=CLI1, domain="long.example")["last_used"] > t_expired + 0.5, 5,
                 "a touch from the conntrack dump")
        assert read_json_line(holder, 15)["replies"] > 10
    finally:
        d.stop()


def test_reassigned_address_drops_old_flows(topo: Topology) -> None:
    """When a mapping goes (forget, or the address moves to another domain) its conntrack entries go
    too: the next packet of the same 5-tuple is steered by the new mapping, not the old one."""
    d = driver(topo)
    try:
        old = d.call("checkout", node=CLI1, domain="old.example", targets=[ORIGIN])["address"]
        assert client(topo, "cli1", "udp", old, "x", "40001")["reply"] == f"echo {ORIGIN} x"
        assert _ct_count(topo, old) >= 1
        d.call("forget", nodes=[CLI1])
        wait_for(lambda: _ct_count(topo, old) == 0, 5,
                 lambda: f"conntrack entries of the forgotten mapping to go: {d.log()} {_ct(topo)}")
        new = d.call("checkout", node=CLI1, domain="new.example", targets=[ORIGIN_B])["address"]
        if new == old:  # same address, same 5-tuple: must now reach the new domain
            assert client(topo, "cli1", "udp", new, "y", "40001")["reply"] == f"echo {ORIGIN_B} y"
    finally:
        d.stop()


def test_revoked_mapping_stops_a_flow_mid_way(topo: Topology) -> None:
    """Access revoked (``release_batch``, as the leader's access guard proposes it) while a UDP flow
    runs: its conntrack entry goes and no reply comes through the pool address after the release;
    the node's other mapping keeps working."""
    d = driver(topo)
    try:
        a = d.call("checkout", node=CLI1, domain="revoked.example", targets=[ORIGIN])["address"]
        kept = d.call("checkout", node=CLI1, domain="kept.example", targets=[ORIGIN_B])["address"]
        # flows of earlier tests to the same pool address (same node, fresh pool) would pass for ours
        topo.run_in("conn1", "conntrack", "-D", "-s", CLI1, "-d", a, check=False)
        holder = topo.spawn("cli1", sys.executable, str(HERE / "client.py"), "hold", a, "6")
        wait_for(lambda: _ct_replied(topo, a), 5, lambda: f"the flow to be answered: {_ct(topo)}")
        released_at = time.monotonic()
        d.call("release", pairs=[[CLI1, "revoked.example"]])
        wait_for(lambda: _ct_count(topo, a) == 0, 5,
                 lambda: f"conntrack entries of the released mapping to go: {d.log()} {_ct(topo)}")
        got = read_json_line(holder, 15)
        assert got["replies"] >= 1, got  # the flow did work before
        # the next packet after the release finds no mapping (0.2 s between packets; generous bound)
        assert got["last_reply"] < released_at + 2.0, got
        assert d.call("lookup", node=CLI1, domain="revoked.example")["address"] is None
        assert client(topo, "cli1", "udp", kept, "k")["reply"] == f"echo {ORIGIN_B} k"
    finally:
        d.stop()


def _ct_replied(topo: Topology, pool_ip: str) -> bool:
    """cli1 has a flow to ``pool_ip`` that got replies (its conntrack entry is not UNREPLIED)."""
    out = topo.run_in("conn1", "conntrack", "-L", "-s", CLI1, "-d", pool_ip, check=False)
    return any(pool_ip in line and "UNREPLIED" not in line for line in out.stdout.splitlines())


def _ct_count(topo: Topology, pool_ip: str) -> int:
    """Conntrack entries of cli1's flows to ``pool_ip``."""
    out = topo.run_in("conn1", "conntrack", "-L", "-s", CLI1, "-d", pool_ip, check=False)
    return sum(1 for line in out.stdout.splitlines() if pool_ip in line)


def test_no_forwarding_means_dns_only_without_traceback(topo: Topology) -> None:
    topo.run_in("conn2", "sysctl", "-qw", "net.ipv4.ip_forward=0")
    try:
        d = Driver(topo, "conn2", env=ENV)
        assert not d.hello["enabled"]
        assert "forwarding" in d.hello["reason"]
        log = d.stop()
        assert "Traceback" not in log
        assert sum("DNS-only" in line for line in log.splitlines()) == 1, log
        assert "appconnector" not in nft(topo, "conn2", "list", "tables")
    finally:
        topo.run_in("conn2", "sysctl", "-qw", "net.ipv4.ip_forward=1")


def test_without_net_admin_means_dns_only_without_traceback(topo: Topology) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop CAP_NET_ADMIN")
    d = Driver(topo, "conn2", wrapper=("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"), env=ENV)
    assert not d.hello["enabled"]
    assert "CAP_NET_ADMIN" in d.hello["reason"]
    log = d.stop()
    assert "Traceback" not in log
    assert sum("DNS-only" in line for line in log.splitlines()) == 1, log


def _ct(topo: Topology) -> str:
    return topo.run_in("conn1", "conntrack", "-L", check=False).stdout[-2000:]


# ---- the kernel worker: nftables off the apply thread ---------------------------------------------------

def test_apply_returns_at_once_while_the_worker_is_in_a_slow_rebuild(topo: Topology) -> None:
    """Every nftables transaction takes 1.5 s here (a big table, a busy kernel). The pool's apply
    callback must not wait for it (on the Raft apply thread a second there costs the leader its term):
    a burst of changes during a refused delta and the rebuild after it returns at once, and lands in
    the kernel with that one rebuild."""
    d = driver(topo, env={"nat_max_mappings": 4096}, nft_delay=1.5)
    try:
        a = d.call("checkout", node=CLI1, domain="before.example", targets=[ORIGIN])
        assert a["installed"]
        base = d.call("status")["reconciles"]
        topo.run_in("conn1", "nft", "delete", "table", "inet", "appconnector")  # the next delta is refused
        burst = d.call("burst", node=CLI1, domain="burst.example", n=30, targets=[ORIGIN_B],
                       wait_busy=True)
        assert burst["status"]["worker"] != "idle", json.dumps(burst["status"])
        assert burst["max_apply_seconds"] < 0.5, burst  # one slow transaction alone takes 1.5 s
        done = d.call("ready", timeout=30)
        assert done["status"]["pending"] == 0 and not done["status"]["out_of_sync"], done
        st = d.call("status")
        grew = {k: v - base.get(k, 0) for k, v in st["reconciles"].items()}
        assert grew.get("delta/error") == 1 and grew.get("full/ok") == 1, grew
        assert grew.get("delta/ok", 0) <= 1, f"the burst must be coalesced into the rebuild: {grew}"
        for i in (0, 29):
            addr = d.call("lookup", node=CLI1, domain=f"{i}.burst.example")["address"]
            assert d.call("installed", node=CLI1, address=addr)["installed"]
        assert client(topo, "cli1", "http", a["address"])["body"].startswith(f"origin {ORIGIN}")
        last = d.call("lookup", node=CLI1, domain="29.burst.example")["address"]
        assert client(topo, "cli1", "http", last)["body"].startswith(f"origin {ORIGIN_B}")
    finally:
        d.stop()


def test_a_burst_of_changes_is_coalesced_into_few_transactions(topo: Topology) -> None:
    d = driver(topo, nft_delay=1.0)
    try:
        base = d.call("status")["reconciles"]
        burst = d.call("burst", node=CLI1, domain="many.example", n=40, targets=[ORIGIN], wait_busy=True)
        assert burst["max_apply_seconds"] < 0.5, burst
        d.call("ready", timeout=30)
        st = d.call("status")
        deltas = st["reconciles"].get("delta/ok", 0) - base.get("delta/ok", 0)
        assert 1 <= deltas <= 3, f"40 changes while a 1 s transaction runs: {deltas} transactions"
        assert st["steer_elements"] == 40 and not st["out_of_sync"], st
        addr = d.call("lookup", node=CLI1, domain="39.many.example")["address"]
        assert client(topo, "cli1", "udp", addr, "late")["reply"] == f"echo {ORIGIN} late"
    finally:
        d.stop()


def test_a_failing_worker_is_reported_and_recovers(topo: Topology) -> None:
    """A steer map that cannot take the pool (more mappings than nat.max_mappings) makes the worker's
    rebuild fail: that is logged, counted, shown in status (unready), retried with backoff, and once
    the pool fits again (a node forgotten) the table is rebuilt and steers."""
    d = driver(topo, env={"nat_max_mappings": 1024})
    try:
        kept = d.call("checkout", node=CLI1, domain="kept.example", targets=[ORIGIN])["address"]
        nodes = [f"100.101.9.{i}" for i in range(1, 6)]
        d.call("burst", nodes=nodes, domain="fill.example", n=205, targets=[ORIGIN_B])  # 1,026 mappings
        st = wait_for(lambda: (s := d.call("status"))["worker_errors"] >= 2 and s, 20,
                      lambda: f"the failed rebuild to be retried and counted: {d.call('status')}")
        assert st["out_of_sync"] and st["worker_failures"] >= 2, st
        assert "rebuilding table inet appconnector failed" in d.log()
        d.call("forget", nodes=nodes[:1])
        wait_for(lambda: not d.call("status")["out_of_sync"], 40, "the retried rebuild to succeed")
        assert d.call("status")["worker_failures"] == 0
        assert d.call("installed", node=CLI1, address=kept)["installed"]
        assert client(topo, "cli1", "http", kept)["body"].startswith(f"origin {ORIGIN}")
    finally:
        d.stop()


def test_a_slow_kernel_does_not_cost_the_raft_leader_its_term(topo: Topology, tmp_path: Path) -> None:
    """A real 2-member Raft cluster whose NAT transactions take 2.5 s each (and the leader's table was
    flushed behind its back, so a rebuild follows a refused delta): the members' apply threads keep
    ticking, so the leader keeps its term, writes keep committing meanwhile, and both kernels end up
    steering every mapping."""
    members = {"conn1": "100.101.0.11:16271", "conn2": "100.101.0.12:16271"}
    drivers: dict[str, Driver] = {}
    try:
        for role, me in members.items():
            raft = {"self": me, "peers": [p for p in members.values() if p != me], "secret": "acnat-test"}
            drivers[role] = driver(topo, role, raft=raft, nft_delay=2.5,
                                   env={"cluster_state_dir": str(tmp_path / role)})
        leader = wait_for(lambda: next((d for d in drivers.values() if d.call("status")["leader"]), None), 20,
                          "a Raft leader")
        first = leader.call("checkout", node=CLI1, domain="term.example", targets=[ORIGIN], timeout=30)
        assert first["installed"]
        term = leader.call("status")["term"]
        topo.run_in(leader.role, "nft", "delete", "table", "inet", "appconnector")
        burst = leader.call("burst", node=CLI1, domain="during.example", n=20, targets=[ORIGIN_B], timeout=60)
        assert burst["max_apply_seconds"] < 1.0, burst  # committed through Raft while the kernel is busy
        for d in drivers.values():
            d.call("ready", timeout=60)
        st = leader.call("status")
        assert st["leader"] and st["term"] == term, f"leadership changed: term {term} → {st['term']}"
        last = leader.call("lookup", node=CLI1, domain="19.during.example")["address"]
        for d in drivers.values():
            assert d.call("installed", node=CLI1, address=last)["installed"]
        assert client(topo, "cli1", "http", last)["body"].startswith(f"origin {ORIGIN_B}")
    finally:
        for d in drivers.values():
            d.stop()


def test_a_bug_in_the_worker_is_reported_and_does_not_stop_steering(topo: Topology) -> None:
    """An unexpected exception in the worker (planted: the first two rebuilds raise) is logged with its
    traceback, counted as appconnector_nat_worker_errors{kind="internal"}, and retried: the table is
    rebuilt and steers."""
    d = driver(topo, break_rebuilds=2)
    try:
        a = d.call("checkout", node=CLI1, domain="bug.example", targets=[ORIGIN])["address"]
        topo.run_in("conn1", "nft", "delete", "table", "inet", "appconnector")  # the next delta is refused
        d.call("checkout", node=CLI1, domain="bug2.example", targets=[ORIGIN_B])  # ready() does not wait out a backoff
        st = wait_for(lambda: (s := d.call("status"))["worker_errors_internal"] == 2 and not s["out_of_sync"] and s,
                      20, lambda: f"the retried rebuild to succeed: {d.call('status')}")
        assert st["worker_failures"] == 0 and not st["fatal"], st
        assert "planted bug in rebuild" in d.log() and "the kernel worker failed" in d.log()
        assert client(topo, "cli1", "http", a)["body"].startswith(f"origin {ORIGIN}")
    finally:
        d.stop()


def test_a_worker_that_keeps_failing_is_reported_fatal_once(topo: Topology) -> None:
    """Every rebuild raising (a bug that stays): after FATAL_AFTER failures in a row the service tells
    its on_fatal (the connector then exits 1, and its supervisor restarts it), once."""
    from appconnector.nat.service import FATAL_AFTER

    d = driver(topo, break_rebuilds=1000)
    try:
        d.call("checkout", node=CLI1, domain="doomed.example", targets=[ORIGIN])
        topo.run_in("conn1", "nft", "delete", "table", "inet", "appconnector")
        d.call("burst", node=CLI1, domain="more.example", n=1, targets=[ORIGIN])
        st = wait_for(lambda: (s := d.call("status"))["fatal"] and s, 30, "the fatal report")
        assert len(st["fatal"]) == 1 and "kernel worker failed" in st["fatal"][0], st
        assert st["worker_errors_internal"] >= FATAL_AFTER and st["out_of_sync"], st
    finally:
        d.stop()
