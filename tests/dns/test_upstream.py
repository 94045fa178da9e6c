"""The upstream resolver against real servers on loopback (Unbound, and the dnslib stub for failures)."""

from __future__ import annotations

import asyncio

import dnslib

from appconnector.dns import wire
from appconnector.dns.policy import Resolution
from appconnector.dns.upstream import UpstreamResolver, interpret, system_resolvers
from tests.dns.conftest import StubUpstream, Unbound


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


def test_concurrent_names_share_one_upstream_socket_until_rotation(stub: StubUpstream) -> None:
    from appconnector.dns import upstream as upstream_module
    r = UpstreamResolver([("127.0.0.1", stub.port)])

    async def go() -> None:
        results = await asyncio.gather(*(r.resolve(f"n{i}.example", wire.TYPE_A) for i in range(50)))
        assert all(x.kind == "ok" for x in results)
        assert len(r._channels) == 1
        first = r._channels[("127.0.0.1", stub.port)]
        assert first.used == 50
        first.used = upstream_module.CHANNEL_QUERIES
        assert (await r.resolve("after.example", wire.TYPE_A)).kind == "ok"
        assert r._channels[("127.0.0.1", stub.port)] is not first  # a fresh source port
        r.close()
    asyncio.run(go())


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
