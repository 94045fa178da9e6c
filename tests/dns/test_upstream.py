"""The upstream resolver against real servers on loopback (Unbound, and the dnslib stub for failures)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import dnslib

from appconnector.dns import wire
from appconnector.dns.policy import Resolution
from appconnector.dns.upstream import UpstreamResolver, interpret, system_resolvers
from appconnector.metrics import REGISTRY
from tests.dns.conftest import StubUpstream, Unbound, free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_answers_nxdomain_nodata_and_cache_by_ttl_and_soa_minimum(unbound: Unbound) -> None:
    clock = FakeClock()
    r = UpstreamResolver([("127.0.0.1", unbound.port)], clock=clock)

    async def go() -> None:
        ok = await r.resolve("app.test", wire.TYPE_A)
        assert ok == Resolution("ok", ("192.0.2.10", "192.0.2.11"), 300)
        nx = await r.resolve("nope.test", wire.TYPE_A)
        assert nx.kind == "nxdomain" and nx.ttl == 60  # the zone's SOA minimum
        nodata = await r.resolve("v6only.test", wire.TYPE_A)
        assert nodata.kind == "nodata" and nodata.ttl == 60
        assert await r.ipv4_targets("app.test") == ([0xC000020A, 0xC000020B], 300.0)
        six = await r.resolve("v6only.test", wire.TYPE_AAAA)
        assert six.addresses == ("2001:db8::1",)
        unbound_port, r.servers = r.servers, [("127.0.0.1", 9)]  # nothing listens: only the cache answers
        clock.now += 59
        assert (await r.resolve("nope.test", wire.TYPE_A)).kind == "nxdomain"
        cached = await r.resolve("app.test", wire.TYPE_A)
        assert cached.kind == "ok" and cached.ttl == 241  # the remaining TTL
        clock.now += 2  # past the negative TTL, still inside the positive one
        assert (await r.resolve("nope.test", wire.TYPE_A)).kind == "failure"
        assert (await r.resolve("app.test", wire.TYPE_A)).kind == "ok"
        r.servers = unbound_port
    asyncio.run(go())


def test_concurrent_lookups_of_one_name_share_one_query(stub: StubUpstream) -> None:
    stub.mode, stub.delay = "delay", 0.2
    r = UpstreamResolver([("127.0.0.1", stub.port)])

    async def go() -> list[Resolution]:
        return await asyncio.gather(*(r.resolve("same.example", wire.TYPE_A) for _ in range(20)))
    results = asyncio.run(go())
    assert all(x.addresses == ("192.0.2.99",) for x in results)
    assert stub.queries == 1


def test_silence_times_out_into_failure(stub: StubUpstream) -> None:
    stub.mode = "silent"
    r = UpstreamResolver([("127.0.0.1", stub.port)], timeout=0.2)
    res = asyncio.run(r.resolve("x.example", wire.TYPE_A))
    assert res.kind == "failure" and "timed out" in res.detail


def test_interpret_follows_cname_chains_and_checks_the_question() -> None:
    q = dnslib.DNSRecord.question("www.example", "A")
    reply = q.reply()
    reply.add_answer(dnslib.RR("www.example", dnslib.QTYPE.CNAME, rdata=dnslib.CNAME("edge.cdn.example"), ttl=300))
    reply.add_answer(dnslib.RR("edge.cdn.example", dnslib.QTYPE.A, rdata=dnslib.A("203.0.113.5"), ttl=20))
    reply.add_answer(dnslib.RR("unrelated.example", dnslib.QTYPE.A, rdata=dnslib.A("203.0.113.6"), ttl=20))
    packed = bytes(reply.pack())  # dnslib compresses the names: the parser must follow the pointers
    res = interpret(wire.parse_response(packed), q.header.id, "www.example", wire.TYPE_A)
    assert res == Resolution("ok", ("203.0.113.5",), 20)
    other = interpret(wire.parse_response(packed), q.header.id, "evil.example", wire.TYPE_A)
    assert other.kind == "failure"


def test_negative_ttl_is_the_soa_minimum_capped_by_its_ttl() -> None:
    q = dnslib.DNSRecord.question("gone.example", "A")
    reply = q.reply()
    reply.header.rcode = dnslib.RCODE.NXDOMAIN
    reply.add_auth(dnslib.RR("example", dnslib.QTYPE.SOA, ttl=600, rdata=dnslib.SOA(
        "ns.example", "h.example", (1, 3600, 600, 86400, 45))))
    res = interpret(wire.parse_response(bytes(reply.pack())), q.header.id, "gone.example", wire.TYPE_A)
    assert res == Resolution("nxdomain", ttl=45)


def test_system_resolvers_reads_resolv_conf(tmp_path: object) -> None:
    from pathlib import Path
    p = Path(str(tmp_path)) / "resolv.conf"
    p.write_text("# comment\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nsearch example\nnameserver bogus\n")
    assert system_resolvers(str(p)) == [("192.0.2.53", 53), ("fe80::1", 53)]


def test_every_query_leaves_from_a_fresh_source_port(stub: StubUpstream) -> None:
    """RFC 5452: an off-path spoofer must guess the source port as well as the ID, and a port that stays
    open for many queries can be found once and reused (before: one port for 1,000 queries)."""
    r = UpstreamResolver([("127.0.0.1", stub.port)])

    async def go() -> None:
        for i in range(200):
            assert (await r.resolve(f"seq{i}.example", wire.TYPE_A)).kind == "ok"
        together = await asyncio.gather(*(r.resolve(f"par{i}.example", wire.TYPE_A) for i in range(50)))
        assert all(x.kind == "ok" for x in together)
    asyncio.run(go())
    r.close()
    sequential, concurrent = [p for _, p in stub.sources[:200]], [p for _, p in stub.sources[200:]]
    assert len(set(concurrent)) == 50, "queries in flight together use a port each"
    # the kernel picks each port at random from the ephemeral range: a rare repeat is chance, not reuse
    assert len(set(sequential)) >= 190 and max(sequential.count(p) for p in sequential) <= 2


def test_transaction_ids_do_not_follow_the_random_module(stub: StubUpstream) -> None:
    """IDs come from ``secrets`` (the OS CSPRNG): seeding ``random`` (Mersenne Twister, whose state can be
    recovered from its outputs) the same way twice does not repeat them."""
    import random
    r = UpstreamResolver([("127.0.0.1", stub.port)])

    async def batch(tag: str) -> None:
        random.seed(1234)
        for i in range(20):
            assert (await r.resolve(f"{tag}{i}.example", wire.TYPE_A)).kind == "ok"
    asyncio.run(batch("a"))
    asyncio.run(batch("b"))
    r.close()
    assert len(stub.idents) == 40 and stub.idents[:20] != stub.idents[20:]


def test_a_closed_resolver_fails_without_asking_upstream(stub: StubUpstream) -> None:
    r = UpstreamResolver([("127.0.0.1", stub.port)])

    async def go() -> None:
        assert (await r.resolve("before.test", wire.TYPE_A)).kind == "ok"
        asked = stub.queries
        r.close()
        res = await r.resolve("after.test", wire.TYPE_A)
        assert res.kind == "failure" and "closed" in res.detail
        assert stub.queries == asked  # no new socket, no query

    asyncio.run(go())


class SpoofedUpstream:
    """A resolver on 127.0.0.1 whose every answer is raced by forged ones, sent for real over loopback
    before it: the right ID from another port and from another address, from the resolver's own address
    and port a wrong ID and a non-response with the right ID. ``genuine=False``: forged answers only."""

    BOGUS, REAL = "203.0.113.66", "192.0.2.99"

    def __init__(self, genuine: bool = True) -> None:
        self.genuine = genuine
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.other_port.bind(("127.0.0.1", 0))
        self.other_addr = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.other_addr.bind(("127.0.0.2", self.port))  # the resolver's port on another loopback address
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def _answer(query: bytes, address: str, ident: int | None = None, response: bool = True) -> bytes:
        req = dnslib.DNSRecord.parse(query)
        reply = req.reply()
        reply.add_answer(dnslib.RR(req.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(address), ttl=60))
        if ident is not None:
            reply.header.id = ident
        if not response:
            reply.header.qr = 0
        return bytes(reply.pack())

    def _serve(self) -> None:
        while True:
            try:
                query, client = self.server.recvfrom(4096)
            except OSError:
                return
            ident = int.from_bytes(query[:2], "big")
            self.other_port.sendto(self._answer(query, self.BOGUS), client)
            self.other_addr.sendto(self._answer(query, self.BOGUS), client)
            self.server.sendto(self._answer(query, self.BOGUS, ident ^ 0x5A5A), client)
            self.server.sendto(self._answer(query, self.BOGUS, response=False), client)
            if self.genuine:
                self.server.sendto(self._answer(query, self.REAL), client)

    def close(self) -> None:
        for s in (self.server, self.other_port, self.other_addr):
            s.close()


def _ignored() -> float:
    return REGISTRY.get_sample_value("appconnector_dns_upstream_ignored_total") or 0.0


def test_answers_with_a_wrong_id_or_from_a_wrong_source_are_ignored() -> None:
    up = SpoofedUpstream()
    r = UpstreamResolver([("127.0.0.1", up.port)], timeout=2.0)
    try:
        before = _ignored()
        for i in range(5):
            res = asyncio.run(r.resolve(f"spoofed{i}.example", wire.TYPE_A))
            assert res == Resolution("ok", (up.REAL,), 60)
        # the kernel never hands the other sources' datagrams to a connected socket; the two from the
        # resolver's own address and port reach us and are dropped by the ID / response check
        assert _ignored() - before == 2 * 5
        up.genuine = False
        res = asyncio.run(r.resolve("forged-only.example", wire.TYPE_A))
        assert res.kind == "failure" and "timed out" in res.detail, "a forged answer is never taken"
    finally:
        r.close()
        up.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_socket_is_left_open_after_many_queries(stub: StubUpstream) -> None:
    """Answered, truncated (TCP), silent (timeout), refused (ICMP) and closed-while-waiting queries all
    give their sockets back."""
    closed_port = free_port()  # nothing listens: ICMP port unreachable

    async def go() -> None:
        r = UpstreamResolver([("127.0.0.1", stub.port)], timeout=0.3)
        before = _open_fds()
        for i in range(300):
            assert (await r.resolve(f"ok{i}.example", wire.TYPE_A)).kind == "ok"
        stub.mode = "truncate"
        for i in range(30):
            assert (await r.resolve(f"tc{i}.example", wire.TYPE_A)).kind == "ok"
        stub.mode = "silent"
        results = await asyncio.gather(*(r.resolve(f"quiet{i}.example", wire.TYPE_A) for i in range(30)))
        assert all(x.kind == "failure" for x in results)
        refused = UpstreamResolver([("127.0.0.1", closed_port)])
        for i in range(30):
            assert (await refused.resolve(f"refused{i}.example", wire.TYPE_A)).kind == "failure"
        waiting = [asyncio.ensure_future(r.resolve(f"late{i}.example", wire.TYPE_A)) for i in range(20)]
        await asyncio.sleep(0.05)
        assert _open_fds() >= before + 20, "the waiting queries hold their sockets"
        r.close()
        refused.close()
        assert all(x.kind == "failure" for x in await asyncio.gather(*waiting))
        assert _open_fds() == before
    asyncio.run(go())
