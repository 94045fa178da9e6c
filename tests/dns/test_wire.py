"""The hand-written parser/encoder and the fast path, called directly (pure code, no sockets)."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from appconnector.dns import wire
from appconnector.dns.fastpath import FastPath
from appconnector.dns.policy import AnswerPolicy
from appconnector.pool.api import Changes
from appconnector.tailnet.api import NodeInfo
from appconnector.tailnet.standalone import StandaloneIdentity

POOL_ADDR = 0x64400105  # 100.64.1.5


def q(name: str, rdtype: str = "A", *, edns: int | None = None, do: bool = False, rd: bool = True,
      ident: int = 4321, payload: int = 1232, options: list[dns.edns.Option] | None = None) -> bytes:
    if edns is None:
        m = dns.message.make_query(name, rdtype, use_edns=False)
    else:
        m = dns.message.make_query(name, rdtype, use_edns=edns, want_dnssec=do, payload=payload, options=options)
    m.id = ident
    if not rd:
        m.flags &= ~dns.flags.RD
    return m.to_wire()


def test_parse_plain_query_keeps_the_question_bytes_as_sent() -> None:
    data = q("GitHub.COM", "A")
    query = wire.parse_query(data)
    assert query.ident == 4321 and query.qtype == wire.TYPE_A and query.qclass == wire.CLASS_IN
    assert query.question == data[12:] and b"GitHub" in query.qname
    assert query.domain() == "github.com"
    assert query.edns is None


def test_parse_edns_version_do_and_payload() -> None:
    query = wire.parse_query(q("a.example", "AAAA", edns=0, do=True, payload=4096))
    assert query.edns == wire.Edns(version=0, do=True, payload=4096)


@pytest.mark.parametrize("data", [b"", b"\x00" * 11, dns.message.make_response(
    dns.message.make_query("a.example", "A")).to_wire()])
def test_short_messages_and_responses_are_dropped(data: bytes) -> None:
    with pytest.raises(wire.Malformed):
        wire.parse_query(data)


@pytest.mark.parametrize("data", [
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",               # says one question, has none
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03abc",        # name runs off the end
    q("a.example") + b"junk",                                           # trailing bytes
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer in question 1
])
def test_garbage_with_a_header_is_a_format_error_carrying_the_id(data: bytes) -> None:
    with pytest.raises(wire.FormatError) as e:
        wire.parse_query(data)
    assert e.value.ident == 0x1234 or e.value.ident == 4321
    reply = dns.message.from_wire(wire.encode_error(e.value.ident, e.value.flags, wire.FORMERR))
    assert reply.rcode() == dns.rcode.FORMERR and reply.id == e.value.ident


def test_response_echoes_question_case_rd_and_clears_z() -> None:
    data = bytearray(q("MiXeD.Example.ORG", rd=True))
    data[3] |= 0x40  # set the Z bit in the query: it must come back clear
    query = wire.parse_query(bytes(data))
    raw = wire.encode_response(query, wire.NOERROR, [wire.rr_a(POOL_ADDR, 60)])
    assert raw[12:12 + len(query.question)] == query.question  # byte for byte
    m = dns.message.from_wire(raw)
    assert m.flags & dns.flags.AA and m.flags & dns.flags.RD and m.flags & dns.flags.QR
    assert raw[3] & 0x40 == 0
    assert str(m.answer[0].name) == "MiXeD.Example.ORG." and m.answer[0][0].address == "100.64.1.5"


def test_badvers_is_an_extended_rcode_in_our_opt() -> None:
    query = wire.parse_query(q("a.example", edns=1))
    raw = wire.encode_response(query, wire.BADVERS)
    m = dns.message.from_wire(raw)
    assert m.rcode() == dns.rcode.BADVERS and m.edns == 0 and m.payload == wire.OUR_UDP_PAYLOAD
    assert wire.rcode_of(raw) == wire.BADVERS


def test_udp_truncation_sets_tc_and_keeps_question_and_opt() -> None:
    query = wire.parse_query(q("big.example"))
    records = [wire.rr_a(0xC6336400 + i, 60) for i in range(60)]
    raw = wire.encode_response(query, wire.NOERROR, records, udp_limit=wire.udp_limit(query))
    m = dns.message.from_wire(raw)
    assert m.flags & dns.flags.TC and not m.answer and len(raw) <= 512
    full = dns.message.from_wire(wire.encode_response(query, wire.NOERROR, records))
    assert len(full.answer[0]) == 60


def _fast(policy: AnswerPolicy) -> tuple[FastPath, list[tuple[str, int, str, float]]]:
    touches: list[tuple[str, int, str, float]] = []
    fast = FastPath(StandaloneIdentity().cached, lambda *a: touches.append(a), refresh=300.0, now=1000.0)
    for name, qtype in (("app.example", "A"), ("app.example", "AAAA")):
        query = wire.parse_query(q(name, qtype))
        reply = policy.pool_answer(query.qtype, POOL_ADDR)
        fast.store(query, "100.100.0.1", "app.example", POOL_ADDR, 1000.0, reply.rcode, reply.answers,
                   reply.authority, fast.generation)
    return fast, touches


@pytest.mark.parametrize("kwargs", [{}, {"edns": 0}, {"edns": 0, "do": True}, {"rd": False},
                                    {"edns": 0, "options": [dns.edns.GenericOption(10, b"12345678")]}])
@pytest.mark.parametrize("qtype", ["A", "AAAA"])
def test_fast_path_answer_equals_the_general_encoding(kwargs: dict[str, object], qtype: str) -> None:
    policy = AnswerPolicy(ttl=120)
    fast, _ = _fast(policy)
    data = q("APP.example", qtype, **kwargs)  # type: ignore[arg-type]
    got = fast.answer(data, "100.100.0.1")
    query = wire.parse_query(data)
    reply = policy.pool_answer(query.qtype, POOL_ADDR)
    assert got == wire.encode_response(query, reply.rcode, reply.answers, reply.authority)
    m = dns.message.from_wire(got)
    assert m.id == 4321 and str(m.question[0].name) == "APP.example."
    if qtype == "A":
        assert m.answer[0][0].address == "100.64.1.5"
    else:
        assert not m.answer and m.authority[0].rdtype == dns.rdatatype.SOA


def test_fast_path_misses_other_nodes_types_and_odd_shapes() -> None:
    fast, _ = _fast(AnswerPolicy(ttl=120))
    assert fast.answer(q("app.example"), "100.100.0.2") is None       # another node
    assert fast.answer(q("app.example", "MX"), "100.100.0.1") is None
    assert fast.answer(q("other.example"), "100.100.0.1") is None
    assert fast.answer(q("app.example", edns=1), "100.100.0.1") is None  # BADVERS is the general path's
    assert fast.answer(q("app.example")[:-1], "100.100.0.1") is None


def test_fast_path_touches_once_per_refresh_interval_and_dies_with_the_mapping() -> None:
    fast, touches = _fast(AnswerPolicy(ttl=120))
    assert fast.answer(q("app.example"), "100.100.0.1") is not None
    assert touches == []
    fast.now = 1000.0 + 301
    fast.answer(q("app.example"), "100.100.0.1")
    fast.answer(q("app.example"), "100.100.0.1")  # from the exact cache
    fast.answer(q("APP.example"), "100.100.0.1")
    assert touches == [("100.100.0.1", POOL_ADDR, "app.example", 1301.0)]
    gen = fast.generation
    fast.on_changes(Changes(removed=[("100.100.0.1", POOL_ADDR, "app.example")]))
    assert fast.generation != gen
    assert fast.answer(q("app.example"), "100.100.0.1") is None
    assert fast.answer(q("app.example", "AAAA"), "100.100.0.1") is None


def test_exact_cache_follows_identity_changes_and_removals() -> None:
    nodes = {"100.100.0.1": NodeInfo("nA", "a", ("100.100.0.1",))}
    fast = FastPath(nodes.get, lambda *a: None, refresh=300.0, now=0.0)
    query = wire.parse_query(q("app.example"))
    reply = AnswerPolicy(ttl=120).pool_answer(query.qtype, POOL_ADDR)
    fast.store(query, "nA", "app.example", POOL_ADDR, 0.0, reply.rcode, reply.answers, reply.authority,
               fast.generation)
    data = q("app.example")
    first = fast.answer(data, "100.100.0.1")
    assert first is not None and fast.answer(data, "100.100.0.1") == first  # second: exact cache
    nodes["100.100.0.1"] = NodeInfo("nB", "b", ("100.100.0.1",))  # the IP now belongs to another node
    assert fast.answer(data, "100.100.0.1") is None
    nodes["100.100.0.1"] = NodeInfo("nA", "a", ("100.100.0.1",))
    assert fast.answer(data, "100.100.0.1") == first
    fast.on_changes(Changes(removed=[("nA", POOL_ADDR, "app.example")]))
    assert fast.answer(data, "100.100.0.1") is None


def _name(last: int) -> bytes:
    """A wire name of three 63-byte labels and one of ``last`` bytes: 255 bytes long when last == 61."""
    return (b"\x3f" + b"a" * 63) * 3 + bytes([last]) + b"b" * last + b"\x00"


def _response(qname: bytes, answer_owner: bytes) -> bytes:
    return (b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"
            + answer_owner + b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x07")


def test_names_are_read_alike_in_queries_and_upstream_responses() -> None:
    """One name walker: the 255-byte limit holds in both directions, pointers are followed in upstream
    answers (not allowed in a query's first question), and a pointer loop is refused."""
    longest, too_long = _name(61), _name(62)
    assert len(longest) == 255 and len(too_long) == 256
    header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert wire.parse_query(header + longest + b"\x00\x01\x00\x01").domain() == (
        ".".join(["a" * 63] * 3 + ["b" * 61]))
    with pytest.raises(wire.FormatError):
        wire.parse_query(header + too_long + b"\x00\x01\x00\x01")

    ok = wire.parse_response(_response(longest, b"\xc0\x0c"))
    assert ok.answers[0].name == ok.qname == ".".join(["a" * 63] * 3 + ["b" * 61])
    assert ok.answers[0].value == "192.0.2.7"
    with pytest.raises(ValueError):
        wire.parse_response(_response(too_long, b"\xc0\x0c"))
    with pytest.raises(ValueError, match="compression loop"):  # the answer's owner points at itself
        wire.parse_response(_response(longest, b"\xc1\x0f"))
    mixed = wire.parse_response(_response(b"\x03www\x07Example\x00", b"\x03LB_\xc0\x10"))
    assert mixed.qname == "www.example" and mixed.answers[0].name == "lb_.example"
