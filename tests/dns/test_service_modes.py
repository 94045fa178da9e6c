"""The DNS service where things go wrong or are configured differently: failing upstreams, a full or
stopped pool, the allow-list, strangers (tailnet identity with the LocalAPI stand-in), touches,
reassignment and draining on stop. Real sockets throughout."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from appconnector.metrics import REGISTRY
from appconnector.tailnet.api import NodeIdentity
from appconnector.tailnet.identity import TailnetIdentity
from appconnector.tailnet.localapi import LocalAPIClient
from tests.dns.conftest import Running, StubUpstream, Unbound, make_config, wait_until
from tests.localapi_standin import Standin

Start = Callable[..., Running]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def a_of(m: dns.message.Message) -> list[str]:
    return sorted(rr.address for rrset in m.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset)


@pytest.mark.parametrize("mode", ["silent", "servfail", "refused"])
def test_upstream_failure_is_servfail(running: Start, stub: StubUpstream, mode: str) -> None:
    stub.mode = mode
    r = running(make_config(upstream=[f"127.0.0.1:{stub.port}"]), upstream_timeout=0.3)
    before = metric("appconnector_dns_servfail_total", reason="upstream")
    m = r.query("app.example")
    assert m.rcode() == dns.rcode.SERVFAIL and not m.answer
    assert metric("appconnector_dns_servfail_total", reason="upstream") == before + 1
    assert r.pool.lookup("127.0.0.1", "app.example") is None


def test_next_resolver_is_asked_when_the_first_fails(running: Start, stub: StubUpstream, unbound: Unbound) -> None:
    stub.mode = "silent"
    r = running(make_config(upstream=[f"127.0.0.1:{stub.port}", f"127.0.0.1:{unbound.port}"]),
                upstream_timeout=0.3)
    [address] = a_of(r.query("app.test"))
    assert ipaddress.ip_address(address) in ipaddress.ip_network("100.64.1.0/24")
    assert stub.queries >= 1


def test_truncated_upstream_answer_is_retried_over_tcp(running: Start, stub: StubUpstream) -> None:
    stub.mode = "truncate"
    r = running(make_config(upstream=[f"127.0.0.1:{stub.port}"]))
    assert r.query("tc.example").rcode() == dns.rcode.NOERROR
    assert stub.tcp_queries == 1
    assert r.pool.targets("tc.example") == (int(ipaddress.IPv4Address("192.0.2.99")),)


def test_exhausted_pool_is_servfail_with_metric(running: Start, unbound: Unbound) -> None:
    # /30: four addresses, the lowest is the DNS address: three to hand out
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], pool_prefixes="100.64.9.0/30"))
    got = [a_of(r.query(f"n{i}.test")) for i in range(3)]
    assert len({a[0] for a in got}) == 3
    before = metric("appconnector_dns_servfail_total", reason="exhausted")
    m = r.query("n3.test")
    assert m.rcode() == dns.rcode.SERVFAIL
    assert metric("appconnector_dns_servfail_total", reason="exhausted") == before + 1
    assert a_of(r.query("n0.test")) == got[0]  # known names keep working


def test_unavailable_pool_is_servfail(running: Start, unbound: Unbound) -> None:
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"]))
    known = a_of(r.query("app.test"))
    r.call(r.pool.stop())
    assert r.query("other.test").rcode() == dns.rcode.SERVFAIL  # a write: nobody to commit it
    assert a_of(r.query("app.test")) == known                    # a read: still answered


def test_verify_upstream_off_answers_any_name_without_asking(running: Start, stub: StubUpstream) -> None:
    r = running(make_config(upstream=[f"127.0.0.1:{stub.port}"], dns_verify_upstream="false"))
    m = r.query("anything.invalid")
    assert m.rcode() == dns.rcode.NOERROR and len(a_of(m)) == 1
    assert stub.queries == 0


def test_allow_list_refuses_other_names(running: Start, unbound: Unbound) -> None:
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], dns_domains="app.test,*.allowed.test"))
    assert r.query("app.test").rcode() == dns.rcode.NOERROR
    assert r.query("x.allowed.test").rcode() == dns.rcode.NOERROR
    assert r.query("allowed.test").rcode() == dns.rcode.REFUSED      # "*." is below, not the apex
    assert r.query("other.test").rcode() == dns.rcode.REFUSED
    assert r.query("other.test", "SOA").rcode() == dns.rcode.REFUSED
    assert r.pool.lookup("127.0.0.1", "other.test") is None


def test_strangers_are_refused_and_nodes_keyed_by_stable_id(running: Start, unbound: Unbound,
                                                            tmp_path: Path) -> None:
    sock = str(tmp_path / "tailscaled.sock")
    standin = Standin(sock, {"peers": [{"stable_id": "nClientA", "name": "client-a",
                                        "addresses": ["127.0.0.2"]}]})

    async def identity() -> NodeIdentity:
        await standin.start()
        return TailnetIdentity(LocalAPIClient(sock))

    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], tailnet_mode="tailscale"),
                identity_factory=identity)
    try:
        m = r.query("app.test", source="127.0.0.2")
        assert m.rcode() == dns.rcode.NOERROR and len(a_of(m)) == 1
        assert r.pool.lookup("nClientA", "app.test") is not None
        before = metric("appconnector_dns_unknown_clients_total")
        for rdtype in ("A", "SOA"):
            m = r.query("app.test", rdtype, source="127.0.0.3")
            assert m.rcode() == dns.rcode.REFUSED and not m.answer
        assert metric("appconnector_dns_unknown_clients_total") == before + 2
    finally:
        r.call(standin.stop())


def test_hits_touch_last_used_once_per_refresh_interval(running: Start, unbound: Unbound) -> None:
    # reuse_after 8s → refresh interval 1s (min(5 min, reuse_after / 8))
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], pool_reuse_after="8s"))
    r.query("app.test")
    first = r.pool.lookup("127.0.0.1", "app.test")
    assert first is not None

    def touched() -> bool:
        r.query("app.test")
        now = r.pool.lookup("127.0.0.1", "app.test")
        return now is not None and now[1] > first[1]
    wait_until(touched, 6, "a DNS hit to refresh last-used")


def test_reassigned_address_is_not_served_from_a_stale_fast_answer(running: Start, unbound: Unbound) -> None:
    # three addresses, reusable after 4s idle (the smallest reuse_after accepted): the fourth name takes
    # the least recently used one
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], pool_prefixes="100.64.9.0/30",
                            pool_reuse_after="4s"))
    first = a_of(r.query("n0.test"))
    for i in (1, 2):
        r.query(f"n{i}.test")
    wait_until(lambda: r.query("n5.test").rcode() == dns.rcode.NOERROR, 12, "n5 to reuse an idle address")
    n5 = a_of(r.query("n5.test"))
    assert n5 == first and r.pool.lookup("127.0.0.1", "n0.test") is None  # n0 was the least recently used
    n0 = r.query("n0.test")
    assert a_of(n0) != n5, "n0 and n5 must never share an address"


def test_an_address_dropped_from_the_pool_is_not_served_from_a_stale_fast_answer(
        running: Start, unbound: Unbound) -> None:
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"]))
    [first] = a_of(r.query("n0.test"))
    query = dns.message.make_query("n0.test", "A").to_wire()
    assert r.service is not None and r.service.fast.answer(query, "127.0.0.1"), "a ready fast answer"
    # a tailnet node turns out to hold that address: the pool drops the mapping (set_excluded)
    r.call(r.pool.set_excluded([int(ipaddress.IPv4Address(first))]))
    assert r.service.fast.answer(query, "127.0.0.1") is None
    [again] = a_of(r.query("n0.test"))
    assert again != first, "never the dropped address again"


def test_stop_drains_queries_in_flight(running: Start, stub: StubUpstream) -> None:
    stub.mode, stub.delay = "delay", 0.5
    r = running(make_config(upstream=[f"127.0.0.1:{stub.port}"]), upstream_timeout=3)
    result: dict[str, dns.message.Message] = {}
    t = threading.Thread(target=lambda: result.setdefault("m", r.query("slow.example")))
    t.start()
    wait_until(lambda: stub.queries >= 1, 5, "the query to reach the upstream")
    started = time.monotonic()
    r.call(r.service.stop())  # type: ignore[union-attr]
    t.join(5)
    assert result["m"].rcode() == dns.rcode.NOERROR and len(a_of(result["m"])) == 1
    assert time.monotonic() - started < 5
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query("x.example", "A"), r.host, port=r.port, timeout=0.3)


def test_stop_does_not_wait_for_idle_tcp_connections(running: Start, stub: StubUpstream) -> None:
    import socket
    r = running(make_config(upstream=[f"127.0.0.1:{stub.port}"]))
    with socket.create_connection((r.host, r.port), timeout=5) as idle:
        assert r.query("a.example", tcp=True).rcode() == dns.rcode.NOERROR
        started = time.monotonic()
        r.call(r.service.stop())  # type: ignore[union-attr]
        assert time.monotonic() - started < 2  # not the 5 s drain deadline, not the 10 s idle timeout
        assert idle.recv(1) == b""  # closed by the server


def test_a_taken_port_is_a_clear_error_naming_dns_listen(stub: StubUpstream) -> None:
    import socket

    from tests.dns.conftest import free_port
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        with pytest.raises(OSError, match=r"dns\.listen"):
            Running(make_config(upstream=[f"127.0.0.1:{stub.port}"], port=port))


def test_works_on_the_default_asyncio_loop_too(running: Start, unbound: Unbound) -> None:
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"]), use_uvloop=False)
    first = a_of(r.query("app.test"))
    assert len(first) == 1
    assert a_of(r.query("app.test")) == first == a_of(r.query("app.test", tcp=True))
    assert r.service.fast.hits >= 2  # type: ignore[union-attr]



@pytest.mark.parametrize("replica_kind", ["local"])  # builds the idle mapping with LocalPool's raw apply
def test_a_mapping_idle_near_reuse_after_is_confirmed_through_the_pool(running: Start, unbound: Unbound) -> None:
    """A lagging member may hold a mapping the cluster already reused; only a mapping idle for nearly
    ``reuse_after`` can be affected, so such a hit is confirmed by a checkout (applied before the answer
    leaves) instead of being answered from local state with a queued touch."""
    # reuse_after 8s → refresh 1s → local answers only for mappings used within the last 7s
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], pool_reuse_after="8s"))
    old = r.pool.now()  # pool time: used at old, then the pool clock ticks 7.5 s on
    r.pool.apply(("tick", old))
    [address] = r.pool.apply(("checkout_batch", (("127.0.0.1", "app.test", (), 60.0),), old, old - 8))
    r.pool.apply(("tick", old + 7.5))
    before = r.pool.now()
    assert a_of(r.query("app.test")) == [str(ipaddress.IPv4Address(address))]
    now = r.pool.lookup("127.0.0.1", "app.test")
    assert now is not None and now[0] == address
    assert now[1] >= before, "the answer waited for a checkout that marked the mapping used now"
    # answered again at once: now a recent mapping, from local state (and the fast path)
    assert a_of(r.query("app.test")) == [str(ipaddress.IPv4Address(address))]


def test_tcp_connections_count_against_the_in_flight_limit(running: Start, stub: StubUpstream) -> None:
    """Open TCP connections take places in the in-flight limit like UDP queries: beyond it a new
    connection is closed unanswered (counted), and a connection idle between queries gives its place
    up to a new query (RFC 7766: a server under pressure may close idle connections)."""
    import socket
    import struct
    stub.mode, stub.delay = "delay", 1.0
    r = running(make_config(upstream=[f"127.0.0.1:{stub.port}"]), upstream_timeout=5)
    assert r.service is not None
    r.service.server.max_inflight = 2

    def send(conn: socket.socket, name: str) -> None:
        wire = dns.message.make_query(name, "A").to_wire()
        conn.sendall(struct.pack("!H", len(wire)) + wire)

    def answer(conn: socket.socket) -> dns.message.Message:
        (n,) = struct.unpack("!H", conn.recv(2))
        data = b""
        while len(data) < n:
            data += conn.recv(n - len(data))
        return dns.message.from_wire(data)

    tcp0 = metric("appconnector_dns_dropped_total", transport="tcp")
    udp0 = metric("appconnector_dns_dropped_total", transport="udp")
    busy = [socket.create_connection((r.host, r.port), timeout=8) for _ in range(2)]
    try:
        for i, conn in enumerate(busy):
            send(conn, f"slow{i}.example")
        wait_until(lambda: stub.queries >= 1, 5, "the first slow query to reach the upstream")
        # and both connections past reading their query: one still waiting for it is idle, and would
        # rightly give its place up to the extra connection
        server = r.service.server
        wait_until(lambda: len(server._tasks) >= 2 and not server._idle, 5, "both slow queries in flight")
        with socket.create_connection((r.host, r.port), timeout=5) as extra:
            send(extra, "extra.example")
            assert extra.recv(2) == b"", "a connection beyond the limit is closed unanswered"
        assert metric("appconnector_dns_dropped_total", transport="tcp") == tcp0 + 1
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(dns.message.make_query("udp.example", "A"), r.host, port=r.port, timeout=0.3)
        assert metric("appconnector_dns_dropped_total", transport="udp") == udp0 + 1
        assert all(answer(conn).rcode() == dns.rcode.NOERROR for conn in busy)
        # both connections are idle now: a new query takes the place of one of them
        assert r.query("fresh.example").rcode() == dns.rcode.NOERROR
        closed = 0
        for conn in busy:
            conn.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                closed += conn.recv(1) == b""
        assert closed == 1, "exactly one idle connection made room"
    finally:
        for conn in busy:
            conn.close()


@pytest.mark.parametrize("replica_kind", ["local"])  # stands a LocalPool in for a member catching up
def test_a_member_catching_up_confirms_every_hit_through_the_pool(running: Start, unbound: Unbound) -> None:
    """A member replaying or fetching a backlog reads the pool clock late by that backlog, so no idle
    time it computes can vouch for a local answer: hits go through a checkout until it is current."""
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"]))
    [address] = a_of(r.query("app.test"))
    assert r.service is not None
    for _ in range(3):
        assert a_of(r.query("app.test")) == [address]
    assert r.service.fast.hits > 0, "while caught up, hits are answered from local state"
    r.pool.caught_up = lambda: False  # what RaftReplica reports while behind the leader's commit index
    wait_until(lambda: r.service is not None and r.service.fast.now == math.inf, 5, "the fast path to stand down")
    hits, applied = r.service.fast.hits, r.pool.status()["applied_index"]
    for _ in range(3):
        assert a_of(r.query("app.test")) == [address]
    assert r.service.fast.hits == hits, "nothing answered from local state"
    assert r.pool.status()["applied_index"] >= applied + 3, "each answer was confirmed by a checkout"
