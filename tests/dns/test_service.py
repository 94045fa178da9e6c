"""The DNS service end to end: real UDP/TCP sockets, dnspython and kdig as clients, Unbound as the
upstream, each replica (LocalPool and a one-member RaftReplica) behind it. Covers upstream natc's
``TestDNSResponse`` cases and docs/design.md §4."""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from appconnector.dns import wire
from appconnector.metrics import REGISTRY
from tests.dns.conftest import Running, Unbound, make_config, wait_until
from tests.replicas import KINDS

CLIENT = "127.0.0.1"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def a_of(m: dns.message.Message) -> list[str]:
    return sorted(rr.address for rrset in m.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset)


def in_pool(address: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network("100.64.1.0/24")


@pytest.fixture(scope="module", params=KINDS)
def svc(unbound: Unbound, request: pytest.FixtureRequest) -> Iterator[Running]:
    r = Running(make_config(upstream=[f"127.0.0.1:{unbound.port}"]), replica_kind=request.param)
    yield r
    r.close()


# ---- upstream natc's TestDNSResponse ---------------------------------------------------------------


def test_empty_question_gets_formerr_with_the_id_echoed(svc: Running) -> None:
    reply = svc.raw(struct.pack("!6H", 1234, 0x0100, 0, 0, 0, 0))
    assert reply is not None
    m = dns.message.from_wire(reply)
    assert m.id == 1234 and m.rcode() == dns.rcode.FORMERR and m.flags & dns.flags.QR


def test_a_record_is_the_nodes_pool_address(svc: Running) -> None:
    m = svc.query("app.test")
    assert m.rcode() == dns.rcode.NOERROR and m.flags & dns.flags.AA
    [address] = a_of(m)
    assert in_pool(address) and address != "100.64.1.0"  # the lowest address is the DNS address
    assert svc.pool.lookup(CLIENT, "app.test") is not None
    assert str(ipaddress.IPv4Address(svc.pool.lookup(CLIENT, "app.test")[0])) == address  # type: ignore[index]
    # the real addresses travel with the checkout (NAT steers to them)
    assert svc.pool.targets("app.test") == (int(ipaddress.IPv4Address("192.0.2.10")),
                                            int(ipaddress.IPv4Address("192.0.2.11")))
    # asked again (any spelling, UDP or TCP): the same address, from the fast path
    before = svc.service.fast.hits  # type: ignore[union-attr]
    published = metric("appconnector_dns_fast_path_answers_total")
    for name, tcp in (("app.test", False), ("APP.test.", False), ("app.test", True)):
        assert a_of(svc.query(name, tcp=tcp)) == [address]
    assert svc.service.fast.hits >= before + 3  # type: ignore[union-attr]
    wait_until(lambda: metric("appconnector_dns_fast_path_answers_total") >= published + 3, 3,
               "fast-path answers to reach /metrics")


def test_other_names_get_other_addresses(svc: Running) -> None:
    a = a_of(svc.query("app.test"))
    b = a_of(svc.query("other.test"))
    assert a != b and in_pool(b[0])


def test_upstream_nxdomain_is_nxdomain_with_no_answers(svc: Running) -> None:
    m = svc.query("noexist.test")
    assert m.rcode() == dns.rcode.NXDOMAIN and not m.answer
    assert m.authority and m.authority[0].rdtype == dns.rdatatype.SOA  # RFC 2308: negative TTL source
    assert svc.pool.lookup(CLIENT, "noexist.test") is None
    assert svc.query("noexist.test", "AAAA").rcode() == dns.rcode.NXDOMAIN


def test_names_resolving_into_ignore_destinations_get_their_real_records(svc: Running) -> None:
    m = svc.query("ignored.test")
    assert m.rcode() == dns.rcode.NOERROR and a_of(m) == ["198.51.100.7"]
    m6 = svc.query("ignored.test", "AAAA")
    assert [rr.address for rr in m6.answer[0]] == ["2001:db8::7"]
    assert svc.pool.lookup(CLIENT, "ignored.test") is None


@pytest.mark.parametrize("rdtype", ["SOA", "NS"])
def test_soa_and_ns_are_answered_for_any_name(svc: Running, rdtype: str) -> None:
    before = metric("appconnector_dns_upstream_cache_total", result="miss")
    m = svc.query("whatever-name.test", rdtype)
    assert m.rcode() == dns.rcode.NOERROR
    assert m.answer[0].rdtype == dns.rdatatype.from_text(rdtype)
    assert str(m.answer[0].name) == "whatever-name.test."
    assert metric("appconnector_dns_upstream_cache_total", result="miss") == before  # no upstream query



# ---- docs/design.md §4 beyond natc --------------------------------------------------------------------------


def test_aaaa_is_nodata_with_soa_and_spends_no_address(svc: Running) -> None:
    m = svc.query("n1.test", "AAAA")  # has an A upstream, not mapped yet
    assert m.rcode() == dns.rcode.NOERROR and not m.answer
    assert m.authority[0].rdtype == dns.rdatatype.SOA
    assert svc.pool.lookup(CLIENT, "n1.test") is None
    svc.query("n1.test", "A")
    m = svc.query("n1.test", "AAAA")  # mapped now: still NODATA, never NXDOMAIN
    assert m.rcode() == dns.rcode.NOERROR and not m.answer and m.authority[0].rdtype == dns.rdatatype.SOA


def test_upstream_nodata_gives_nodata_and_no_pool_address(svc: Running) -> None:
    m = svc.query("v6only.test", "A")
    assert m.rcode() == dns.rcode.NOERROR and not m.answer
    assert svc.pool.lookup(CLIENT, "v6only.test") is None


def test_other_types_are_nodata(svc: Running) -> None:
    m = svc.query("app.test", "MX")
    assert m.rcode() == dns.rcode.NOERROR and not m.answer and m.authority[0].rdtype == dns.rdatatype.SOA


def test_upstream_answer_inside_the_pool_is_a_loop(svc: Running) -> None:
    before = metric("appconnector_dns_loops_total")
    m = svc.query("loop.test")
    assert m.rcode() == dns.rcode.SERVFAIL and not m.answer
    assert metric("appconnector_dns_loops_total") == before + 1
    assert svc.pool.lookup(CLIENT, "loop.test") is None


# ---- RFC 8906 hygiene --------------------------------------------------------------------------------


def test_question_case_is_preserved_byte_for_byte(svc: Running) -> None:
    svc.query("app.test")
    for name in ("ApP.TeSt", "aPP.tEST"):  # the second one comes from the fast path
        q = dns.message.make_query(name, "A", use_edns=False)
        data = q.to_wire()
        reply = svc.raw(data)
        assert reply is not None
        assert reply[12:len(data)] == data[12:]
        m = dns.message.from_wire(reply)
        assert str(m.question[0].name) == name + "." and str(m.answer[0].name) == name + "."


@pytest.mark.parametrize("rd", [True, False])
def test_flags_aa_set_rd_echoed_z_clear(svc: Running, rd: bool) -> None:
    q = dns.message.make_query("app.test", "A", use_edns=False)
    if not rd:
        q.flags &= ~dns.flags.RD
    data = bytearray(q.to_wire())
    data[3] |= 0x40  # Z
    reply = svc.raw(bytes(data))
    assert reply is not None
    m = dns.message.from_wire(reply)
    assert m.flags & dns.flags.AA
    assert bool(m.flags & dns.flags.RD) == rd
    assert reply[3] & 0x40 == 0


def test_other_opcodes_get_notimp(svc: Running) -> None:
    q = dns.message.make_query("app.test", "A", use_edns=False)
    q.set_opcode(dns.opcode.STATUS)
    reply = svc.raw(q.to_wire())
    assert reply is not None
    m = dns.message.from_wire(reply)
    assert m.rcode() == dns.rcode.NOTIMP and m.id == q.id


def test_garbage_with_a_header_gets_formerr_and_shorter_gets_nothing(svc: Running) -> None:
    reply = svc.raw(struct.pack("!6H", 777, 0x0100, 1, 0, 0, 0) + b"\x05ab")
    assert reply is not None
    m = dns.message.from_wire(reply)
    assert m.id == 777 and m.rcode() == dns.rcode.FORMERR
    before = metric("appconnector_dns_malformed_total", transport="udp")
    assert svc.raw(b"\x01\x02\x03", timeout=0.3) is None
    wait_until(lambda: metric("appconnector_dns_malformed_total", transport="udp") > before, 2, "malformed count")
    assert svc.query("app.test").rcode() == dns.rcode.NOERROR  # still serving


def test_edns_is_echoed_with_our_buffer_size_and_badvers_for_version_1(svc: Running) -> None:
    m = svc.query("app.test", use_edns=0, payload=4096, want_dnssec=True)
    assert m.edns == 0 and m.payload == wire.OUR_UDP_PAYLOAD and m.ednsflags & dns.flags.DO
    m = svc.query("app.test", use_edns=1)
    assert m.rcode() == dns.rcode.BADVERS and m.edns == 0 and not m.answer


def test_class_other_than_in_is_refused(svc: Running) -> None:
    q = dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH)
    m = dns.query.udp(q, svc.host, port=svc.port, timeout=5)
    assert m.rcode() == dns.rcode.REFUSED


def test_big_answer_is_truncated_over_udp_and_whole_over_tcp(svc: Running) -> None:
    q = dns.message.make_query("big.test", "A", use_edns=False)
    m = dns.query.udp(q, svc.host, port=svc.port, timeout=5)
    assert m.flags & dns.flags.TC and not m.answer
    m, used_tcp = dns.query.udp_with_fallback(q, svc.host, port=svc.port, timeout=5)
    assert used_tcp and len(a_of(m)) == 60


# ---- kdig ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_kdig_gets_the_pool_address(svc: Running, transport: str) -> None:
    if shutil.which("kdig") is None:
        pytest.skip("needs kdig (apt-get install knot-dnsutils)")
    want = a_of(svc.query("app.test"))
    out = subprocess.run(["kdig", f"@{svc.host}", "-p", str(svc.port), transport, "+short", "app.test", "A"],
                         capture_output=True, text=True, timeout=10, check=True).stdout.split()
    assert out == want
    full = subprocess.run(["kdig", f"@{svc.host}", "-p", str(svc.port), transport, "nope.test", "A"],
                          capture_output=True, text=True, timeout=10, check=True).stdout
    assert "status: NXDOMAIN" in full


def test_tcp_carries_several_queries_on_one_connection(svc: Running) -> None:
    import socket as _socket
    queries = [dns.message.make_query(name, "A") for name in ("app.test", "other.test", "noexist.test")]
    with _socket.create_connection((svc.host, svc.port), timeout=5) as conn:
        conn.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries)))
        replies = []
        for _ in queries:
            (n,) = struct.unpack("!H", conn.recv(2, _socket.MSG_WAITALL))
            replies.append(dns.message.from_wire(conn.recv(n, _socket.MSG_WAITALL)))
    by_id = {m.id: m for m in replies}
    assert [by_id[q.id].rcode() for q in queries] == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN]
    assert a_of(by_id[queries[0].id]) == a_of(svc.query("app.test"))


@pytest.mark.parametrize(("option", "want"), [
    ("+edns=1", ["status: BADVERS", "Version: 0;"]),
    ("+cookie", ["status: NOERROR", "UDP size: 1232 B"]),
    ("+nsid", ["status: NOERROR", "UDP size: 1232 B"]),
    ("+dnssec", ["status: NOERROR", "flags: do;"]),
    ("+noedns", ["status: NOERROR", "Flags: qr aa rd;", "ADDITIONAL: 0"]),
])
def test_kdig_edns_variants(svc: Running, option: str, want: list[str]) -> None:
    if shutil.which("kdig") is None:
        pytest.skip("needs kdig (apt-get install knot-dnsutils)")
    out = subprocess.run(["kdig", f"@{svc.host}", "-p", str(svc.port), option, "app.test", "A"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    for text in want:
        assert text in out, out
