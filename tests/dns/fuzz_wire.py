"""Fuzz target for the DNS wire parser and the fast path.

Properties, for any bytes at all:
  * ``wire.parse_query`` raises nothing but ``Malformed`` or ``FormatError``;
  * when dnslib (an independent codec) also parses the query, both read the same ID, opcode, RD/CD,
    question (name byte for byte, type, class) and OPT (version, DO, payload);
  * the fast path never raises, and when it answers, its bytes equal what the general path encodes
    for the same query (a differential check of the hand-written fast parser against the full one);
  * every response we build (fast path, pool answer, NODATA/error with SOA, NXDOMAIN) parses with
    dnslib and means what it should, checked against dnslib's own reading of the query where it has
    one: ID, QR/AA/TC/RD/CD, opcode, full rcode (OPT's extended bits included), the question as sent,
    each record's owner, type, class, TTL and data, and our OPT (payload 1232, version 0, DO copied);
    dnspython can read them too;
  * the upstream-response reader raises nothing but ValueError, and where dnslib reads the same message
    both see the same ID, rcode, question name and type, and records (owner, type, TTL, and the A/AAAA
    address, CNAME target or SOA minimum).

In the test suite (``test_fuzz_wire.py``) hypothesis runs a bounded number of examples; set
``APPCONNECTOR_LONG=1`` for a long hypothesis run. For millions of inputs run the mutation fuzzer:

    .venv/bin/python -m tests.dns.fuzz_wire --iterations 5000000 [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections.abc import Callable

import dns.exception
import dns.message
import dns.rrset
import dnslib

from appconnector.dns import wire
from appconnector.dns.fastpath import FastPath
from appconnector.dns.policy import HOSTMASTER, NS_NAME, SOA_EXPIRE, SOA_REFRESH, SOA_RETRY, SOA_SERIAL, AnswerPolicy
from appconnector.tailnet.standalone import StandaloneIdentity

CLIENT = "100.100.0.1"
POOL_ADDR = 0x64400105
POLICY = AnswerPolicy(ttl=120)


def _seed_query(name: str, rdtype: str, edns: bool, do: bool = False) -> bytes:
    m = dns.message.make_query(name, rdtype, use_edns=0 if edns else False, want_dnssec=do)
    m.id = 0xBEEF
    return m.to_wire()


def _seed_response(rdtype: str = "A", rcode: int = 0) -> bytes:
    q = dns.message.make_query("www.example", rdtype, use_edns=0 if rdtype == "AAAA" else False)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if rcode == 0:
        r.answer.append(dns.rrset.from_text("www.example.", 60, "IN", "CNAME", "Edge.example."))
        address = "2001:db8::1" if rdtype == "AAAA" else "192.0.2.1"
        r.answer.append(dns.rrset.from_text("edge.example.", 60, "IN", rdtype, address))
    r.authority.append(dns.rrset.from_text("example.", 60, "IN", "SOA", "ns.example. h.example. 1 2 3 4 5"))
    return r.to_wire()


SEEDS = [
    _seed_response(),
    _seed_response("AAAA"),
    _seed_response("A", rcode=3),
    _seed_query("app.example", "A", False),
    _seed_query("App.Example", "A", True),
    _seed_query("app.example", "AAAA", True, do=True),
    _seed_query("app.example", "SOA", False),
    _seed_query("x.y.z.app.example", "MX", True),
]


def make_fast_path() -> FastPath:
    fast = FastPath(StandaloneIdentity().cached, lambda *a: None, refresh=300.0, now=0.0)
    for rdtype in ("A", "AAAA"):
        query = wire.parse_query(_seed_query("app.example", rdtype, False))
        reply = POLICY.pool_answer(query.qtype, POOL_ADDR)
        fast.store(query, CLIENT, "app.example", POOL_ADDR, 0.0, reply.rcode, reply.answers, reply.authority,
                   fast.generation)
    return fast


# ---- the independent reading: dnslib ---------------------------------------------------------------

POOL_TEXT = "100.64.1.5"
assert int.from_bytes(bytes(int(x) for x in POOL_TEXT.split(".")), "big") == POOL_ADDR
SOA_TEXT = f"{NS_NAME}. {HOSTMASTER}. {SOA_SERIAL} {SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} {POLICY.ttl}"
# (owner: "q" for the question name, "parent" for the name above it; type; TTL; data as dnslib prints it)
Expected = tuple[tuple[str, int, int, str], ...]
A_ANSWER: Expected = (("q", wire.TYPE_A, POLICY.ttl, POOL_TEXT),)
SOA_AT_NAME: Expected = (("q", wire.TYPE_SOA, POLICY.ttl, SOA_TEXT),)
SOA_AT_PARENT: Expected = (("parent", wire.TYPE_SOA, POLICY.ttl, SOA_TEXT),)


def _labels(qname: bytes) -> tuple[bytes, ...]:
    """Our wire name as dnslib's label tuple (case kept)."""
    out, i = [], 0
    while i < len(qname) and qname[i]:
        out.append(qname[i + 1:i + 1 + qname[i]])
        i += 1 + qname[i]
    return tuple(out)


def _utf8_labels(qname: bytes) -> bool:
    try:
        for label in _labels(qname):
            label.decode()
    except UnicodeDecodeError:
        return False
    return True


def dnslib_query(data: bytes, query: wire.Query | None) -> dnslib.DNSRecord | None:
    """dnslib's reading of the query; where both codecs read it, they must agree."""
    try:
        theirs = dnslib.DNSRecord.parse(data)
    except Exception:  # dnslib raises DNSError, but also struct/Index/Unicode errors on garbage
        return None
    if query is None:
        return theirs
    h = theirs.header
    where = f"query {data.hex()}"
    assert h.id == query.ident, f"ID differs: {where}"
    assert (h.opcode, h.rd, h.cd) == (query.opcode, int(bool(query.flags & wire.RD)),
                                      int(bool(query.flags & wire.CD))), f"opcode/RD/CD differ: {where}"
    assert len(theirs.questions) == query.qdcount, f"question count differs: {where}"
    if query.question:
        q = theirs.questions[0]
        assert (q.qname.label, q.qtype, q.qclass) == (_labels(query.qname), query.qtype, query.qclass), \
            f"question differs: {where}"
    opts = [rr for rr in theirs.ar if rr.rtype == wire.TYPE_OPT]
    if query.edns is None:
        assert not opts, f"dnslib sees an OPT record we did not: {where}"
    else:
        assert len(opts) == 1, f"OPT records differ: {where}"
        e = query.edns
        assert (opts[0].rclass, (opts[0].ttl >> 16) & 0xFF, bool(opts[0].ttl & wire.DO_BIT)) == \
            (e.payload, e.version, e.do), f"OPT differs: {where}"
    return theirs


def check_meaning(raw: bytes, query: wire.Query, theirs: dnslib.DNSRecord | None, rcode: int,
                  answers: Expected = (), authority: Expected = (), *, udp_limit: int | None = None) -> None:
    """``raw`` (our answer to ``query``) parses with dnslib and says exactly this: ``rcode``, the
    records, the question as sent, flags and OPT derived from the query as dnslib read it."""
    where = f"our answer {raw.hex()} to {query.ident:04x}/{query.question.hex()}"
    if not _utf8_labels(query.qname):
        return  # dnslib refuses labels that are not UTF-8 (DNS allows any octets; dnspython reads them)
    try:
        r = dnslib.DNSRecord.parse(raw)
    except Exception as e:
        raise AssertionError(f"dnslib cannot read {where}: {e!r}") from e
    h = r.header
    rd, cd = (theirs.header.rd, theirs.header.cd) if theirs is not None else \
        (int(bool(query.flags & wire.RD)), int(bool(query.flags & wire.CD)))
    opcode = theirs.header.opcode if theirs is not None else query.opcode
    assert h.id == query.ident, f"ID: {where}"
    assert (h.qr, h.aa, h.rd, h.cd, h.ra, h.z, h.ad, h.opcode) == (1, 1, rd, cd, 0, 0, 0, opcode), f"flags: {where}"
    opts = [rr for rr in r.ar if rr.rtype == wire.TYPE_OPT]
    assert len(r.ar) == len(opts), f"only OPT in additional: {where}"
    full_rcode = h.rcode | ((opts[0].ttl >> 24) << 4 if opts else 0)
    assert full_rcode == rcode, f"rcode {full_rcode} instead of {rcode}: {where}"
    if opcode != 0:  # header only
        assert not (r.questions or r.rr or r.auth or r.ar), f"records in a NOTIMP answer: {where}"
        return
    if query.edns is None:
        assert not opts, f"an OPT the query did not have: {where}"
    else:
        assert len(opts) == 1, f"our OPT is missing: {where}"
        assert (opts[0].rclass, (opts[0].ttl >> 16) & 0xFF, bool(opts[0].ttl & wire.DO_BIT),
                opts[0].ttl & 0x7FFF) == (wire.OUR_UDP_PAYLOAD, 0, query.edns.do, 0), f"OPT: {where}"
    qname = theirs.questions[0].qname.label if theirs is not None and theirs.questions else _labels(query.qname)
    if not query.question:
        assert not (r.questions or r.rr or r.auth), f"records without a question: {where}"
        return
    q = r.questions[0]
    assert len(r.questions) == 1 and (q.qname.label, q.qtype, q.qclass) == (qname, query.qtype, query.qclass), \
        f"the question as sent: {where}"
    if h.tc:
        assert udp_limit is not None and len(raw) <= udp_limit, f"TC without a UDP limit to respect: {where}"
        assert not (r.rr or r.auth), f"records in a truncated answer: {where}"
        return
    assert udp_limit is None or len(raw) <= udp_limit, f"over the client's UDP payload: {where}"
    owners = {"q": qname, "parent": qname[1:]}
    for got, want, section in ((r.rr, answers, "answer"), (r.auth, authority, "authority")):
        seen = [(rr.rname.label, rr.rtype, rr.rclass, rr.ttl, str(rr.rdata)) for rr in got]
        assert seen == [(owners[o], t, wire.CLASS_IN, ttl, text) for o, t, ttl, text in want], \
            f"{section} section {seen}: {where}"


def _text(labels: tuple[bytes, ...]) -> str:
    return b".".join(labels).decode("latin-1").lower()


def compare_response(data: bytes, ours: wire.Response) -> None:
    """Our reading of an upstream response against dnslib's, for well-formed messages: dnslib reads each
    record's data by its type and ignores a wrong RDLENGTH (it then reads on from the wrong offset), so
    dnspython, which holds every record to its RDLENGTH, must accept the message first."""
    try:
        dns.message.from_wire(data)
        theirs = dnslib.DNSRecord.parse(data)
    except Exception:  # malformed for dnspython, or for dnslib (e.g. non-UTF-8 labels)
        return
    where = f"upstream response {data.hex()}"
    assert (theirs.header.id, theirs.header.rcode) == (ours.ident, ours.rcode), f"ID/rcode: {where}"
    q = theirs.questions[0]
    assert (_text(q.qname.label), q.qtype) == (ours.qname, ours.qtype), f"question: {where}"
    for got, mine, section in ((theirs.rr, ours.answers, "answer"), (theirs.auth, ours.authority, "authority")):
        assert len(got) == len(mine), f"{section} count: {where}"
        for rr, rec in zip(got, mine, strict=True):
            assert (_text(rr.rname.label), rr.rtype, rr.ttl & 0x7FFFFFFF) == (rec.name, rec.rtype, rec.ttl), \
                f"{section} record {rec}: {where}"
            if rec.value is None or rec.rtype in (wire.TYPE_SVCB, wire.TYPE_HTTPS):
                continue  # a type we do not read, A/AAAA data of the wrong length, raw SVCB (fuzz_svcb.py)
            if rec.rtype in (wire.TYPE_A, wire.TYPE_AAAA):
                want: object = str(rr.rdata)
            elif rec.rtype == wire.TYPE_CNAME:
                want = _text(rr.rdata.label.label)
            else:  # SOA: the minimum, the negative-caching TTL
                want = rr.rdata.times[4]
            assert rec.value == want, f"{section} data {rec.value!r} instead of {want!r}: {where}"


def check(data: bytes, fast: FastPath) -> None:
    """Raise AssertionError when a property above fails for ``data``."""
    with contextlib.suppress(ValueError):  # the upstream-response reader: ValueError or a Response
        compare_response(data, wire.parse_response(data))
    try:
        query: wire.Query | None = wire.parse_query(data)
    except (wire.Malformed, wire.FormatError):
        query = None
    theirs = dnslib_query(data, query)
    got = fast.answer(data, CLIENT)
    if got is not None:
        assert query is not None, f"fast path answered a message the parser rejects: {data.hex()}"
        reply = POLICY.pool_answer(query.qtype, POOL_ADDR)
        want = wire.encode_response(query, reply.rcode, reply.answers, reply.authority)
        assert got == want, f"fast path differs from the general path for {data.hex()}"
        if query.qtype == wire.TYPE_A:
            check_meaning(got, query, theirs, wire.NOERROR, A_ANSWER)
        else:
            check_meaning(got, query, theirs, wire.NOERROR, (), SOA_AT_NAME)
    if query is not None:
        early = POLICY.precheck(query)
        rcode = early.rcode if early is not None else wire.NOERROR
        limit = wire.udp_limit(query)
        raw = wire.encode_response(query, rcode, (), (POLICY.soa(),), udp_limit=limit)
        check_meaning(raw, query, theirs, rcode, (), SOA_AT_NAME, udp_limit=limit)
        nx = POLICY.nxdomain(query.qname) if query.question else None
        if nx is not None:
            check_meaning(wire.encode_response(query, nx.rcode, nx.answers, nx.authority), query, theirs,
                          wire.NXDOMAIN, (), SOA_AT_PARENT)
            if query.qtype in (wire.TYPE_A, wire.TYPE_AAAA) and not query.flags & wire.OPCODE_MASK:
                pool = POLICY.pool_answer(query.qtype, POOL_ADDR)
                check_meaning(wire.encode_response(query, pool.rcode, pool.answers, pool.authority), query, theirs,
                              wire.NOERROR, *((A_ANSWER, ()) if query.qtype == wire.TYPE_A else ((), SOA_AT_NAME)))
        try:
            dns.message.from_wire(raw, question_only=False)
            if nx is not None:
                dns.message.from_wire(wire.encode_response(query, nx.rcode, nx.answers, nx.authority))
        except dns.exception.DNSException as e:
            # dnspython refuses some question types in a response (e.g. OPT or meta types as the
            # question); those are not ours to fix, anything else is.
            if query.qtype not in (41, 249, 250, 251, 252, 255) and query.qclass not in (254, 255):
                raise AssertionError(f"dnspython cannot read our answer to {data.hex()}: {e!r}") from e


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 3 and len(b) > 12:
            i = rng.randrange(12, len(b))
            b[i] = b[i] ^ 0x20  # case flips in names
        else:
            b[rng.randrange(2, 12) if len(b) >= 12 else 0:] = b[rng.randrange(2, 12) if len(b) >= 12 else 0:]
            if len(b) >= 12:
                b[rng.randrange(2, 12)] = rng.choice((0, 1, 2, 0x80, 0xFF))
    return bytes(b)


def run(argv: list[str] | None, doc: str | None, seeds: list[bytes], check_one: Callable[[bytes], None],
        max_random: int = 64) -> int:
    """The mutation fuzzer's command line (shared by the fuzz targets): random bytes one time in ten,
    else a mutated seed, each handed to ``check_one``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.monotonic()
    for i in range(args.iterations):
        data = rng.randbytes(rng.randrange(0, max_random)) if rng.random() < 0.1 else mutate(rng, rng.choice(seeds))
        check_one(data)
        if i and i % 500_000 == 0:
            print(f"{i} inputs, {i / (time.monotonic() - started):.0f}/s", file=sys.stderr)
    print(f"ok: {args.iterations} inputs (seed {args.seed}) in {time.monotonic() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    fast = make_fast_path()
    return run(argv, __doc__, SEEDS, lambda data: check(data, fast))


if __name__ == "__main__":
    sys.exit(main())
