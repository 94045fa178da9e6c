"""Fuzz target for the DNS wire parser and the fast path.

Properties, for any bytes at all:
  * ``wire.parse_query`` raises nothing but ``Malformed`` or ``FormatError``;
  * the fast path never raises, and when it answers, its bytes equal what the general path encodes
    for the same query (a differential check of the hand-written fast parser against the full one);
  * every response the general path encodes for a parsed query is readable by dnspython;
  * the upstream-response reader raises nothing but ValueError.

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

import dns.exception
import dns.message
import dns.rrset

from appconnector.dns import wire
from appconnector.dns.fastpath import FastPath
from appconnector.dns.policy import AnswerPolicy
from appconnector.tailnet.standalone import StandaloneIdentity

CLIENT = "100.100.0.1"
POOL_ADDR = 0x64400105
POLICY = AnswerPolicy(ttl=120)


def _seed_query(name: str, rdtype: str, edns: bool, do: bool = False) -> bytes:
    m = dns.message.make_query(name, rdtype, use_edns=0 if edns else False, want_dnssec=do)
    m.id = 0xBEEF
    return m.to_wire()


def _seed_response() -> bytes:
    q = dns.message.make_query("www.example", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("www.example.", 60, "IN", "CNAME", "edge.example."))
    r.answer.append(dns.rrset.from_text("edge.example.", 60, "IN", "A", "192.0.2.1"))
    r.authority.append(dns.rrset.from_text("example.", 60, "IN", "SOA", "ns.example. h.example. 1 2 3 4 5"))
    return r.to_wire()


SEEDS = [
    _seed_response(),
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


def check(data: bytes, fast: FastPath) -> None:
    """Raise AssertionError when a property above fails for ``data``."""
    with contextlib.suppress(ValueError):  # the upstream-response reader: ValueError or a Response
        wire.parse_response(data)
    try:
        query: wire.Query | None = wire.parse_query(data)
    except (wire.Malformed, wire.FormatError):
        query = None
    got = fast.answer(data, CLIENT)
    if got is not None:
        assert query is not None, f"fast path answered a message the parser rejects: {data.hex()}"
        reply = POLICY.pool_answer(query.qtype, POOL_ADDR)
        want = wire.encode_response(query, reply.rcode, reply.answers, reply.authority)
        assert got == want, f"fast path differs from the general path for {data.hex()}"
    if query is not None:
        early = POLICY.precheck(query)
        rcode = early.rcode if early is not None else wire.NOERROR
        raw = wire.encode_response(query, rcode, (), (POLICY.soa(),), udp_limit=wire.udp_limit(query))
        nx = POLICY.nxdomain(query.qname) if query.question else None
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    fast = make_fast_path()
    started = time.monotonic()
    for i in range(args.iterations):
        data = rng.randbytes(rng.randrange(0, 64)) if rng.random() < 0.1 else mutate(rng, rng.choice(SEEDS))
        check(data, fast)
        if i and i % 500_000 == 0:
            print(f"{i} inputs, {i / (time.monotonic() - started):.0f}/s", file=sys.stderr)
    print(f"ok: {args.iterations} inputs (seed {args.seed}) in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
