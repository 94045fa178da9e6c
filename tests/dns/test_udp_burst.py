"""Bursts of UDP queries against the DNS service, so the listener reads and answers them in batches
(recvmmsg/sendmmsg on Linux, appconnector/dns/mmsg.py): every query from many source addresses and
ports gets its own answer (its ID, its question, its node's pool address), TC and EDNS sizes stay
right, and malformed datagrams in a batch cost no other query its answer. On both event loops (the
shipped stdlib loop and uvloop), and on an IPv6 listener (one recvfrom/sendto per datagram)."""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from appconnector.dns import wire
from appconnector.metrics import REGISTRY
from tests.dns.conftest import Running, Unbound, free_port, make_config, wait_until

NODES = [f"127.0.0.{i}" for i in range(2, 7)]
NAMES = ["app.test", "other.test", *[f"n{i}.test" for i in range(8)]]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(params=["stdlib", "uvloop"])
def svc(unbound: Unbound, request: pytest.FixtureRequest) -> Iterator[Running]:
    r = Running(make_config(upstream=[f"127.0.0.1:{unbound.port}"]), use_uvloop=request.param == "uvloop")
    yield r
    r.close()


def open_clients(host: str, count: int, family: int = socket.AF_INET) -> list[socket.socket]:
    socks = []
    for i in range(count):
        c = socket.socket(family, socket.SOCK_DGRAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        c.bind((host if family == socket.AF_INET6 else NODES[i % len(NODES)], 0))
        c.setblocking(False)
        socks.append(c)
    return socks


def exchange(socks: list[socket.socket], queries: list[bytes], server: tuple[str, int],
             expect: set[int], timeout: float = 10.0) -> dict[int, list[bytes]]:
    """Send queries[i] from socks[i], all at once; wait until every socket in ``expect`` has a reply."""
    for c, q in zip(socks, queries, strict=True):
        c.sendto(q, server)
    got: dict[int, list[bytes]] = {i: [] for i in range(len(socks))}
    by_fd = {c.fileno(): i for i, c in enumerate(socks)}
    deadline = time.monotonic() + timeout
    while any(not got[i] for i in expect):
        left = deadline - time.monotonic()
        assert left > 0, f"no answer for {sorted(i for i in expect if not got[i])[:10]}"
        ready, _, _ = select.select([c for i, c in enumerate(socks) if i in expect and not got[i]], [], [], left)
        for c in ready:
            got[by_fd[c.fileno()]].append(c.recv(70000))
    return got


def name_of(i: int) -> str:
    """Client i's name: every node (i % len(NODES)) asks every name from several ports."""
    return NAMES[(i // len(NODES)) % len(NAMES)]


def a_records(m: dns.message.Message) -> list[str]:
    return [rr.address for rrset in m.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset]


def test_a_burst_from_many_sources_gets_every_answer_to_its_own_source(svc: Running) -> None:
    socks = open_clients("", 200)
    try:
        server = (svc.host, svc.port)
        first: dict[tuple[str, str], str] = {}
        for rnd in range(3):  # round 0: general path (new names); then fast path (and its exact cache)
            msgs = []
            for i in range(len(socks)):
                edns = (i + rnd) % 3  # none, EDNS, EDNS with DO
                name = name_of(i)
                m = dns.message.make_query(name.upper() if i % 7 == 0 else name, "A", use_edns=0 if edns else False,
                                           want_dnssec=edns == 2)
                m.id = (rnd * 1000 + i) & 0xFFFF
                msgs.append(m)
            got = exchange(socks, [m.to_wire() for m in msgs], server, set(range(len(socks))))
            for i, (c, q) in enumerate(zip(socks, msgs, strict=True)):
                assert len(got[i]) == 1, f"round {rnd}, client {i}: {len(got[i])} answers"
                r = dns.message.from_wire(got[i][0])
                assert r.id == q.id and r.rcode() == dns.rcode.NOERROR
                assert r.question[0].name == q.question[0].name  # as sent (case too: 0x20 intact)
                assert str(r.question[0].name) == str(q.question[0].name)
                assert (r.edns == 0) == (q.edns == 0), f"client {i}: OPT iff the query had one"
                if q.edns == 0:
                    assert r.payload == wire.OUR_UDP_PAYLOAD
                    assert bool(r.ednsflags & dns.flags.DO) == bool(q.ednsflags & dns.flags.DO)
                (address,) = a_records(r)
                assert ipaddress.ip_address(address) in ipaddress.ip_network("100.64.1.0/24")
                key = (c.getsockname()[0], name_of(i))
                assert first.setdefault(key, address) == address, f"{key}: one address per node and name"
            for c in socks:  # exactly one answer each, none sent twice or to another socket
                with pytest.raises(BlockingIOError):
                    c.recv(70000)
        for node in NODES:  # a node's names have distinct addresses
            mine = [a for (n, _), a in first.items() if n == node]
            assert len(mine) == len(set(mine)) == len(NAMES)
    finally:
        for c in socks:
            c.close()


def test_tc_edns_sizes_and_malformed_datagrams_in_one_burst(svc: Running) -> None:
    server = (svc.host, svc.port)
    socks = open_clients("", 60)
    try:
        warm = [dns.message.make_query("app.test", "A") for _ in socks]
        exchange(socks, [m.to_wire() for m in warm], server, set(range(len(socks))))  # fast path from now on
        kinds: list[str] = []
        queries: list[bytes] = []
        for i in range(len(socks)):
            kind = ["fast", "tc", "big_edns", "fast_edns", "short", "formerr", "qr"][i % 7]
            kinds.append(kind)
            if kind == "fast":
                q = dns.message.make_query("app.test", "A").to_wire()
            elif kind == "fast_edns":
                q = dns.message.make_query("app.test", "A", use_edns=0, payload=512).to_wire()
            elif kind == "tc":  # 60 A records: more than 512 bytes, and no EDNS
                q = dns.message.make_query("big.test", "A", use_edns=False).to_wire()
            elif kind == "big_edns":
                q = dns.message.make_query("big.test", "A", use_edns=0, payload=4096).to_wire()
            elif kind == "short":
                q = b"\x01\x02\x03"
            elif kind == "formerr":
                q = struct.pack("!6H", 4000 + i, 0x0100, 1, 0, 0, 0) + b"\x05ab"
            else:  # a response (QR set) is not answered
                q = bytearray(dns.message.make_query("app.test", "A").to_wire())
                q[2] |= 0x80
                q = bytes(q)
            queries.append(q)
        malformed0 = metric("appconnector_dns_malformed_total", transport="udp")
        silent = {i for i, k in enumerate(kinds) if k in ("short", "qr")}
        got = exchange(socks, queries, server, set(range(len(socks))) - silent)
        for i, kind in enumerate(kinds):
            if i in silent:
                continue
            assert len(got[i]) == 1, f"client {i} ({kind})"
            r = dns.message.from_wire(got[i][0])
            assert r.id == int.from_bytes(queries[i][:2], "big"), f"client {i} ({kind})"
            if kind == "tc":
                assert r.flags & dns.flags.TC and not r.answer and len(got[i][0]) <= 512
            elif kind == "big_edns":
                assert not r.flags & dns.flags.TC and len(a_records(r)) == 60 and r.payload == wire.OUR_UDP_PAYLOAD
            elif kind == "formerr":
                assert r.rcode() == dns.rcode.FORMERR
            else:
                assert r.rcode() == dns.rcode.NOERROR and len(a_records(r)) == 1 and (r.edns == 0) == (kind != "fast")
        # every "short", "formerr" and "qr" datagram is counted as malformed (the first and last unanswered)
        n_malformed = sum(k in ("short", "formerr", "qr") for k in kinds)
        wait_until(lambda: metric("appconnector_dns_malformed_total", transport="udp") >= malformed0 + n_malformed,
                   5, "the malformed datagrams counted")
        for i in silent:  # counted, so handled: nothing was sent to them
            with pytest.raises(BlockingIOError):
                socks[i].recv(70000)
    finally:
        for c in socks:
            c.close()


def test_an_ipv6_listener_answers_a_burst_one_datagram_at_a_time(unbound: Unbound) -> None:
    r = Running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], dns_listen=f"[::1]:{free_port()}"),
                use_uvloop=False)
    socks = open_clients("::1", 40, socket.AF_INET6)
    try:
        msgs = [dns.message.make_query(NAMES[i % len(NAMES)], "A") for i in range(len(socks))]
        for i, m in enumerate(msgs):
            m.id = i
        for _ in range(2):  # general path, then fast path
            got = exchange(socks, [m.to_wire() for m in msgs], (r.host, r.port), set(range(len(socks))))
            for i, m in enumerate(msgs):
                (reply,) = got[i]
                answer = dns.message.from_wire(reply)
                assert answer.id == m.id and answer.question[0].name == m.question[0].name
                assert len(a_records(answer)) == 1
    finally:
        for c in socks:
            c.close()
        r.close()
