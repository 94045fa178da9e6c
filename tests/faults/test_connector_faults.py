"""Whole connectors (``appconnector run``) under faults and bad input, asked over real DNS.

Three standalone connectors on loopback (NAT off: they share one kernel), clients on 127.0.0.40-43
(standalone mode: the client IP is the node). ``APPCONNECTOR_LONG=1`` runs longer.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("appconnector.app", reason="the connector (app.py) has not landed")

import dns.message
import dns.query
import dns.rcode

from tests.faults.connector import ConnectorCluster, ConnectorMember, steer_map
from tests.faults.dnsclient import can_bind, loopback_nodes
from tests.faults.nemesis import LoopbackNet, NemesisUnavailable, require_root_tools
from tests.faults.netns import NetnsNet, Topology, wait_until
from tests.faults.runner import ALL_STEPS, Nemesis, run
from tests.faults.upstream import Upstream, targets_of
from tests.faults.workload import Mix

pytestmark = [pytest.mark.root, pytest.mark.cluster]

LONG = os.environ.get("APPCONNECTOR_LONG") == "1"
SCALE = 10.0 if LONG else 1.0


def _report(name: str, data: dict[str, object]) -> None:
    path = os.environ.get("ACFAULT_REPORT")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, "long": LONG, **data}, default=str) + "\n")


@pytest.fixture
def nodes() -> list[str]:
    try:
        require_root_tools()
    except NemesisUnavailable as e:
        pytest.skip(str(e))
    ns = loopback_nodes(4)
    if not all(can_bind(n) for n in ns):
        pytest.skip("cannot bind 127.0.0.40-43 as DNS client addresses")
    return ns


def _connectors(tmp_path: Path, port_base: int, size: int = 3) -> Iterator[tuple[ConnectorCluster, LoopbackNet]]:
    c = ConnectorCluster(tmp_path / "acfault", port_base, size=size)
    net = LoopbackNet(c.endpoints())
    net.install()
    try:
        c.start()
        yield c, net
    finally:
        c.stop()
        net.remove()


def test_connectors_answer_consistently_under_faults(tmp_path: Path, nodes: list[str]) -> None:
    gen = _connectors(tmp_path, 27500)
    c, net = next(gen)
    try:
        mix = Mix(nodes=tuple(nodes), domains=tuple(f"d{i}.example.com" for i in range(40)),
                  checkout=1.0, lookup=0.0, domain_for=0.0, touch=0.0)
        r = run(c, net, duration=14 * SCALE, steps=ALL_STEPS, mix=mix, clients=6, reuse_after=48 * 3600.0,
                artifacts=tmp_path / "out")
        for m in c.members.values():  # nothing crashed or diverged along the way
            assert "Traceback" not in m.log_text(), m.log_text()[-3000:]
    finally:
        gen.close()
    _report("connector_faults", r.summary())
    assert r.verdict.ok, r.verdict.explain()[:6000]
    assert not r.problems, r.problems
    assert len(set(r.digests.values())) == 1 and len(r.digests) == 3
    assert r.history.counts().get("resolve:ok", 0) >= 200
    assert r.mappings >= 100


def test_connectors_reuse_addresses_safely_under_faults(tmp_path: Path, nodes: list[str]) -> None:
    """A 15-address pool, a 4 s reuse deadline (the smallest pool.reuse_after accepted), two nodes asking
    for 24 names over DNS while the leader is killed, reset, paused and cut off: DNS answers (local hits
    included) never give an address that already means another domain for the node, and never move a
    name before its deadline."""
    c = ConnectorCluster(tmp_path / "acfault", 27640, prefixes=("100.64.3.0/28",), reuse_after=4.0)
    net = LoopbackNet(c.endpoints())
    net.install()
    try:
        c.start()
        mix = Mix(nodes=tuple(nodes[:2]), domains=tuple(f"r{i}.example.com" for i in range(24)),
                  checkout=1.0, lookup=0.0, domain_for=0.0, touch=0.0, think=0.02)
        steps = [Nemesis.kill_leader, Nemesis.reset_storm, Nemesis.pause_leader, Nemesis.isolate_leader]
        r = run(c, net, duration=10 * SCALE, steps=steps, mix=mix, clients=4, reuse_after=4.0,  # type: ignore[arg-type]
                artifacts=tmp_path / "out")
    finally:
        c.stop()
        net.remove()
    _report("connector_reuse", r.summary())
    assert r.verdict.ok, r.verdict.explain()[:6000]
    assert not r.problems, r.problems
    owners: dict[tuple[str, int], set[str]] = {}
    for o in r.history.ops:
        if o.kind == "resolve" and o.status == "ok" and o.address is not None and o.domain:
            owners.setdefault((o.node, o.address), set()).add(o.domain)
    assert max(len(v) for v in owners.values()) >= 2, "no address was ever reassigned"


def test_leader_kill_to_next_answered_new_name(tmp_path: Path, nodes: list[str]) -> None:
    """kill -9 the leader connector; a client asks a surviving connector for a name it never asked
    before, retrying on SERVFAIL or silence like a stub resolver. Times go to docs/reliability.md."""
    gen = _connectors(tmp_path, 27530)
    c, _net = next(gen)
    try:
        times = c.leader_kill_times(int(3 * SCALE), nodes[0], nodes[1], leader_timeout=20, per_try=1.0)
    finally:
        gen.close()
    _report("connector_leader_kill", {"seconds": [round(t, 3) for t in times]})
    print("leader kill → next new name answered over DNS:", ", ".join(f"{t:.3f}s" for t in times))


def test_kernel_steer_maps_match_the_pool_after_faults(tmp_path: Path, nodes: list[str]) -> None:
    """Three connectors in namespaces of their own with NAT on: after kills, pauses, a cut-off leader,
    reset storms and a whole-cluster kill -9, every member's kernel steer map holds exactly one element
    per mapping, pointing at one of the domain's real addresses, and all three maps are identical."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip netns)")
    topo = Topology(f"{os.getpid() % 100000}").create()
    upstream = Upstream(topo.upstream, 53, topo.ns("cl"))
    c = ConnectorCluster(tmp_path / "acfault", 27700, topology=topo)
    net = NetnsNet(topo, c.endpoints())
    try:
        net.install()
        c.start()
        mix = Mix(nodes=tuple(topo.clients(4)), domains=tuple(f"n{i}.example.com" for i in range(30)),
                  checkout=1.0, lookup=0.0, domain_for=0.0, touch=0.0)
        steps = [Nemesis.kill_leader, Nemesis.isolate_leader, Nemesis.pause_follower, Nemesis.reset_storm,
                 Nemesis.restart_member]
        r = run(c, net, duration=12 * SCALE, steps=steps, mix=mix, clients=4, reuse_after=48 * 3600.0,  # type: ignore[arg-type]
                artifacts=tmp_path / "out")
        assert r.verdict.ok, r.verdict.explain()[:6000]
        assert not r.problems, r.problems
        assert r.mappings >= 30
        maps: dict[str, dict[tuple[int, int], int]] = {}

        def settled() -> bool:
            for name, m in c.members.items():
                want = {(int(ipaddress.IPv4Address(n)), a): d for n, d, a in m.state()[1]}
                got = steer_map(m)
                if set(got) != set(want) or any(str(ipaddress.IPv4Address(v)) not in targets_of(want[k])
                                                for k, v in got.items()):
                    return False
                maps[name] = got
            return len({tuple(sorted(g.items())) for g in maps.values()}) == 1

        wait_until(settled, 20, f"steer maps never matched the pools: {maps}")
        for m in c.members.values():
            assert "Traceback" not in m.log_text(), m.log_text()[-3000:]
        _report("nat_invariant", {**r.summary(), "steer_elements": len(next(iter(maps.values())))})
    finally:
        c.stop()
        upstream.close()
        topo.destroy()


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.fixture
def one(tmp_path: Path, nodes: list[str]) -> Iterator[ConnectorMember]:
    gen = _connectors(tmp_path, 27560, size=1)
    c, _net = next(gen)
    try:
        yield c.members["c1"]
    finally:
        gen.close()


def _metric(m: ConnectorMember, name: str) -> float:
    total = 0.0
    for line in m.metrics().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 12))                       # shorter than a header
    if kind == 1:
        return rng.randbytes(rng.randrange(12, 600))                      # random
    if kind == 2:  # a header claiming questions that are not there
        return struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 5, 0, 0, 0)
    if kind == 3:  # a name whose compression pointer points at itself
        return struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
    if kind == 4:  # a label longer than 63
        head = struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, 0, 0, 0)
        return head + b"\x50" + b"a" * 80 + b"\x00\x00\x01\x00\x01"
    return struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, 0, 0, 0) + b"\x03abc"  # name cut short


def _ask(m: ConnectorMember, node: str, name: str, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=m.dns_port, timeout=5, source=node)
    return dns.query.udp(q, "127.0.0.1", port=m.dns_port, timeout=5, source=node)


def test_malformed_dns_at_rate_over_udp_and_tcp(one: ConnectorMember, nodes: list[str]) -> None:
    m = one
    first = _ask(m, nodes[0], "before.example.com")
    assert first.rcode() == dns.rcode.NOERROR and first.answer
    malformed0 = _metric(m, "appconnector_dns_malformed_total")
    rng = random.Random(6)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((nodes[1], 0))
    sent = 0
    end = time.monotonic() + 1.5 * SCALE
    while time.monotonic() < end:
        for _ in range(200):
            s.sendto(_garbage(rng), ("127.0.0.1", m.dns_port))
            sent += 1
        time.sleep(0.005)
    # A header with no question gets FORMERR with its ID echoed (docs/design.md §4).
    s.settimeout(2)
    while True:  # drain answers to the garbage
        try:
            s.recv(65535)
        except TimeoutError:
            break
    s.sendto(struct.pack("!HHHHHH", 0xBEEF, 0x0100, 0, 0, 0, 0), ("127.0.0.1", m.dns_port))
    reply = s.recv(65535)
    while reply[:2] != b"\xbe\xef":  # a late answer to the garbage
        reply = s.recv(65535)
    assert reply[3] & 0x0F == dns.rcode.FORMERR, reply[:12].hex()
    s.close()
    # Garbage over TCP, with honest and lying length prefixes, on many connections.
    for i in range(60):
        with socket.create_connection(("127.0.0.1", m.dns_port), timeout=3) as t:
            body = _garbage(rng)
            length = len(body) if i % 3 else len(body) + 50  # a prefix longer than what follows
            with_prefix = struct.pack("!H", length) + body
            t.sendall(with_prefix)
            t.shutdown(socket.SHUT_WR)
            t.settimeout(3)
            try:
                while t.recv(65535):
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
    assert m.running()
    after = _ask(m, nodes[0], "after.example.com")
    assert after.rcode() == dns.rcode.NOERROR and after.answer
    assert _ask(m, nodes[0], "before.example.com", tcp=True).answer[0] == first.answer[0]
    assert _metric(m, "appconnector_dns_malformed_total") > malformed0, "malformed queries were not counted"
    log = m.log_text()
    assert "Traceback" not in log, log[-3000:]
    print(f"sent {sent} malformed UDP datagrams and 60 TCP messages")


def test_half_open_and_oversized_tcp(one: ConnectorMember, nodes: list[str]) -> None:
    m = one
    idle: list[socket.socket] = []
    try:
        for i in range(300):
            t = socket.create_connection(("127.0.0.1", m.dns_port), timeout=3)
            if i % 2:
                t.sendall(b"\x00")           # half a length prefix, then nothing
            idle.append(t)
        # Oversized: a 65535-byte message of junk, and a UDP datagram of 65000 bytes.
        with socket.create_connection(("127.0.0.1", m.dns_port), timeout=3) as big:
            big.sendall(b"\xff\xff" + bytes(65535))
            big.settimeout(5)
            try:
                reply = big.recv(65535)
            except (TimeoutError, ConnectionResetError):
                reply = b""
            if len(reply) >= 6:
                assert reply[5] & 0x0F in (dns.rcode.FORMERR, dns.rcode.REFUSED), reply[:8].hex()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(bytes(65000), ("127.0.0.1", m.dns_port))
        u.close()
        # Still serving, both transports, while 300 connections hang.
        r = _ask(m, nodes[2], "while-idle.example.com", tcp=True)
        assert r.rcode() == dns.rcode.NOERROR and r.answer
        assert _ask(m, nodes[2], "while-idle.example.com").answer[0] == r.answer[0]
        # The idle connections are closed by the server (its idle timeout), not kept forever.
        deadline = time.monotonic() + 30
        closed = 0
        for t in idle:
            t.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                if t.recv(1) == b"":
                    closed += 1
            except (TimeoutError, ConnectionResetError):
                pass
        assert closed == len(idle), f"only {closed} of {len(idle)} idle connections were closed"
    finally:
        for t in idle:
            t.close()
    assert m.running()
    assert "Traceback" not in m.log_text()


def test_corrupt_journal_refused_by_connector(tmp_path: Path, nodes: list[str]) -> None:
    """A connector whose journal is corrupt refuses to start (exit 1, the file named); the other two keep
    answering, and with the bad state moved away it rejoins and catches up."""
    gen = _connectors(tmp_path, 27580)
    c, _net = next(gen)
    try:
        c.leader(timeout=20)
        answers = {f"j{i}.example.com": c.members["c1"].checkout(nodes[0], f"j{i}.example.com", 5.0)
                   for i in range(30)}
        c.wait_converged()
        c3 = c.members["c3"]
        assert c3.stop() == 0, c3.log_text()[-2000:]
        journals = list(c3.state_dir.glob("raft-*/journal"))
        assert journals, list(c3.state_dir.rglob("*"))
        data = bytearray(journals[0].read_bytes())
        data[60:80] = b"\xee" * 20
        journals[0].write_bytes(bytes(data))
        c3.start()
        assert c3.proc is not None
        code = c3.proc.wait(30)
        log = c3.log_text().split("---- start")[-1]
        assert code == 1, log[-2000:]
        assert str(journals[0]) in log and re.search("refus", log), log[-2000:]
        assert "Traceback" not in log, log[-2000:]
        for name in ("c1", "c2"):
            m = c.members[name]
            assert m.checkout(nodes[0], "j3.example.com", 5.0) == answers["j3.example.com"]
            m.checkout(nodes[1], f"fresh-{name}.example.com", 5.0)
        for d in c3.state_dir.glob("raft-*"):
            d.rename(tmp_path / f"acfault-bad-{d.name}")
        c3.start()
        c3.wait_ready()
        c.wait_converged()
        assert c3.lookup(nodes[0], "j3.example.com", 5.0) == answers["j3.example.com"]
    finally:
        gen.close()


# ---- no quorum -----------------------------------------------------------------------------------------

CHECKOUT_TIMEOUT = 2.0  # the shipped pool.checkout_timeout
MAX_QUEUED = 8


def _timed(m: ConnectorMember, node: str, name: str, tcp: bool = False) -> tuple[int, float]:
    """(rcode, seconds) of one A query; a client that hears nothing within 10 s fails the test."""
    t0 = time.monotonic()
    try:
        r = _ask(m, node, name, tcp=tcp) if not tcp else dns.query.tcp(
            dns.message.make_query(name, "A"), "127.0.0.1", port=m.dns_port, timeout=10, source=node)
    except dns.exception.Timeout:
        raise AssertionError(f"no answer at all for {name} over {'TCP' if tcp else 'UDP'}") from None
    return r.rcode(), time.monotonic() - t0


def _burst(m: ConnectorMember, node: str, names: list[str], gap: float) -> dict[str, tuple[int, float]]:
    """Send one UDP query per name, ``gap`` apart, from one socket; collect (rcode, seconds after the
    last send) per name."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((node, 0))
    ids = {}
    for i, name in enumerate(names):
        q = dns.message.make_query(name, "A", id=1000 + i)
        ids[1000 + i] = name
        s.sendto(q.to_wire(), ("127.0.0.1", m.dns_port))
        time.sleep(gap)
    sent = time.monotonic()
    got: dict[str, tuple[int, float]] = {}
    s.settimeout(0.5)
    while len(got) < len(names) and time.monotonic() - sent < 10:
        try:
            r = dns.message.from_wire(s.recv(65535))
        except TimeoutError:
            continue
        if r.id in ids:
            got[ids[r.id]] = (r.rcode(), time.monotonic() - sent)
    s.close()
    return got


@pytest.mark.parametrize("survivor", ["leader", "follower"])
def test_without_a_quorum_new_names_get_servfail_in_time(tmp_path: Path, nodes: list[str], survivor: str) -> None:
    """Two of three connectors stopped (SIGSTOP): a new name gets SERVFAIL within twice
    pool.checkout_timeout over UDP and TCP (not silence, so clients move on), a known name still
    answers from local state, checkouts beyond pool.max_queued_checkouts are refused at once (SERVFAIL,
    counted), and once the members come back a new name is answered again."""
    c = ConnectorCluster(tmp_path / "acfault", 27820 if survivor == "leader" else 27920)
    for m in c.members.values():
        m.env = {"APPCONNECTOR_POOL_MAX_QUEUED_CHECKOUTS": str(MAX_QUEUED)}
    try:
        c.start()
        leader = c.leader(timeout=20)
        m = leader if survivor == "leader" else next(x for x in c.members.values() if x is not leader)
        known = _ask(m, nodes[0], "known.example.com")
        assert known.rcode() == dns.rcode.NOERROR and known.answer
        c.wait_converged()
        others = [x for x in c.members.values() if x is not m]
        for x in others:
            x.pause()
        times = {}
        for name, tcp in (("new-udp.example.com", False), ("new-tcp.example.com", True)):
            rcode, seconds = _timed(m, nodes[1], name, tcp=tcp)
            assert rcode == dns.rcode.SERVFAIL, (name, dns.rcode.to_text(rcode))
            assert seconds < 2 * CHECKOUT_TIMEOUT, f"{name}: SERVFAIL after {seconds:.2f}s"
            times["tcp" if tcp else "udp"] = round(seconds, 3)
        again = _ask(m, nodes[0], "known.example.com")
        assert again.rcode() == dns.rcode.NOERROR and again.answer[0] == known.answer[0], again
        assert _ask(m, nodes[0], "known.example.com", tcp=True).answer[0] == known.answer[0]

        refused0 = _metric(m, 'appconnector_pool_checkouts_refused_total{reason="queue_full"}')
        overloaded0 = _metric(m, 'appconnector_dns_servfail_total{reason="overloaded"}')
        names = [f"q{i}.example.com" for i in range(30)]
        got = _burst(m, nodes[2], names, gap=0.02)
        assert set(got) == set(names), f"unanswered: {sorted(set(names) - set(got))}"
        assert {rc for rc, _ in got.values()} == {dns.rcode.SERVFAIL}, got
        assert max(s for _, s in got.values()) < 2 * CHECKOUT_TIMEOUT, got
        refused = _metric(m, 'appconnector_pool_checkouts_refused_total{reason="queue_full"}') - refused0
        assert refused >= 1, "the bounded queue never overflowed"
        assert _metric(m, 'appconnector_dns_servfail_total{reason="overloaded"}') - overloaded0 == refused
        assert sum(1 for _, s in got.values() if s < CHECKOUT_TIMEOUT / 2) >= refused, \
            "overflowing checkouts are refused at once, not after the deadline"
        assert "checkouts already waiting" in m.log_text()
        fast = sorted(s for _, s in got.values())
        _report("no_quorum", {"survivor": survivor, "servfail_seconds": times, "burst_refused": refused,
                              "burst_fastest": round(fast[0], 3), "burst_slowest": round(fast[-1], 3)})
        print(f"no quorum ({survivor} left): SERVFAIL after {times}; burst of 30: {refused:.0f} refused at once, "
              f"answers {fast[0]:.3f}-{fast[-1]:.3f}s after the last send")

        for x in others:
            x.resume()
        deadline = time.monotonic() + 30
        while True:  # a stub resolver retrying: the quorum is back once an election is done
            r = _ask(m, nodes[1], "after.example.com")
            if r.rcode() == dns.rcode.NOERROR:
                break
            assert time.monotonic() < deadline, "no new name answered after the members came back"
            time.sleep(0.2)
        assert r.answer
        assert "Traceback" not in m.log_text(), m.log_text()[-3000:]
    finally:
        c.stop()
