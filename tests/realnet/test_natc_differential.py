"""Differential DNS against upstream natc (issue 16): one corpus of queries, sent from a client namespace
through WireGuard to the product's DNS (100.64.1.0, beside tailscaled on c1) and to natc's
(100.64.2.0, its own tsnet node), both asking the same upstream. Each reply is normalised (rcode,
opcode, AA/TC/RD/RA, answer types and counts with whether an address is the connector's pool, a ULA or
real, SOA in the authority, OPT and DO, the question echoed) and the two compared field by field.

Every difference must be listed, with its reason, in ``natc_expected_differences.toml``; the test fails
on an unlisted difference and on a listed one that no longer occurs. The table of differences is
printed (``-s``) and kept in the tier's summary."""

from __future__ import annotations

import ipaddress
import socket
import struct
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.faults.netns import entered
from tests.realnet.natc import (
    NATC_DNS,
    NATC_POOL,
    NATC_ULA,
    OURS_DNS,
    CorpusUpstream,
    Natc,
    allow_natc,
    natc_missing,
    ours_config,
    start_corpus_upstream,
)
from tests.realnet.tailnet import MEASURED, POOL, SERVED, Tailnet, running

EXPECTED = Path(__file__).with_name("natc_expected_differences.toml")
WAIT = 4.0   # per query: above the product's 2 s upstream timeout, so its SERVFAIL for silence arrives


def _q(name: str, qtype: str = "A", *, rd: bool = True, edns: int | None = None, do: bool = False,
       rdclass: str = "IN", opcode: int = 0) -> bytes:
    m = dns.message.make_query(name, qtype, rdclass=rdclass, use_edns=edns,
                               want_dnssec=do, payload=1232 if edns is not None else None)
    if not rd:
        m.flags &= ~dns.flags.RD
    m.set_opcode(dns.opcode.Opcode(opcode))
    m.id = 0x4242
    return bytes(m.to_wire())


# (case, transport, wire): the corpus; names pick the corpus upstream's behaviour (tests/realnet/natc.py)
CORPUS: list[tuple[str, str, bytes]] = [
    ("a", "udp", _q("web.app.test")),
    ("a_mixed_case", "udp", _q("WeB.App.Test")),
    ("aaaa", "udp", _q("web.app.test", "AAAA")),
    ("aaaa_upstream_has_v6", "udp", _q("v6.app.test", "AAAA")),
    ("soa", "udp", _q("web.app.test", "SOA")),
    ("ns", "udp", _q("app.test", "NS")),
    ("txt", "udp", _q("web.app.test", "TXT")),
    ("mx", "udp", _q("web.app.test", "MX")),
    ("https", "udp", _q("web.app.test", "HTTPS")),
    ("nxdomain", "udp", _q("nx.app.test")),
    ("nxdomain_aaaa", "udp", _q("nx.app.test", "AAAA")),
    ("nodata_a", "udp", _q("noaddr.app.test")),
    ("upstream_servfail", "udp", _q("fail.app.test")),
    ("upstream_refused", "udp", _q("refused.app.test")),
    ("upstream_silent", "udp", _q("silent.app.test")),
    ("upstream_answers_pool_address", "udp", _q("loop.app.test")),
    ("ignored_destination", "udp", _q("direct.app.test")),
    ("ignored_destination_aaaa", "udp", _q("direct.app.test", "AAAA")),
    ("edns", "udp", _q("web.app.test", edns=0)),
    ("edns_do", "udp", _q("web.app.test", edns=0, do=True)),
    ("edns_version_1", "udp", _q("web.app.test", edns=1)),
    ("no_rd", "udp", _q("web.app.test", rd=False)),
    ("class_chaos", "udp", _q("web.app.test", rdclass="CH")),
    ("opcode_status", "udp", _q("web.app.test", opcode=2)),
    ("tcp", "tcp", _q("web.app.test")),
    ("no_question", "udp", struct.pack("!HHHHHH", 0x4242, 0x0100, 0, 0, 0, 0)),
    ("garbage_after_header", "udp", struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x07garbage"),
    ("shorter_than_header", "udp", b"\x42\x42\x01\x00\x00"),
    ("qr_set", "udp", _q("web.app.test")[:2] + b"\x81\x00" + _q("web.app.test")[4:]),
]


def send(ns: str, server: str, transport: str, wire: bytes, timeout: float = WAIT) -> bytes | None:
    """One query from namespace ``ns``; the reply's bytes, or None when nothing came back in time (a
    refused TCP connection counts as nothing)."""
    with entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        try:
            if transport == "udp":
                s.sendto(wire, (server, 53))
                return s.recv(65535)
            s.connect((server, 53))
            s.sendall(struct.pack("!H", len(wire)) + wire)
            head = b""
            while len(head) < 2 and (chunk := s.recv(2 - len(head))):
                head += chunk
            if len(head) < 2:
                return None
            data = b""
            while len(data) < struct.unpack("!H", head)[0] and (chunk := s.recv(65535)):
                data += chunk
            return data
        except OSError:
            return None


def _kind(rdtype: int, text: str, pool: str) -> str:
    if rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return "record"
    a = ipaddress.ip_address(text)
    if a.version == 4 and a in ipaddress.ip_network(pool):
        return "pool"
    if a.version == 6 and a in ipaddress.ip_network(NATC_ULA):
        return "ula"
    return "real"


def normalise(query: bytes, reply: bytes | None, pool: str) -> dict[str, str]:
    """The fields compared, as text (never a literal pool address)."""
    if reply is None:
        return {"reply": "none"}
    try:
        m = dns.message.from_wire(reply, ignore_trailing=True)
    except Exception as e:
        return {"reply": f"unparsable ({type(e).__name__})"}
    answers = sorted(f"{dns.rdatatype.to_text(rr.rdtype)}:{_kind(rr.rdtype, rr.to_text(), pool)}"
                     for rrset in m.answer for rr in rrset)
    return {
        "reply": "yes",
        "id_echoed": str(m.id == int.from_bytes(query[:2], "big")),
        "rcode": dns.rcode.to_text(m.rcode()),
        "opcode": dns.opcode.to_text(m.opcode()),
        **{f: str(bool(m.flags & getattr(dns.flags, f))) for f in ("AA", "TC", "RD", "RA")},
        "answer": ",".join(answers) or "-",
        "soa_in_authority": str(any(r.rdtype == dns.rdatatype.SOA for r in m.authority)),
        "opt": "-" if m.edns < 0 else f"v{m.edns} do={bool(m.ednsflags & dns.flags.DO)}",
        "question_echoed": str(reply[12:12 + (n := _qlen(query))] == query[12:12 + n]) if _qlen(query) else "-",
    }


def _qlen(query: bytes) -> int:
    """Length of the first question's bytes (name + type + class), 0 when there is none."""
    if len(query) < 12 or struct.unpack("!H", query[4:6])[0] == 0:
        return 0
    i = 12
    while i < len(query) and query[i] != 0:
        i += query[i] + 1
    return i + 1 + 4 - 12


def differences(ours: dict[str, str], natc: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Field by field; where only one side replied, the one difference is whether (and what) it answered."""
    if "yes" not in (ours["reply"], natc["reply"]) or ours["reply"] != natc["reply"]:
        def brief(n: dict[str, str]) -> str:
            return f"{n['rcode']} {n['answer']}" if n["reply"] == "yes" else n["reply"]
        return {} if brief(ours) == brief(natc) else {"reply": (brief(ours), brief(natc))}
    return {k: (ours.get(k, "n/a"), natc.get(k, "n/a")) for k in sorted(set(ours) | set(natc))
            if ours.get(k, "n/a") != natc.get(k, "n/a")}


def expected() -> dict[tuple[str, str], dict[str, str]]:
    """(case, field) → entry; case "*" stands for every case (a header defect seen on all replies)."""
    doc = tomllib.loads(EXPECTED.read_text())
    return {(d["case"], d["field"]): d for d in doc["difference"]}


def table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("case", "field", "ours", "natc")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tailnet, CorpusUpstream]]:
    """Its own small tailnet: the product on c1 (a cluster of one), natc, client cl1."""
    if (reason := natc_missing()) is not None:
        pytest.skip(reason)
    with running(tmp_path_factory.mktemp("realnet-natc"), "nd") as net:
        allow_natc(net)
        upstream = start_corpus_upstream(net)
        try:
            net.serve_origin(SERVED)
            c1 = net.connector("c1")
            natc = Natc(net, "natc", 21)
            cl = net.client("cl1")
            net.wait_online()
            c1.start_appconnector(ours_config(c1))
            cl.pool_address("web.app.test")          # our route and split DNS have settled
            natc.wait_serving(cl)
            yield net, upstream
        finally:
            upstream.close()


def test_natc_differential(side_by_side: tuple[Tailnet, CorpusUpstream], capsys: pytest.CaptureFixture[str]) -> None:
    net, _ = side_by_side
    ns = net.nodes["cl1"].ns
    with ThreadPoolExecutor(len(CORPUS) * 2) as ex:
        futs = {(case, who): ex.submit(send, ns, server, transport, wire)
                for case, transport, wire in CORPUS for who, server in (("ours", OURS_DNS), ("natc", NATC_DNS))}
        replies = {k: f.result() for k, f in futs.items()}
    found: dict[tuple[str, str], tuple[str, str]] = {}
    for case, _, wire in CORPUS:
        o = normalise(wire, replies[(case, "ours")], POOL)
        n = normalise(wire, replies[(case, "natc")], NATC_POOL)
        for field, pair in differences(o, n).items():
            found[(case, field)] = pair
    rows = [(c, f, o, n) for (c, f), (o, n) in sorted(found.items(), key=lambda kv: [x for x, _, _ in CORPUS].index(
        kv[0][0]))]
    printed = table(rows)
    with capsys.disabled():
        print(f"\nnatc differential: {len(CORPUS)} queries, {len(rows)} differences\n{printed}")
    MEASURED.append(f"natc differential: {len(CORPUS)} queries, {len({c for c, _ in found})} cases differ")

    want = expected()

    def listed(case: str, field: str, pair: tuple[str, str]) -> bool:
        return any(k in want and (want[k]["ours"], want[k]["natc"]) == pair for k in ((case, field), ("*", field)))
    unlisted = {k: v for k, v in found.items() if not listed(*k, v)}
    stale = {k: (d["ours"], d["natc"]) for k, d in want.items()
             if not any(f == k[1] and v == (d["ours"], d["natc"]) and k[0] in ("*", c) for (c, f), v in found.items())}
    assert not (unlisted or stale), (
        f"differences not in {EXPECTED.name}:\n{table([(*k, *v) for k, v in unlisted.items()])}\n"
        f"listed differences that no longer occur:\n{table([(*k, *v) for k, v in stale.items()])}")
    assert all(d.get("reason", "").strip() for d in want.values()), "every listed difference says why"


def test_corpus_is_answered_by_ours(side_by_side: tuple[Tailnet, CorpusUpstream]) -> None:
    """Ours answers every query that carries a readable header and question (RFC 8906: never silence)."""
    net, _ = side_by_side
    silent = [case for case, transport, wire in CORPUS
              if case not in ("shorter_than_header", "qr_set")
              and send(net.nodes["cl1"].ns, OURS_DNS, transport, wire) is None]
    assert not silent, f"ours did not answer: {silent}"
